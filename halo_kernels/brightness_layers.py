"""Per-layer brightness update: one elementwise launch over the [L, n] slots of a per-layer memory.

Twin of `halo.brightness.update_brightness_layers`: every layer l updates its own row with its own `n_past[l]`,

    brightness[l, j] = clamp(brightness[l, j] + mass[l, j] * alpha - decay[l, j] * tics[l, j], 0, 255)
    tics[l, j]       = max(0, T - max(0, j - n_past[l]))

on every column j < n (past a layer's slots tics is 0, so only `mass * alpha` is added there, as in the
reference). The grid is (column blocks, L); `n_past` is read on the device, so no host synchronisation.

Bit-exact with the reference: the same fp32 operations in the same order, and the launch disables FMA
contraction (`enable_fp_fusion=False`) so `b + mass * alpha` is rounded twice on CUDA too, as PyTorch does; the
clamp propagates NaN like `torch.clamp`.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device

MAX_BRIGHTNESS = tl.constexpr(255.0)


@triton.jit
def _update_brightness_layers_kernel(
    bright_ptr, mass_ptr, decay_ptr, n_past_ptr, n, T, alpha,
    stride_bl, stride_bc, stride_ml, stride_mc, stride_dl, stride_dc,
    BLOCK: tl.constexpr,
):
    layer = tl.program_id(1).to(tl.int64)
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n
    n_past = tl.load(n_past_ptr + layer)
    b_ptrs = bright_ptr + layer * stride_bl + cols * stride_bc
    bright = tl.load(b_ptrs, mask=ok, other=0.0)
    mass = tl.load(mass_ptr + layer * stride_ml + cols * stride_mc, mask=ok, other=0.0)
    decay = tl.load(decay_ptr + layer * stride_dl + cols * stride_dc, mask=ok, other=0.0)
    tics = tl.maximum(T - tl.maximum(cols - n_past, 0), 0).to(tl.float32)
    bright = bright + mass * alpha
    bright = bright - decay * tics
    bright = tl.maximum(bright, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as in torch.clamp
    tl.store(b_ptrs, tl.minimum(bright, MAX_BRIGHTNESS, propagate_nan=tl.PropagateNan.ALL), mask=ok)


def _check(brightness, mass, decay, n_past, t_rows, alpha) -> None:
    op = "update_brightness_layers"
    if not isinstance(t_rows, numbers.Integral) or isinstance(t_rows, bool) or t_rows < 0:
        raise ValueError(f"{op}: t_rows must be a non-negative int, got {t_rows!r}")
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        raise ValueError(f"{op}: alpha must be a float, got {alpha!r}")
    if not isinstance(brightness, torch.Tensor) or brightness.dtype != torch.float32 or brightness.dim() != 2:
        raise ValueError(f"{op}: brightness must be a float32 [L, n] tensor, got "
                         f"{getattr(brightness, 'dtype', type(brightness))} {tuple(getattr(brightness, 'shape', ()))}")
    shape = tuple(brightness.shape)
    for name, tensor in (("mass", mass), ("decay", decay)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tuple(tensor.shape) != shape:
            raise ValueError(f"{op}: {name} must be a float32 tensor of brightness's shape {shape}, got "
                             f"{getattr(tensor, 'dtype', type(tensor))} {tuple(getattr(tensor, 'shape', ()))}")
    if not isinstance(n_past, torch.Tensor) or n_past.dtype != torch.int64 or tuple(n_past.shape) != shape[:1]:
        raise ValueError(f"{op}: n_past must be an int64 [L] tensor with L = {shape[0]}, got "
                         f"{getattr(n_past, 'dtype', type(n_past))} {tuple(getattr(n_past, 'shape', ()))}")
    check_device(op, brightness=brightness, mass=mass, decay=decay, n_past=n_past)


def update_brightness_layers(brightness: torch.Tensor, mass: torch.Tensor, decay: torch.Tensor,
                             n_past: torch.Tensor, t_rows: int, alpha: float) -> None:
    """Per-layer memory: apply one forward's brightness update to every layer's own slots, in place.

    Layer l's slot j: `b = clamp(b + alpha * mass[l, j] - decay[l, j] * rows_seeing_l(j), 0, 255)`, with
    `rows_seeing_l(j) = max(0, T - max(0, j - n_past[l]))` (0 past that layer's slots), on every column j < n.

    Args:
        brightness: float32 [L, n], updated in place (any strides: views of the first n columns are fine).
        mass, decay: float32 [L, n] (any strides); n >= max(n_past) + T is the caller's contract (not checked:
            that would need a host sync).
        n_past: int64 [L] on the same device: retained slots of each layer before the forward.
        t_rows: T, rows in the forward (host int); alpha: gain on each layer's attention (host float).
    Raises ValueError naming the problem (dtype, shape, device).
    """
    _check(brightness, mass, decay, n_past, t_rows, alpha)
    layers, n = brightness.shape
    if layers == 0 or n == 0:
        return
    block = min(1024, triton.next_power_of_2(n))
    _update_brightness_layers_kernel[(cdiv(n, block), layers)](
        brightness, mass, decay, n_past, n, int(t_rows), float(alpha),
        *brightness.stride(), *mass.stride(), *decay.stride(),
        BLOCK=block, enable_fp_fusion=False,
    )


__all__ = ["update_brightness_layers"]
