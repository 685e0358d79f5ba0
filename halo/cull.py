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


def unit_means(scores: torch.Tensor, units: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """float32 [n]: `scores` with every slot of a pooled unit holding the mean score of that unit's slots.

    Mean pooling scores a log or tool line by what its tokens earned on average, so a long line is not kept alive
    by its single best token (with `amax`, the more tokens a line has, the more likely one of them is bright).
    `select_unit_victims` then reads that mean as the unit's best score. Slots with `pooled` False or unit -1 keep
    their own score. Sort-based and the same size throughout: no host synchronisation.

    Args:
        scores: float32 [n]; units: int64 [n] unit id per slot (-1 for plain tokens); pooled: bool [n]. Or all
        three [L, n] (per-layer memory): every row is pooled on its own.
    """
    if scores.dim() == 2:  # per-layer memory [L, n]: each layer pools its own copy of a unit
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None]
        width = units.max().clamp(min=0) + 1 if units.numel() else 1
        keyed = torch.where(units >= 0, units + rows * width, -1)
        return unit_means(scores.reshape(-1), keyed.reshape(-1), pooled.reshape(-1)).view_as(scores)
    n = scores.numel()
    if n == 0:
        return scores.clone()
    key = torch.where(pooled & (units >= 0), units, -1)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    segment = torch.cumsum(torch.cat([sorted_key.new_zeros(1), (sorted_key[1:] != sorted_key[:-1]).long()]), 0)
    sums = torch.zeros(n, dtype=torch.float64, device=scores.device).index_add_(0, segment, scores[order].double())
    counts = torch.zeros(n, dtype=torch.float64, device=scores.device).index_add_(
        0, segment, torch.ones(n, dtype=torch.float64, device=scores.device))
    means = (sums / counts)[segment].to(scores.dtype)
    out = scores.clone()
    out[order] = torch.where(sorted_key >= 0, means, scores[order])
    return out


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


def select_unit_victims(scores: torch.Tensor, positions: torch.Tensor, brightness: torch.Tensor,
                        protected: torch.Tensor, units: torch.Tensor, need: int, threshold: float | None
                        ) -> torch.Tensor:
    """int64 [k] victims when some retained slots belong to units: a unit lives and dies whole.

    A unit scores as its best-scoring token (a policy that pools a unit otherwise gives all its tokens the
    unit's score first: HaloPolicy gives every token of a log or tool line the line's mean, `unit_means`), counts
    as bright as its brightest token and is protected when any of its tokens is. Units (a plain token is a unit of
    its own) die in the order of their first slot in
    `select_victims` order (score, then position) until `need` slots are chosen; with `threshold`, every
    unprotected unit whose brightness is at most it dies too. Only when the units protected whole leave fewer
    than `need` slots (a budget too small for the protected set and the words or lines around its edges) are
    such units cut, at their own unprotected tokens, dimmest first. Victims come unit by unit in that order,
    each unit's slots in slot order. Vectorised; one host read of the count.

    Args:
        scores: float32 [n] cull scores; positions: int64 [>= n]; brightness: float32 [n];
        protected: bool [n]; units: int64 [n] unit id per slot (-1 for plain tokens); need: slots to free.
    Raises RuntimeError if fewer than `need` slots are unprotected.
    """
    n = units.numel()
    device = units.device
    if n == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    slot = torch.arange(n, device=device)
    key = torch.where(units >= 0, units, units.max().clamp(min=0) + 1 + slot)  # plain tokens: units of their own
    _, group = torch.unique(key, return_inverse=True)
    groups = int(group.max()) + 1 if n else 0
    best = torch.full((groups,), float("-inf"), device=device).scatter_reduce(0, group, scores[:n], "amax")
    brightest = torch.full((groups,), float("-inf"), device=device).scatter_reduce(0, group, brightness, "amax")
    guarded = torch.zeros(groups, dtype=torch.bool, device=device).scatter_reduce(0, group, protected, "amax")
    ranked = select_victims(best[group], positions, guarded[group], n, n)  # every slot, dying order first
    rank_of_slot = torch.empty(n, dtype=torch.int64, device=device)
    rank_of_slot[ranked] = slot
    first = torch.full((groups,), n, dtype=torch.int64, device=device).scatter_reduce(0, group, rank_of_slot, "amin")
    order = torch.argsort(first)  # groups in dying order
    sizes = torch.bincount(group, minlength=groups)[order]
    open_ = ~guarded[order]
    before = torch.cumsum(torch.where(open_, sizes, 0), 0) - torch.where(open_, sizes, 0)
    taken = open_ & (before < need)
    if threshold is not None:
        taken |= open_ & (brightest[order] <= threshold)
    group_rank = torch.empty(groups, dtype=torch.int64, device=device)
    group_rank[order] = torch.arange(groups, device=device)
    chosen_groups = torch.zeros(groups, dtype=torch.bool, device=device)
    chosen_groups[order[taken]] = True
    in_chosen = chosen_groups[group]
    victims = slot[in_chosen][torch.argsort(group_rank[group][in_chosen] * n + slot[in_chosen])]
    count = victims.numel()
    if count < need:  # units protected whole leave too little: cut them at their unprotected tokens
        own = (~protected & ~in_chosen)[ranked]
        extra = ranked[own][: need - count]
        victims = torch.cat([victims, extra])
    if victims.numel() < need:
        raise RuntimeError(f"cannot cull {need} tokens: only {victims.numel()} are unprotected")
    return victims


def unit_runs(victims: torch.Tensor, units: torch.Tensor, positions: torch.Tensor, sources: torch.Tensor,
              line_sources: set[int]) -> list[tuple[int, int, int]]:
    """(unit id, first position, last position) of each line unit among `victims` (the units of `line_sources`:
    word units and elision markers are left out), in victim order, for the markers that stand for culled lines."""
    runs: dict[int, list[int]] = {}
    for unit, position, source in zip(units[victims].tolist(), positions[victims].tolist(), sources[victims].tolist()):
        if unit >= 0 and source in line_sources:
            span = runs.setdefault(unit, [position, position])
            span[0], span[1] = min(span[0], position), max(span[1], position)
    return [(unit, first, last) for unit, (first, last) in runs.items()]
