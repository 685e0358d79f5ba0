"""Victim selection: the k dimmest unprotected slots, as one composite-key kernel and one device sort.

Twin of `halo.cull.select_victims`: the same victims in the same order (lowest score first, equal scores by
lowest position, equal positions by lowest slot; protected slots rank last, as +inf). The reference sorts
twice (positions, then scores). Here `_victim_key_kernel` packs both sort keys into one int64 per slot,

    key = order32(score) << 32 | position          (position in [0, 2**32))

where `order32` maps a float32 to an int32 with the same order (-0.0 folded into +0.0, NaN after +inf, as
torch.sort orders them), and a single stable `torch.sort` of the n_valid keys finishes the job (ties on the
key fall back to slot order, exactly as in the reference). No host synchronisation: k is a host int and the
output has a fixed length k.

Positions must lie in [0, 2**32) (4.29e9 tokens); positions beyond that tie-break modulo 2**32.

`cull_scores` (twin of `halo.cull.cull_scores`) lives in `scores.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv, check_device


@triton.jit
def _victim_key_kernel(scores_ptr, positions_ptr, protected_ptr, keys_ptr, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    score = tl.load(scores_ptr + idx, mask=ok, other=0.0)
    guarded = tl.load(protected_ptr + idx, mask=ok, other=0) != 0
    score = tl.where(guarded, float("inf"), score)
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 ties with +0.0, as in torch.sort
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order == signed int order
    ordered = tl.where(score != score, 0x7FC00000, ordered)  # every NaN sorts after +inf
    position = tl.load(positions_ptr + idx, mask=ok, other=0).to(tl.int64)
    low = position - ((position >> 32) << 32)  # position mod 2**32, in the low half
    key = (ordered.to(tl.int64) << 32) + low
    tl.store(keys_ptr + idx, key, mask=ok)


def victim_keys(scores: torch.Tensor, positions: torch.Tensor, protected: torch.Tensor, n_valid: int) -> torch.Tensor:
    """int64 [n_valid]: the composite sort key of every retained slot (see the module docstring).

    scores float32, positions int64, protected bool: contiguous, at least n_valid slots each, one device.
    """
    keys = torch.empty(n_valid, dtype=torch.int64, device=scores.device)
    if n_valid:
        block = 1024
        _victim_key_kernel[(cdiv(n_valid, block),)](scores, positions, protected.view(torch.uint8), keys, n_valid,
                                                    BLOCK=block)
    return keys


def select_victims(scores: torch.Tensor, positions: torch.Tensor, protected: torch.Tensor, n_valid: int,
                   k: int) -> torch.Tensor:
    """int64 [k]: the k unprotected slots with the lowest score, ties by lowest position, sorted by (score, position).

    Args:
        scores: float32 [>= n_valid] cull scores (lower dies first).
        positions: int64 [>= n_valid] absolute positions, in [0, 2**32).
        protected: bool [>= n_valid]; protected slots are never chosen while k <= unprotected slots.
        n_valid: retained slots; k: victims wanted, 0 <= k <= n_valid (host ints; k <= unprotected is the
            caller's contract, as in the reference).
    """
    op = "select_victims"
    if not isinstance(k, int) or not isinstance(n_valid, int) or k < 0 or k > n_valid:
        raise ValueError(f"{op}: cannot select {k} victims among {n_valid} slots")
    for name, tensor, dtype in (("scores", scores, torch.float32), ("positions", positions, torch.int64),
                                ("protected", protected, torch.bool)):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tensor.dim() != 1 or tensor.numel() < n_valid:
            raise ValueError(f"{op}: {name} must be a {dtype} vector of at least {n_valid} slots, got "
                             f"{getattr(tensor, 'dtype', type(tensor))} {tuple(getattr(tensor, 'shape', ()))}")
    device = check_device(op, scores=scores, positions=positions, protected=protected)
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    keys = victim_keys(scores[:n_valid].contiguous(), positions[:n_valid].contiguous(),
                       protected[:n_valid].contiguous(), n_valid)
    return torch.sort(keys, stable=True).indices[:k]


__all__ = ["select_victims", "victim_keys"]
