"""Fixtures for the Triton kernel tests: every test runs on each device the kernels can use here.

CPU tensors run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when CUDA is absent);
with CUDA present the kernels are compiled and the same tests run on CUDA tensors.
"""

import os

import pytest
import torch

import halo_kernels

DEVICES = []
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    DEVICES.append("cpu")
if torch.cuda.is_available():
    DEVICES.append("cuda")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        if not halo_kernels.available() or not DEVICES:
            metafunc.parametrize("device", [pytest.param("none", marks=pytest.mark.skip(reason="no Triton backend"))])
        else:
            metafunc.parametrize("device", [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in DEVICES])


def pytest_configure(config):
    config.addinivalue_line("markers", "slow_kernel: the largest kernel cases (still run by default; deselect with -m 'not slow_kernel')")
