"""The step backend: the fused Triton kernels or their plain-PyTorch reference twins, chosen once per cache.

Both implement the same operations with the same signatures (`halo.brightness`, `halo.cull`, `halo.layer_cull`
and `halo.compact` define the semantics; `halo_kernels` holds the fused twins):

    attention_column_mass(query, key, scaling, n_past, mass, last_row_mass=None)
    attention_column_mass_and_update(query, key, scaling, n_past, mass, brightness, decay, alpha, num_layers,
                                     last_row_mass=None)          the last layer: its mass + the brightness update
    update_brightness(brightness, mass, decay, n_past, t_rows, alpha, num_layers)
    cull_scores(brightness, positions, n_valid, dark_bias, radius) -> float32 [n_valid]
    select_victims(scores, positions, protected, n_valid, k) -> int64 [k]
    compact_(kv, slot_tensors, victims, n_valid) -> int
and for per-layer memory (halo.layered_cache), every layer at once:
    update_brightness_layers(brightness, mass, decay, n_past, t_rows, alpha)
    attention_column_mass_heads(query, key, scaling, counts, mass, last_row_mass=None)   per KV head (head_cache)
and, only where one operator computes a decode row's attention output with its mass (else None):
    decode_attention(query, key, value, scaling, counts, mass, last_row_mass=None) -> float32 [Hq, D]
    select_victims_layers(scores, positions, protected, k) -> int64 [L, k]
    compact_layers_(kv, slot_tensors, victims, counts) -> int64 [L]
and for recall (halo.archive_mass):
    retained_lse(query, key, scaling, n_past) -> float32 [Hq, T]
    retained_mass(query, key, scaling, n_past, row_lse) -> float32 [Hq, n_past]
    bars(values, quantile, minimum) -> float32 [...]              a quantile of each row of [..., n]
    archive_ratio(query, keys, valid, scaling, row_lse, row_weight, head_scale, heads) -> float32 [A]
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Callable

import torch

from . import archive_mass as _archive_mass
from . import brightness as _brightness
from . import compact as _compact
from . import cull as _cull
from . import decode_attention as _decode_attention
from . import decode_mass as _decode_mass
from . import layer_cull as _layer_cull

KERNEL_CHOICES = ("auto", "reference", "triton")
"""HaloConfig.kernels values: `auto` (Triton on CUDA, the compiled decode operator on CPU), `reference`,
`triton` (forced)."""


@dataclass(frozen=True)
class Backend:
    """The per-step operations of one implementation (see the module docstring for signatures)."""

    name: str
    attention_column_mass: Callable
    attention_column_mass_and_update: Callable
    update_brightness: Callable
    cull_scores: Callable
    select_victims: Callable
    compact_: Callable
    update_brightness_layers: Callable
    select_victims_layers: Callable
    compact_layers_: Callable
    retained_lse: Callable
    retained_mass: Callable
    bars: Callable
    archive_ratio: Callable
    attention_column_mass_heads: Callable
    decode_attention: Callable | None = None

    @classmethod
    def from_module(cls, name: str, module: ModuleType) -> "Backend":
        heads = functools.partial(_brightness.attention_column_mass_heads, per_head=module.attention_column_mass)
        return cls(name, module.attention_column_mass, module.attention_column_mass_and_update,
                   module.update_brightness, module.cull_scores, module.select_victims, module.compact_,
                   module.update_brightness_layers, module.select_victims_layers, module.compact_layers_,
                   module.retained_lse, module.retained_mass, module.bars, module.archive_ratio, heads)


REFERENCE = Backend("reference", _brightness.attention_column_mass, _brightness.attention_column_mass_and_update,
                    _brightness.update_brightness, _cull.cull_scores, _cull.select_victims, _compact.compact_,
                    _brightness.update_brightness_layers, _layer_cull.select_victims_layers, _compact.compact_layers_,
                    _archive_mass.retained_lse, _archive_mass.retained_mass,
                    _archive_mass.bars, _archive_mass.archive_ratio, _brightness.attention_column_mass_heads)

CPU_OPERATOR = dataclasses.replace(REFERENCE, name="cpu-operator",
                                   attention_column_mass=_decode_mass.attention_column_mass,
                                   attention_column_mass_and_update=_decode_mass.attention_column_mass_and_update,
                                   attention_column_mass_heads=_decode_mass.attention_column_mass_heads,
                                   decode_attention=_decode_attention.decode_attention)
"""The reference, with a decode row's column mass computed by the C++ operators of `halo._C` (halo.decode_mass),
and a plain decode row's attention output with it (halo.decode_attention)."""


def _triton_module() -> ModuleType | None:
    """halo_kernels when its kernels can run here (Triton importable and CUDA, or the interpreter), else None."""
    try:
        import halo_kernels
    except ImportError:
        return None
    return halo_kernels if halo_kernels.available() else None


def select_backend(kernels: str, device: torch.device) -> Backend:
    """The backend a cache on `device` uses for HaloConfig.kernels = `kernels`.

    `auto` takes the Triton kernels for CUDA devices when they can run, on CPU the reference with the compiled
    decode operator when `halo._C` is built, and the reference otherwise;
    `reference` always the reference; `triton` the kernels or a RuntimeError saying why they cannot run.
    """
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {kernels!r}")
    if kernels == "reference":
        return REFERENCE
    module = _triton_module()
    if kernels == "triton":
        if module is None:
            raise RuntimeError("kernels='triton' but the Triton kernels cannot run here (no CUDA device, Triton "
                               "missing, and TRITON_INTERPRET is not set)")
        return Backend.from_module("triton", module)
    if torch.device(device).type == "cuda" and module is not None:
        return Backend.from_module("triton", module)
    if torch.device(device).type == "cpu" and _decode_mass.operator_available():
        return CPU_OPERATOR
    return REFERENCE
