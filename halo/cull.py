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


def select_unit_victims(scores: torch.Tensor, positions: torch.Tensor, brightness: torch.Tensor,
                        protected: torch.Tensor, units: torch.Tensor, need: int, threshold: float | None
                        ) -> tuple[list[int], list[int], dict[int, list[int]]]:
    """Victims when some retained slots belong to units (host path): a unit lives and dies whole.

    A unit scores as its best-scoring token, counts as bright as its brightest token and is protected when any
    of its tokens is. Slots die in `select_victims` order (score, then position) until `need` slots are chosen;
    with `threshold`, every unprotected slot (or unit) whose brightness is at most it dies too. Only when the
    units protected whole leave fewer than `need` slots (a budget too small for the protected set and the
    words or lines around its edges) are such units cut, at their own unprotected tokens, dimmest first.

    Args:
        scores: float32 [n] cull scores; positions: int64 [>= n]; brightness: float32 [n];
        protected: bool [n]; units: int64 [n] unit id per slot (-1 for plain tokens); need: slots to free.
    Returns:
        (victim slots, culled unit ids, unit id -> its retained slots). RuntimeError if fewer than `need`
        slots are unprotected.
    """
    n = units.numel()
    own_protected_l = protected.tolist()
    scores, brightness, protected = scores[:n].clone(), brightness.clone(), protected.clone()
    in_unit = units >= 0
    if bool(in_unit.any()):
        ids, inverse = torch.unique(units[in_unit], return_inverse=True)
        best = torch.full((ids.numel(),), float("-inf"), device=scores.device).scatter_reduce(0, inverse, scores[in_unit], "amax")
        brightest = torch.zeros(ids.numel(), device=scores.device).scatter_reduce(0, inverse, brightness[in_unit], "amax")
        guarded = torch.zeros(ids.numel(), dtype=torch.bool, device=scores.device).scatter_reduce(0, inverse, protected[in_unit], "amax")
        scores[in_unit] = best[inverse]
        brightness[in_unit] = brightest[inverse]
        protected[in_unit] = guarded[inverse]
    ranked = select_victims(scores, positions, protected, n, n).tolist()  # every slot, dying order first
    units_l, protected_l, bright_l = units.tolist(), protected.tolist(), brightness.tolist()
    members: dict[int, list[int]] = {}
    for slot, unit in enumerate(units_l):
        if unit >= 0:
            members.setdefault(unit, []).append(slot)
    chosen: list[int] = []
    culled: list[int] = []
    taken: set[int] = set()
    for slot in ranked:
        if protected_l[slot]:
            break  # protected slots rank last
        neglected = threshold is not None and bright_l[slot] <= threshold
        if len(chosen) >= need and not neglected:
            if threshold is None:
                break
            continue
        unit = units_l[slot]
        if unit < 0:
            chosen.append(slot)
        elif unit not in taken:
            taken.add(unit)
            culled.append(unit)
            chosen.extend(members[unit])
    if len(chosen) < need:  # units protected whole leave too little: cut them at their unprotected tokens
        taken_slots = set(chosen)
        for slot in ranked:
            if len(chosen) >= need:
                break
            if not own_protected_l[slot] and slot not in taken_slots:
                chosen.append(slot)
    if len(chosen) < need:
        raise RuntimeError(f"cannot cull {need} tokens: only {len(chosen)} are unprotected")
    return chosen, culled, members


def unit_runs(unit_ids: list[int], members: dict[int, list[int]], positions: torch.Tensor, sources: torch.Tensor,
              line_sources: set[int]) -> list[tuple[int, int, int]]:
    """(unit id, first position, last position) of each culled line unit (the units of `line_sources`: word units
    and elision markers are left out), for the markers that stand for culled lines."""
    sources_l, positions_l = sources.tolist(), positions.tolist()
    runs = []
    for unit in unit_ids:
        slots = members[unit]
        if sources_l[slots[0]] in line_sources:
            pos = [positions_l[s] for s in slots]
            runs.append((unit, min(pos), max(pos)))
    return runs
