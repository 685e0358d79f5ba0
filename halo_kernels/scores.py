"""Cull scores: brightness biased toward dark neighbourhoods, neighbours taken in position order.

Twin of `halo.cull.cull_scores`:

    score[j] = b[j] + dark_bias * mean(b of the up-to-`radius` retained neighbours on each side of j)

Slot order is not position order after compaction, so the position order is one stable device sort of the
positions (as in the reference); `_cull_scores_kernel` then reads each slot's 2 * radius neighbours through that
order (sums in fp64, like the reference's fp64 prefix sums) and scatters the score back to the slot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device


@triton.jit
def _cull_scores_kernel(bright_ptr, order_ptr, out_ptr, n, radius, dark_bias, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # index in position order
    ok = i < n
    slot = tl.load(order_ptr + i, mask=ok, other=0)
    centre = tl.load(bright_ptr + slot, mask=ok, other=0.0)
    total = tl.zeros([BLOCK], tl.float64)
    for d in range(1, radius + 1):
        left = i - d
        right = i + d
        left_ok = ok & (left >= 0)
        right_ok = ok & (right < n)
        left_slot = tl.load(order_ptr + left, mask=left_ok, other=0)
        right_slot = tl.load(order_ptr + right, mask=right_ok, other=0)
        total += tl.load(bright_ptr + left_slot, mask=left_ok, other=0.0).to(tl.float64)
        total += tl.load(bright_ptr + right_slot, mask=right_ok, other=0.0).to(tl.float64)
    lo = tl.maximum(i - radius, 0)
    hi = tl.minimum(i + radius + 1, n)
    count = tl.maximum(hi - lo - 1, 1)
    mean = (total / count.to(tl.float64)).to(tl.float32)
    tl.store(out_ptr + slot, centre + dark_bias * mean, mask=ok)


def cull_scores(brightness: torch.Tensor, positions: torch.Tensor, n_valid: int, dark_bias: float,
                radius: int) -> torch.Tensor:
    """float32 [n_valid]: per-slot cull score (lower dies first), indexed by slot.

    Args:
        brightness: float32 [>= n_valid]; positions: int64 [>= n_valid]; only the first n_valid slots are read.
        dark_bias: weight of the neighbourhood mean; radius: neighbours on each side, in position order (>= 0).
    """
    op = "cull_scores"
    if not isinstance(n_valid, int) or n_valid < 0:
        raise ValueError(f"{op}: n_valid must be a non-negative int, got {n_valid!r}")
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"{op}: radius must be a non-negative int, got {radius!r}")
    for name, tensor, dtype in (("brightness", brightness, torch.float32), ("positions", positions, torch.int64)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.dim() != 1 or tensor.numel() < n_valid:
            raise ValueError(f"{op}: {name} must be a {dtype} vector of at least {n_valid} slots, got "
                             f"{getattr(tensor, 'dtype', type(tensor))} {tuple(getattr(tensor, 'shape', ()))}")
    check_device(op, brightness=brightness, positions=positions)
    b = brightness[:n_valid]
    if dark_bias == 0.0 or radius == 0 or n_valid <= 1:
        return b.clone()
    order = torch.sort(positions[:n_valid], stable=True).indices
    out = torch.empty_like(b)
    block = 512
    _cull_scores_kernel[(cdiv(n_valid, block),)](b.contiguous(), order, out, n_valid, min(radius, n_valid), float(dark_bias),
                                                 BLOCK=block)
    return out


__all__ = ["cull_scores"]
