"""Whole-unit victims with the same count in every layer (one vLLM block table serves all layers of a request).

On Halo's Hugging Face path (halo.layered_cache) each layer frees its own `count - budget` slots by whole units
in dying order (`halo.layer_cull.select_word_victims_layers`); the unit that crosses the need dies whole, so a
layer may free a few slots more than it needed and holds fewer than `budget` until a later forward
(`layer_length`), each layer by its own amount. Inside vLLM every layer of a request must hold the same number
of slots, so the count is equalised upward:

1. each layer's *natural* count is what Halo's rule frees there: its open units (no token protected) in dying
   order until `need` slots are covered;
2. every layer frees K = the largest natural count: a layer takes its open units in dying order, each one that
   still fits in what is left of K (first fit), so a layer whose natural count is K frees exactly Halo's units,
   and the others add the next units in their dying order that fit (usually single-token words);
3. when some layer cannot reach K exactly (no open unit small enough is left), K grows by one and step 2 runs
   again; when K would pass what some layer can free at all, there is no whole-unit answer and the caller falls
   back to single tokens (`None`).

So no retained word or line is ever partial, every layer holds the same count, and that count is at most the
budget: `budget - count` is the *shortfall*, below the largest unit in practice (at most 23 tokens with words
only); the next steps refill it before culling again, as a layer's shortfall is refilled on the HF path.
The dying order is Halo's own: `select_word_victims_layers` with `threshold=inf` lists every open unit of each
layer in dying order (the threshold rule takes every open unit, and the need is 0).
"""

from __future__ import annotations

import torch

from halo.layer_cull import select_word_victims_layers


def open_units_in_dying_order(scores: torch.Tensor, order: torch.Tensor, brightness: torch.Tensor,
                              protected: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """int64 [R, m]: each row's open slots (in no unit with a protected token), unit by unit in dying order
    (a unit scores as its best token; ties by position), padded with -1.

    Args:
        scores, brightness: float32 [R, n]; order: int64 [R, n] each row's slots in position order;
        protected: bool [R, n]; units: int64 [R, n] (-1: a plain token, a unit of its own).
    """
    need = torch.zeros(scores.shape[0], dtype=torch.int64)
    return select_word_victims_layers(scores, order, brightness, protected, units, need, float("inf"))


def listed_runs(slots: torch.Tensor, units: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per row, the run (unit) index of each listed slot and the size of each run.

    Args:
        slots: int64 [R, m] from `open_units_in_dying_order`; units: int64 [R, n].
    Returns (run int64 [R, m], -1 on padding; sizes: per row int64 [runs in that row]).
    """
    valid = slots >= 0
    unit = torch.gather(units, 1, slots.clamp(min=0))
    starts = valid.clone()
    starts[:, 1:] &= (unit[:, 1:] != unit[:, :-1]) | (unit[:, 1:] < 0)
    run = torch.where(valid, torch.cumsum(starts.long(), 1) - 1, -1)
    sizes = [torch.bincount(row[row >= 0]) for row in run]
    return run, sizes


def first_fit(sizes: torch.Tensor, target: int) -> list[int] | None:
    """Indices of the runs taken in order, each one taken when it fits in what is left of `target`; None when
    no choice reaches `target` exactly this way.

    Args:
        sizes: int64 [runs] run sizes in dying order; target: slots to free (>= 0).
    """
    if target == 0:
        return []
    cum = torch.cumsum(sizes, 0)
    prefix = int(torch.searchsorted(cum, target, right=True))  # runs covered while the total stays <= target
    taken = list(range(prefix))
    room = target - (int(cum[prefix - 1]) if prefix else 0)
    for index, size in enumerate(sizes[prefix:].tolist(), start=prefix):
        if room == 0:
            break
        if size <= room:
            taken.append(index)
            room -= size
    return taken if room == 0 else None


def equal_unit_victims(scores: torch.Tensor, order: torch.Tensor, brightness: torch.Tensor,
                       protected: torch.Tensor, units: torch.Tensor, need: int) -> torch.Tensor | None:
    """int64 [R, K]: K >= need whole-unit victims in every row, each row's units in dying order (see the module
    docstring); None when whole units cannot give every row the same count.

    Args:
        scores, brightness: float32 [R, n]; order: int64 [R, n] (`position_order_layers`); protected: bool [R, n];
        units: int64 [R, n]; need: slots every row must free at least (>= 1).
    """
    slots = open_units_in_dying_order(scores, order, brightness, protected, units)
    run, sizes = listed_runs(slots, units)
    totals = [int(s.sum()) for s in sizes]
    if min(totals) < need:
        return None
    for target in range(max(natural_count(s, need) for s in sizes), min(totals) + 1):
        chosen = [first_fit(s, target) for s in sizes]
        if all(c is not None for c in chosen):  # `slots` lists units in dying order, and so do the rows
            return torch.stack([slots[r][torch.isin(run[r], torch.tensor(c, dtype=torch.int64))]
                                for r, c in enumerate(chosen)])
    return None


def natural_count(sizes: torch.Tensor, need: int) -> int:
    """Slots Halo's rule frees in one row: whole runs in dying order until `need` (<= sizes.sum()) is covered."""
    cum = torch.cumsum(sizes, 0)
    return int(cum[int(torch.searchsorted(cum, need))])
