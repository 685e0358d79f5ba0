"""Bars: a quantile of each row, read by a bitwise search instead of a sort, for recall's bars.

Twin of `halo.archive_mass.bars`: for each row of float32 [..., n] the `quantile` quantile along the last dim
with `torch.quantile`'s linear interpolation, clamped to at least `minimum`. One launch, one program per row,
no host sync, nothing sorted.

Each value maps to a 32-bit key with the same order (the float's bits, negatives' low 31 bits flipped, shifted to
[0, 2**32)). With `rank = quantile * (n - 1)` and `below = floor(rank)`, the program finds the (below + 1)-th
smallest key bit by bit, from the top: a candidate stays when fewer than below + 1 keys lie under it, 32 passes
of a compare and a count over the row. The next order statistic is that value again when more than below + 1
keys are at most it, else the smallest value above it (one more pass). A row of up to MAX_BLOCK values is
loaded once and searched in registers; longer rows are walked in MAX_BLOCK chunks at every pass. On CUDA
`torch.kthvalue` took about 15 us a call on the H200 (four per retrieval layer in a recall scoring, most of its
GPU time); this is one launch for all rows.

NaN is not ordered here (recall's masses are finite); the reference would propagate it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_device, next_power_of_2

@triton.jit
def _order_key(x):
    """int64 in [0, 2**32) with the order of float32 x."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return ordered.to(tl.int64) + 2147483648


@triton.jit
def _count_under(row_ptr, n, stride_c, bound, BLOCK: tl.constexpr):
    """How many keys of a row longer than BLOCK lie strictly under `bound` (walked in BLOCK chunks)."""
    total = 0
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n
        x = tl.load(row_ptr + cols.to(tl.int64) * stride_c, mask=ok, other=0.0)
        total += tl.sum((ok & (_order_key(x) < bound)).to(tl.int32), axis=0)
    return total


@triton.jit
def _bars_kernel(x_ptr, out_ptr, n, stride_r, stride_c, below, frac, minimum, BLOCK: tl.constexpr,
                 CHUNKED: tl.constexpr):
    row_ptr = x_ptr + tl.program_id(0).to(tl.int64) * stride_r
    cols = tl.arange(0, BLOCK)
    ok = cols < n
    x = tl.load(row_ptr + cols.to(tl.int64) * stride_c, mask=ok, other=0.0)  # the whole row unless CHUNKED
    keys = _order_key(x)
    # the (below + 1)-th smallest key: the largest key with at most `below` keys under it, bit by bit
    key = tl.zeros([], tl.int64)
    for i in range(32):
        candidate = key | (tl.full([], 1, tl.int64) << (31 - i))
        if CHUNKED:
            under = _count_under(row_ptr, n, stride_c, candidate, BLOCK)
        else:
            under = tl.sum((ok & (keys < candidate)).to(tl.int32), axis=0)
        key = tl.where(under <= below, candidate, key)
    # its value, how many keys are at most it, and the smallest value above it
    at_most = 0
    above = float("inf")
    low = -float("inf")
    if CHUNKED:
        stop = n
    else:
        stop = 1  # one pass over the row already in registers
    for start in range(0, stop, BLOCK):
        if CHUNKED:
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n
            x = tl.load(row_ptr + cols.to(tl.int64) * stride_c, mask=ok, other=0.0)
            keys = _order_key(x)
        at_most += tl.sum((ok & (keys <= key)).to(tl.int32), axis=0)
        above = tl.minimum(above, tl.min(tl.where(ok & (keys > key), x, float("inf")), axis=0))
        low = tl.maximum(low, tl.max(tl.where(ok & (keys == key), x, -float("inf")), axis=0))
    high = tl.where(at_most > below + 1, low, above)  # +inf only when frac is 0 (no order statistic after it)
    gap = tl.where(frac > 0.0, high - low, 0.0)
    value = low + gap * frac
    tl.store(out_ptr + tl.program_id(0), tl.maximum(value, minimum))


MAX_BLOCK = 8192
"""Rows up to this long are held in registers for all 33 passes; longer rows are walked in chunks of it, one program
per row reading the row 33 times (not yet timed on a GPU: for a single row of 100k values that is 13 MB of reads
on one SM, where `torch.kthvalue` may be faster)."""


def bars(values: torch.Tensor, quantile: float, minimum: float) -> torch.Tensor:
    """float32 [...]: the `quantile` quantile of float32 [..., n] along the last dim (`torch.quantile`'s linear
    interpolation), at least `minimum`. One launch, no host sync; a new tensor on the values' device.

    Args:
        values: float32 [..., n], n >= 1, any strides; finite. quantile: in [0, 1]; minimum: host float.
    Raises ValueError naming the problem (dtype, empty rows, quantile out of range, device).
    """
    if not isinstance(values, torch.Tensor) or values.dtype != torch.float32 or values.dim() == 0:
        raise ValueError(f"bars: values must be a float32 [..., n] tensor, got "
                         f"{getattr(values, 'dtype', type(values).__name__)} {tuple(getattr(values, 'shape', ()))}")
    n = values.shape[-1]
    if n == 0:
        raise ValueError("bars: values have no entries along the last dim (n must be at least 1)")
    if not 0.0 <= float(quantile) <= 1.0:
        raise ValueError(f"bars: quantile must lie in [0, 1], got {quantile}")
    check_device("bars", values=values)
    rows = values.reshape(-1, n) if values.dim() != 2 else values
    out = torch.empty(rows.shape[0], dtype=torch.float32, device=values.device)
    if rows.shape[0] == 0:
        return out.view(values.shape[:-1])
    rank = float(quantile) * (n - 1)
    below = min(int(rank), n - 1)
    block = min(MAX_BLOCK, next_power_of_2(n))
    _bars_kernel[(rows.shape[0],)](rows, out, n, rows.stride(0), rows.stride(1), below, rank - below,
                                   float(minimum), BLOCK=block, CHUNKED=n > block,
                                   num_warps=4 if block <= 2048 else 8)
    return out.view(values.shape[:-1])


__all__ = ["bars"]
