"""Dispatch of the per-step operations between the plain-PyTorch reference path and the fused kernels.

Each operation takes the cache first (to read `config.kernels` and the device) and otherwise the signature of
its reference twin in `halo.brightness`, `halo.cull` and `halo.compact`. On CPU, or with
`HaloConfig(kernels="reference")`, the reference runs; on CUDA the Triton kernels of `halo_kernels` run when
they are importable.
"""

from __future__ import annotations

import functools

from . import brightness as _brightness
from . import compact as _compact
from . import cull as _cull


@functools.lru_cache(maxsize=None)
def _kernels():
    """The halo_kernels module, or None where Triton cannot run (no CUDA, or triton missing)."""
    try:
        import halo_kernels
    except ImportError:
        return None
    return halo_kernels if halo_kernels.available() else None


def use_kernels(cache) -> bool:
    """True when this cache's step operations run as fused Triton kernels."""
    return cache.config.kernels == "auto" and cache.device.type == "cuda" and _kernels() is not None


def attention_column_mass(cache, query, key, scaling, n_past, mass, last_row_mass=None):
    impl = _kernels().attention_column_mass if use_kernels(cache) else _brightness.attention_column_mass
    impl(query, key, scaling, n_past, mass, last_row_mass)


def attention_column_mass_and_update(cache, query, key, scaling, n_past, mass, brightness, decay, alpha, num_layers,
                                     last_row_mass=None):
    """Last layer on the kernel path: its column mass and the brightness update in one pass (kernels only)."""
    _kernels().attention_column_mass_and_update(query, key, scaling, n_past, mass, brightness, decay, alpha,
                                                num_layers, last_row_mass)


def update_brightness(cache, brightness, mass, decay, n_past, t_rows, alpha, num_layers):
    impl = _kernels().update_brightness if use_kernels(cache) else _brightness.update_brightness
    impl(brightness, mass, decay, n_past, t_rows, alpha, num_layers)


def cull_scores(cache, brightness, positions, n_valid, dark_bias, radius):
    impl = _kernels().cull_scores if use_kernels(cache) else _cull.cull_scores
    return impl(brightness, positions, n_valid, dark_bias, radius)


def select_victims(cache, scores, positions, protected, n_valid, k):
    impl = _kernels().select_victims if use_kernels(cache) else _cull.select_victims
    return impl(scores, positions, protected, n_valid, k)


def compact(cache, kv, slot_tensors, victims, n_valid):
    impl = _kernels().compact_ if use_kernels(cache) else _compact.compact_
    return impl(kv, slot_tensors, victims, n_valid)
