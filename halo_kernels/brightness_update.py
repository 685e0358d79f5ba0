"""Brightness update: one elementwise launch over the slots a forward's rows saw.

Twin of `halo.brightness.update_brightness`:

    brightness[j] = clamp(brightness[j] + mass[j] * alpha / num_layers - decay[j] * tics[j], 0, 255)
    tics[j]       = T - max(0, j - n_past)          for j < n_past + T

(`attention_column_mass_and_update` in `column_mass.py` fuses the same update into the last layer's pass.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device

MAX_BRIGHTNESS = tl.constexpr(255.0)


@triton.jit
def brightness_step(bright, mass, decay, cols, n_past, T, gain):
    """The update rule on one block of slots (shared with the fused last-layer pass of column_mass)."""
    tics = (T - tl.maximum(cols - n_past, 0)).to(tl.float32)
    bright = bright + mass * gain - decay * tics
    return tl.minimum(tl.maximum(bright, 0.0), MAX_BRIGHTNESS)


@triton.jit
def _update_brightness_kernel(bright_ptr, mass_ptr, decay_ptr, n_past, T, gain, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < n_past + T
    bright = tl.load(bright_ptr + cols, mask=ok, other=0.0)
    mass = tl.load(mass_ptr + cols, mask=ok, other=0.0)
    decay = tl.load(decay_ptr + cols, mask=ok, other=0.0)
    tl.store(bright_ptr + cols, brightness_step(bright, mass, decay, cols, n_past, T, gain), mask=ok)


def update_brightness(brightness: torch.Tensor, mass: torch.Tensor, decay: torch.Tensor, n_past: int, t_rows: int,
                      alpha: float, num_layers: int) -> None:
    """Apply one forward's brightness update in place on slots `0 .. n_past + t_rows - 1`.

    Args:
        brightness: float32 [C] contiguous per-slot brightness (newborn slots hold their initial value).
        mass: float32 [>= n_past + t_rows] attention mass summed over layers.
        decay: float32 [>= n_past + t_rows] per-slot decay per tic (0 for pinned sources).
        n_past, t_rows: retained slots before the forward and rows in it (host ints).
        alpha: gain on normalised attention; num_layers: layers summed into `mass`.
    """
    op = "update_brightness"
    n = n_past + t_rows
    if n_past < 0 or t_rows < 0:
        raise ValueError(f"{op}: n_past ({n_past}) and t_rows ({t_rows}) must be non-negative")
    if num_layers <= 0:
        raise ValueError(f"{op}: num_layers must be positive, got {num_layers}")
    for name, tensor in (("brightness", brightness), ("mass", mass), ("decay", decay)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32 or tensor.dim() != 1 or tensor.numel() < n:
            raise ValueError(f"{op}: {name} must be a float32 vector of at least {n} slots, got "
                             f"{getattr(tensor, 'dtype', type(tensor))} {tuple(getattr(tensor, 'shape', ()))}")
        if n > 1 and tensor.stride(0) != 1:
            raise ValueError(f"{op}: {name} must be contiguous (stride 1), got stride {tensor.stride(0)}")
    check_device(op, brightness=brightness, mass=mass, decay=decay)
    if n == 0:
        return
    block = 1024
    _update_brightness_kernel[(cdiv(n, block),)](brightness, mass, decay, n_past, t_rows, float(alpha) / num_layers,
                                                 BLOCK=block)


__all__ = ["update_brightness"]
