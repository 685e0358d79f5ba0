"""Per-layer victim selection: the k dimmest unprotected slots of every layer, one key launch and one device sort.

Twin of `halo.layer_cull.select_victims_layers`: the same victims in the same order per row (lowest score first,
equal scores by lowest position, equal positions by lowest slot; protected slots rank as +inf). The reference
sorts every row twice (stable by position, then stable by the masked score, with a gather between). Here
`_victim_keys_layers_kernel` (grid: column blocks x L, any strides) packs both sort keys into one int64 per slot,

    key = order32(score) << 32 | min(position, 2**32 - 1)

with `order32` the order-preserving float32 -> int32 map of `victims.py` (-0.0 folded into +0.0, NaN after +inf,
as torch.sort orders them), and one stable `torch.sort(keys, dim=1)` finishes every row at once (ties on the key
fall back to slot order, exactly as in the reference). No host synchronisation: k is a host int and the output
is a fixed [L, k]. Cost: one elementwise launch over [L, n] and one segmented stable int64 sort (against the
reference's two segmented sorts, two gathers and a masked_fill).

Positions must be non-negative, and real positions below 2**32 - 1 (4.29e9 tokens). Larger positions saturate
to 2**32 - 1: `halo.layer_cull.FREE_POSITION` (2**62, in the free slots past a layer's count) therefore still
sorts after every real position, and free slots tie among themselves by slot, as in the reference.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device


@triton.jit
def _victim_keys_layers_kernel(
    scores_ptr, positions_ptr, protected_ptr, keys_ptr, n,
    stride_sl, stride_sc, stride_pl, stride_pc, stride_gl, stride_gc,
    BLOCK: tl.constexpr,
):
    layer = tl.program_id(1).to(tl.int64)
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    score = tl.load(scores_ptr + layer * stride_sl + idx * stride_sc, mask=ok, other=0.0)
    guarded = tl.load(protected_ptr + layer * stride_gl + idx * stride_gc, mask=ok, other=0) != 0
    score = tl.where(guarded, float("inf"), score)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in torch.sort
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order == signed int order
    ordered = tl.where(score != score, 0x7FC00000, ordered)  # every NaN sorts after +inf
    position = tl.load(positions_ptr + layer * stride_pl + idx * stride_pc, mask=ok, other=0).to(tl.int64)
    cap = tl.full([BLOCK], 0xFFFFFFFF, tl.int64)
    low = tl.minimum(tl.maximum(position, 0), cap)  # FREE_POSITION (2**62) saturates: still last
    key = (ordered.to(tl.int64) << 32) + low
    tl.store(keys_ptr + layer * n + idx, key, mask=ok)


def victim_keys_layers(scores: torch.Tensor, positions: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """int64 [L, n] (contiguous): the composite sort key of every slot of every layer (see the module docstring).

    scores float32, positions int64, protected bool, all [L, n] on one device, any strides (unchecked here).
    """
    layers, n = scores.shape
    keys = torch.empty(layers, n, dtype=torch.int64, device=scores.device)
    if layers and n:
        block = min(1024, triton.next_power_of_2(n))
        guarded = protected.view(torch.uint8)
        _victim_keys_layers_kernel[(cdiv(n, block), layers)](
            scores, positions, guarded, keys, n,
            *scores.stride(), *positions.stride(), *guarded.stride(),
            BLOCK=block,
        )
    return keys


def _check(scores, positions, protected, k) -> None:
    op = "select_victims_layers"
    if not isinstance(scores, torch.Tensor) or scores.dtype != torch.float32 or scores.dim() != 2:
        raise ValueError(f"{op}: scores must be a float32 [L, n] tensor, got "
                         f"{getattr(scores, 'dtype', type(scores))} {tuple(getattr(scores, 'shape', ()))}")
    shape = tuple(scores.shape)
    for name, tensor, dtype in (("positions", positions, torch.int64), ("protected", protected, torch.bool)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{op}: {name} must be a {dtype} tensor of scores's shape {shape}, got "
                             f"{getattr(tensor, 'dtype', type(tensor))} {tuple(getattr(tensor, 'shape', ()))}")
    if not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 0 or k > shape[1]:
        raise ValueError(f"{op}: cannot select {k!r} victims among {shape[1]} slots per layer")
    check_device(op, scores=scores, positions=positions, protected=protected)


def select_victims_layers(scores: torch.Tensor, positions: torch.Tensor, protected: torch.Tensor, k: int
                          ) -> torch.Tensor:
    """int64 [L, k]: per layer, the k unprotected slots with the lowest score, ties by position, in dying order.

    Args:
        scores: float32 [L, n] cull scores (lower dies first); any strides.
        positions: int64 [L, n] absolute positions, non-negative, real ones below 2**32 - 1 (free slots may hold
            `FREE_POSITION`); any strides.
        protected: bool [L, n]; free slots past a layer's count must be protected; any strides.
        k: victims per layer (host int), 0 <= k <= n; k <= unprotected slots of every layer is the caller's
            contract, as in the reference (not checked: that would need a host sync).
    Raises ValueError naming the problem (dtype, shape, k, device). No host synchronisation.
    """
    _check(scores, positions, protected, k)
    k = int(k)
    layers = scores.shape[0]
    if k == 0 or layers == 0:
        return torch.empty(layers, k, dtype=torch.int64, device=scores.device)
    keys = victim_keys_layers(scores, positions, protected)
    return torch.sort(keys, dim=1, stable=True).indices[:, :k].contiguous()


__all__ = ["select_victims_layers", "victim_keys_layers"]
