"""Builds the optional C++/CUDA extension `halo._C` from csrc/.

CPU sources (csrc/*.cpp) always build with CppExtension. CUDA sources (csrc/*.cu) build with CUDAExtension
only where CUDA really works (`torch.cuda.is_available()`) or `FORCE_CUDA=1` is set; nvcc alone is not enough.
The package imports and runs without the extension (every op has a PyTorch fallback).
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
cpp_sources = sorted(glob.glob("csrc/*.cpp"))
if cpp_sources and os.environ.get("HALO_NO_EXTENSION") != "1":
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    with_cuda = torch.cuda.is_available() or os.environ.get("FORCE_CUDA") == "1"
    cu_sources = sorted(glob.glob("csrc/*.cu")) if with_cuda else []
    extra = {"cxx": ["-O3", "-fopenmp"]}
    if cu_sources:
        extra["nvcc"] = ["-O3", "--use_fast_math"]
        ext = CUDAExtension("halo._C", cpp_sources + cu_sources, extra_compile_args=extra,
                            extra_link_args=["-fopenmp"], define_macros=[("HALO_WITH_CUDA", "1")])
    else:
        ext = CppExtension("halo._C", cpp_sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])
    ext_modules.append(ext)
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
