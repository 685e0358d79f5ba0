"""Cull: which retained slots die when the cache is over budget (reference path).

The cull score of a slot is its brightness biased toward dark regions:

    score[j] = b[j] + dark_bias * mean(b of the up-to-`radius` retained neighbours on each side of j)

with neighbours taken in position order (slot order is not position order once compaction has filled holes
from the tail). A dim token in a dim neighbourhood scores lowest and goes first, so forgetting carves out
whole dark regions instead of peppering bright text with holes. Protected slots never die. Ties break by
position, oldest first, so the choice is deterministic. `halo_kernels.victims` is the fused twin.
"""

from __future__ import annotations

import torch


def position_order(positions: torch.Tensor, n_valid: int) -> torch.Tensor:
    """int64 [n_valid]: slot indices of the first n_valid slots sorted by position (stable)."""
    return torch.sort(positions[:n_valid], stable=True).indices


def cull_scores(brightness: torch.Tensor, positions: torch.Tensor, n_valid: int, dark_bias: float, radius: int) -> torch.Tensor:
    """float32 [n_valid]: per-slot cull score (lower dies first), indexed by slot.

    Args:
        brightness: float32 [C]; positions: int64 [C]; only the first n_valid slots are read.
        dark_bias: weight of the neighbourhood mean; radius: neighbours on each side, in position order.
    """
    b = brightness[:n_valid]
    if dark_bias == 0.0 or radius == 0 or n_valid <= 1:
        return b.clone()
    order = position_order(positions, n_valid)
    ordered = b[order]
    prefix = torch.nn.functional.pad(torch.cumsum(ordered.double(), 0), (1, 0))
    idx = torch.arange(n_valid, device=b.device)
    lo = (idx - radius).clamp(min=0)
    hi = (idx + radius + 1).clamp(max=n_valid)
    neighbour_sum = prefix[hi] - prefix[lo] - ordered.double()
    neighbour_count = (hi - lo - 1).clamp(min=1)
    mean = (neighbour_sum / neighbour_count).float()
    scores = torch.empty_like(b)
    scores[order] = ordered + dark_bias * mean
    return scores


def select_victims(scores: torch.Tensor, positions: torch.Tensor, protected: torch.Tensor, n_valid: int, k: int) -> torch.Tensor:
    """int64 [k]: the k unprotected slots with the lowest score, ties by lowest position, sorted by (score, position).

    Args:
        scores: float32 [n_valid] (or longer) cull scores; positions: int64 [C]; protected: bool [C].
        n_valid: retained slots; k: victims wanted, 0 <= k <= number of unprotected slots.
    Never synchronises with the host: the caller knows k.
    """
    if k < 0 or k > n_valid:
        raise ValueError(f"cannot select {k} victims among {n_valid} slots")
    order = position_order(positions, n_valid)
    keyed = scores[:n_valid].masked_fill(protected[:n_valid], float("inf"))[order]
    ranked = torch.sort(keyed, stable=True).indices[:k]
    return order[ranked]
