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

from .layer_cull import cull_scores_layers, select_unit_victims_layers, select_victims_layers


def position_order(positions: torch.Tensor, n_valid: int) -> torch.Tensor:
    """int64 [n_valid]: slot indices of the first n_valid slots sorted by position (stable)."""
    return torch.sort(positions[:n_valid], stable=True).indices


def cull_scores(brightness: torch.Tensor, positions: torch.Tensor, n_valid: int, dark_bias: float, radius: int) -> torch.Tensor:
    """float32 [n_valid]: per-slot cull score (lower dies first), indexed by slot.

    The per-layer rule (`halo.layer_cull.cull_scores_layers`) on one row of n_valid slots.

    Args:
        brightness: float32 [C]; positions: int64 [C]; only the first n_valid slots are read.
        dark_bias: weight of the neighbourhood mean; radius: neighbours on each side, in position order.
    """
    counts = torch.full((1,), n_valid, dtype=torch.int64, device=brightness.device)
    return cull_scores_layers(brightness[None, :n_valid], positions[None, :n_valid], counts, dark_bias, radius)[0]


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
    Never synchronises with the host: the caller knows k. The per-layer rule (`select_victims_layers`) on one row.
    """
    if k < 0 or k > n_valid:
        raise ValueError(f"cannot select {k} victims among {n_valid} slots")
    return select_victims_layers(scores[None, :n_valid], positions[None, :n_valid], protected[None, :n_valid], k)[0]


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
    each unit's slots in slot order. The per-layer implementation (`halo.layer_cull.select_unit_victims_layers`)
    on one row: vectorised, with a few host reads of counts.

    Args:
        scores: float32 [n] cull scores; positions: int64 [>= n]; brightness: float32 [n];
        protected: bool [n]; units: int64 [n] unit id per slot (-1 for plain tokens); need: slots to free.
    Raises RuntimeError if fewer than `need` slots are unprotected.
    """
    n = units.numel()
    need_row = torch.full((1,), need, dtype=torch.int64, device=units.device)
    return select_unit_victims_layers(scores[None, :n], positions[None, :n], brightness[None, :n], protected[None, :n],
                                      units[None, :n], need_row, threshold)[0]


def unit_runs(units: torch.Tensor, positions: torch.Tensor, sources: torch.Tensor,
              line_sources: set[int]) -> list[tuple[int, int, int]]:
    """(unit id, first position, last position) of each line unit among culled tokens (the units of
    `line_sources`: word units and elision markers are left out), in the order given, for the markers that stand
    for culled lines.

    Args:
        units, positions, sources: int64 [k] of the culled tokens, in victim order.
    """
    runs: dict[int, list[int]] = {}
    for unit, position, source in zip(units.tolist(), positions.tolist(), sources.tolist()):
        if unit >= 0 and source in line_sources:
            span = runs.setdefault(unit, [position, position])
            span[0], span[1] = min(span[0], position), max(span[1], position)
    return [(unit, first, last) for unit, (first, last) in runs.items()]
