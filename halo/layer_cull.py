"""Cull per layer: every layer of a per-layer memory (halo.layered_cache) ranks and culls its own slots.

The rules of `halo.cull`, applied to each layer's row at once (no loop over layers); `halo.cull`'s token-level
functions are these on a single row:

* `cull_scores_layers`: brightness plus `dark_bias` times the mean brightness of the +-radius neighbours in
  that layer's position order;
* `select_victims_layers`: the k lowest-scoring unprotected slots of every layer, ties by position;
* `select_unit_victims_layers`: units (words, lines) die whole within a layer, each layer freeing its own
  `need`, with the same fallback and threshold rules as `halo.cull.select_unit_victims`.

Shapes: L layers, n slot columns (the fullest layer's count; layer l's slots past its own count are invalid and
must be passed as protected, with `positions` holding `FREE_POSITION` there so position order puts them last).
"""

from __future__ import annotations

import torch

FREE_POSITION = 1 << 62
"""Position stored in the free slots of a layer's row: after every real position in position order."""


def position_order_layers(positions: torch.Tensor) -> torch.Tensor:
    """int64 [L, n]: each layer's slot indices sorted by position (stable)."""
    return torch.sort(positions, dim=1, stable=True).indices


def cull_scores_layers(brightness: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor, dark_bias: float,
                       radius: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [L, n]: `b + dark_bias * mean(b of the up-to-radius valid neighbours on each side)` per layer.

    Args:
        brightness: float32 [L, n]; positions: int64 [L, n] (FREE_POSITION in free slots);
        counts: int64 [L] valid slots per layer (the first counts[l] of each row).
        order: optional int64 [L, n] `position_order_layers(positions)`, when the caller has it already.
    Free slots get a score too; callers protect them.
    """
    b = brightness
    if dark_bias == 0.0 or radius == 0 or b.shape[1] <= 1:
        return b.clone()
    order = position_order_layers(positions) if order is None else order
    ordered = torch.gather(b, 1, order).double()
    prefix = torch.nn.functional.pad(torch.cumsum(ordered, 1), (1, 0))
    idx = torch.arange(b.shape[1], device=b.device)[None, :]
    valid = counts.to(b.device)[:, None]
    lo = (idx - radius).clamp(min=0).expand_as(ordered)
    hi = torch.minimum(idx + radius + 1, valid).clamp(min=0)
    hi = torch.maximum(hi, lo)
    neighbour_sum = torch.gather(prefix, 1, hi) - torch.gather(prefix, 1, lo) - ordered * (idx < valid)
    neighbour_count = (hi - lo - (idx < valid).long()).clamp(min=1)
    mean = (neighbour_sum / neighbour_count).float()
    return torch.empty_like(b).scatter_(1, order, ordered.float() + dark_bias * mean)


def select_victims_layers(scores: torch.Tensor, positions: torch.Tensor, protected: torch.Tensor, k: int
                          ) -> torch.Tensor:
    """int64 [L, k]: per layer, the k unprotected slots with the lowest score, ties by position, in dying order.

    Args:
        scores: float32 [L, n]; positions: int64 [L, n]; protected: bool [L, n]; k <= unprotected slots per layer.
    No host synchronisation.
    """
    if k < 0 or k > scores.shape[1]:
        raise ValueError(f"cannot select {k} victims among {scores.shape[1]} slots per layer")
    order = position_order_layers(positions)
    keyed = torch.gather(scores.masked_fill(protected, float("inf")), 1, order)
    ranked = torch.sort(keyed, dim=1, stable=True).indices[:, :k]
    return torch.gather(order, 1, ranked)


def _lexsort_layers(layer: torch.Tensor, score: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Indices of flat slots sorted by (layer, score, position)."""
    order = torch.argsort(position, stable=True)
    order = order[torch.argsort(score[order], stable=True)]
    return order[torch.argsort(layer[order], stable=True)]


def _segment_exclusive_cumsum(values: torch.Tensor, segment: torch.Tensor, segments: int) -> torch.Tensor:
    """Exclusive cumulative sum of `values` restarting at each segment (rows sorted by segment)."""
    inclusive = torch.cumsum(values, 0)
    totals = torch.zeros(segments, dtype=values.dtype, device=values.device).index_add_(0, segment, values)
    base = torch.cumsum(totals, 0) - totals
    return inclusive - values - base[segment]


def select_unit_victims_layers(scores: torch.Tensor, positions: torch.Tensor, brightness: torch.Tensor,
                               protected: torch.Tensor, units: torch.Tensor, need: torch.Tensor,
                               threshold: float | None) -> torch.Tensor:
    """int64 [L, m] victims per layer (padded with -1) when units are retained: a unit dies whole in a layer.

    Per layer: a unit (a plain token is a unit of its own) scores as its best-scoring token, is protected when
    any of its tokens is, and units die in dying order (score, then position) until that layer's `need[l]`
    slots are chosen; with `threshold`, every unprotected unit whose brightest token is at most it dies too.
    When the units protected whole leave fewer than `need[l]` slots, such units are cut at their unprotected
    tokens, dimmest first. Each row lists its victims unit by unit in dying order, then -1.

    Args:
        scores, brightness: float32 [L, n]; positions, units: int64 [L, n]; protected: bool [L, n] (free slots
        included, with unit -1); need: int64 [L] slots each layer must free (0 allowed).
    Raises RuntimeError naming the layer when fewer than `need[l]` of its slots are unprotected.
    """
    layers, n = scores.shape
    device = scores.device
    if n == 0 or layers == 0:
        return torch.empty(layers, 0, dtype=torch.int64, device=device)
    total = layers * n
    slot = torch.arange(n, device=device).repeat(layers)
    layer = torch.arange(layers, device=device).repeat_interleave(n)
    flat_units = units.reshape(-1)
    top = flat_units.max().clamp(min=0) + 1
    key = torch.where(flat_units >= 0, flat_units, top + slot) + layer * (top + n)
    _, group = torch.unique(key, return_inverse=True)
    groups = int(group.max()) + 1
    flat_scores, flat_protected = scores.reshape(-1), protected.reshape(-1)
    best = torch.full((groups,), float("-inf"), device=device).scatter_reduce(0, group, flat_scores, "amax")
    brightest = torch.full((groups,), float("-inf"), device=device).scatter_reduce(
        0, group, brightness.reshape(-1), "amax")
    # uint8: CUDA's scatter_reduce has no bool kernel
    guarded = torch.zeros(groups, dtype=torch.uint8, device=device).scatter_reduce(
        0, group, flat_protected.to(torch.uint8), "amax").bool()
    ranked = _lexsort_layers(layer, best[group].masked_fill(guarded[group], float("inf")), positions.reshape(-1))
    rank_of_slot = torch.empty(total, dtype=torch.int64, device=device)
    rank_of_slot[ranked] = torch.arange(total, device=device)
    first = torch.full((groups,), total, dtype=torch.int64, device=device).scatter_reduce(
        0, group, rank_of_slot, "amin")
    order = torch.argsort(first)  # groups in dying order, layer by layer
    group_layer = torch.zeros(groups, dtype=torch.int64, device=device).scatter_(0, group, layer)[order]
    sizes = torch.bincount(group, minlength=groups)[order]
    open_ = ~guarded[order]
    contrib = torch.where(open_, sizes, 0)
    before = _segment_exclusive_cumsum(contrib, group_layer, layers)
    need = need.to(device)
    taken = open_ & (before < need[group_layer])
    if threshold is not None:
        taken |= open_ & (brightest[order] <= threshold)
    chosen = torch.zeros(groups, dtype=torch.bool, device=device)
    chosen[order[taken]] = True
    group_rank = torch.empty(groups, dtype=torch.int64, device=device)
    group_rank[order] = torch.arange(groups, device=device)
    in_chosen = chosen[group]
    # victims sorted by (layer, group in dying order, slot)
    picked = torch.nonzero(in_chosen).flatten()
    picked = picked[torch.argsort((layer[picked] * groups + group_rank[group[picked]]) * n + slot[picked])]
    freed = torch.bincount(layer[picked], minlength=layers)
    short = (need - freed).clamp(min=0)
    if bool((short > 0).any()):  # protected units leave too little: cut them at their unprotected tokens
        own = (~flat_protected & ~in_chosen)[ranked]
        candidates = ranked[own]
        cand_layer = layer[candidates]
        within = _segment_exclusive_cumsum(torch.ones_like(cand_layer), cand_layer, layers)
        extra = candidates[within < short[cand_layer]]
        picked = torch.cat([picked, extra])
        picked = picked[torch.argsort(layer[picked], stable=True)]
        freed = torch.bincount(layer[picked], minlength=layers)
    if bool((freed < need).any()):
        bad = int(torch.nonzero(freed < need).flatten()[0])
        where = f" in row {bad} (a layer, or a KV head of a layer)" if layers > 1 else ""
        raise RuntimeError(f"cannot cull {int(need[bad])} tokens{where}: only {int(freed[bad])} are unprotected")
    width = int(freed.max()) if picked.numel() else 0
    out = torch.full((layers, width), -1, dtype=torch.int64, device=device)
    if picked.numel():
        column = _segment_exclusive_cumsum(torch.ones_like(picked), layer[picked], layers)
        out[layer[picked], column] = slot[picked]
    return out


def select_word_victims_layers(scores: torch.Tensor, order: torch.Tensor, brightness: torch.Tensor,
                               protected: torch.Tensor, units: torch.Tensor, need: torch.Tensor,
                               threshold: float | None) -> torch.Tensor | None:
    """`select_unit_victims_layers` for a cache's own rows, in two row sorts instead of a global unique.

    Valid when every unit's retained slots are adjacent in each layer's position order (words, lines and markers
    cover runs of positions and nothing else is retained between their tokens, which holds in a HaloCache): a
    unit is then a run of equal unit ids in position order, and ranking slots by their unit's score with a
    stable sort keeps each unit's slots together, in dying order. Returns the same rows, or None when some
    layer must cut protected units (the caller then takes `select_unit_victims_layers`).

    Args:
        scores, brightness: float32 [L, n]; order: int64 [L, n] each layer's slots in position order
        (`position_order_layers`); protected: bool [L, n]; units: int64 [L, n]; need: int64 [L].
    """
    layers, n = scores.shape
    device = scores.device
    if n == 0:
        return torch.empty(layers, 0, dtype=torch.int64, device=device)
    u = torch.gather(units, 1, order)
    starts = torch.ones_like(u, dtype=torch.bool)
    starts[:, 1:] = (u[:, 1:] != u[:, :-1]) | (u[:, 1:] < 0)
    segment = (torch.cumsum(starts.long(), 1) - 1 + torch.arange(layers, device=device)[:, None] * n).reshape(-1)
    size = layers * n

    def pooled(values: torch.Tensor, how: str, fill) -> torch.Tensor:
        base = torch.full((size,), fill, dtype=values.dtype, device=device)
        return base.scatter_reduce(0, segment, torch.gather(values, 1, order).reshape(-1), how)[segment].view(
            layers, n)

    guarded = pooled(protected.to(torch.uint8), "amax", 0).bool()  # uint8: no bool scatter_reduce on CUDA
    key = pooled(scores, "amax", float("-inf")).masked_fill(guarded, float("inf"))
    ranked = torch.sort(key, dim=1, stable=True).indices  # into position order: units stay contiguous
    open_ = ~torch.gather(guarded, 1, ranked)
    before = torch.cumsum(open_.long(), 1) - open_.long()
    seg_rows = torch.gather(segment.view(layers, n), 1, ranked)  # each ranked entry's unit
    seg_ranked = seg_rows.reshape(-1)
    first = torch.full((size,), size, dtype=torch.int64, device=device).scatter_reduce(
        0, seg_ranked, before.reshape(-1), "amin")[seg_ranked].view(layers, n)
    need = need.to(device)
    taken = open_ & (first < need[:, None])
    if threshold is not None:
        taken |= open_ & (torch.gather(pooled(brightness, "amax", float("-inf")), 1, ranked) <= threshold)
    freed = taken.sum(1)
    if bool((freed < need).any()):
        return None
    slots = torch.gather(order, 1, ranked)  # slot index of each ranked entry
    # victims unit by unit in dying order, each unit's slots in slot order: sort by (unit rank, slot)
    changes = torch.ones_like(seg_rows)
    changes[:, 1:] = seg_rows[:, 1:] != seg_rows[:, :-1]
    unit_rank = torch.cumsum(changes, 1)
    width = int(freed.max())
    sort_key = torch.where(taken, unit_rank * (n + 1) + slots, (n + 2) * (n + 1))
    picked = torch.topk(sort_key, width, dim=1, largest=False).indices  # the taken first (keys unique), in order
    out = torch.gather(slots, 1, picked)
    return out.masked_fill(~torch.gather(taken, 1, picked), -1)


def run_means_layers(scores: torch.Tensor, order: torch.Tensor, units: torch.Tensor, pooled: torch.Tensor
                     ) -> torch.Tensor:
    """float32 [L, n]: `halo.cull.unit_means` for a cache's own rows, with no sort: each pooled unit's slots hold
    the mean score of the unit's slots, other slots keep their own.

    Valid where every unit's slots are adjacent in each row's position order (as `select_word_victims_layers`
    requires): a unit is a run of equal unit ids in position order, so one cumulative sum numbers the runs and two
    scatters give their sums and sizes. `order` is `position_order_layers(positions)` (a cache keeps it).

    Args:
        scores: float32 [L, n]; order, units: int64 [L, n]; pooled: bool [L, n] (a unit pools when its slots do).
    """
    layers, n = scores.shape
    if n == 0:
        return scores.clone()
    u = torch.gather(units, 1, order)
    starts = torch.ones_like(u, dtype=torch.bool)
    starts[:, 1:] = (u[:, 1:] != u[:, :-1]) | (u[:, 1:] < 0)
    run = (torch.cumsum(starts.long(), 1) - 1 + torch.arange(layers, device=scores.device)[:, None] * n).reshape(-1)
    ordered = torch.gather(scores, 1, order)
    wide = ordered.double().reshape(-1)  # float64 sums, as unit_means takes them
    sums = torch.zeros(layers * n, dtype=torch.float64, device=scores.device).index_add_(0, run, wide)
    sizes = torch.zeros(layers * n, dtype=torch.float64, device=scores.device).index_add_(0, run, torch.ones_like(wide))
    means = (sums / sizes.clamp(min=1))[run].view(layers, n).to(scores.dtype)
    result = torch.where(torch.gather(pooled, 1, order) & (u >= 0), means, ordered)
    return torch.empty_like(scores).scatter_(1, order, result)


def pack_rows(mask: torch.Tensor) -> torch.Tensor:
    """int64 [L, m]: the column indices of each row's True entries, in order, padded with -1."""
    counts = mask.sum(1)
    width = int(counts.max()) if mask.numel() else 0
    out = torch.full((mask.shape[0], width), -1, dtype=torch.int64, device=mask.device)
    rows, cols = torch.nonzero(mask, as_tuple=True)
    if rows.numel():
        place = torch.cumsum(mask.long(), 1)[rows, cols] - 1
        out[rows, place] = cols
    return out
