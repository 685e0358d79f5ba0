"""Elision markers: a run of culled lines is replaced by one marker (`[...]`), and adjacent markers merge.

`plan_markers` decides, from the retained slots and the line units just culled, which markers to drop and
where new ones go; `ElisionMarkers.settle` carries the plan out after a stream forward: it evicts merged
markers, computes each new marker's K/V in one service forward (at its run's first position, seeing only what
precedes it), and culls again, until the cache is within its budget with every culled run marked.
"""

from __future__ import annotations

import torch

from .forward import CullResult, ForwardSpec

SETTLE_ROUNDS = 64
"""Most place-and-cull rounds one settle may take before it gives up (RuntimeError)."""


def plan_markers(positions: list[int], sources: list[int], units: list[int], culled: list[tuple[int, int, int]],
                 marker_source: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Decide which elision markers to drop and which to place after units were culled.

    Args:
        positions, sources, units: the retained slots sorted by position.
        culled: (unit id, first position, last position) of each line unit culled since the last plan.
        marker_source: source code of marker tokens.
    Returns:
        (marker unit ids to evict, new markers as (first position, last position) of the run they stand for).

    Walking in position order, culled units and existing markers with no retained text token between them form
    one group: each group keeps exactly one marker at its first position (an existing marker already there
    stays; otherwise one is placed there and the group's old markers go). Groups of markers alone (made
    adjacent by later culls) keep their first marker.
    """
    events: list[tuple[int, int, str, int, int]] = []  # (position, order, kind, unit, last)
    seen_markers: set[int] = set()
    for position, source, unit in zip(positions, sources, units):
        if source == marker_source:
            if unit in seen_markers:
                continue
            seen_markers.add(unit)
            events.append((position, 0, "marker", unit, position))
        else:
            events.append((position, 1, "text", unit, position))
    for unit, first, last in culled:
        events.append((first, 0, "culled", unit, last))
    events.sort()

    evict: list[int] = []
    place: list[tuple[int, int]] = []

    def close(group):
        if not group:
            return
        markers = [e for e in group if e[2] == "marker"]
        if not any(e[2] == "culled" for e in group):
            evict.extend(e[3] for e in markers[1:])
            return
        start = group[0][0]
        end = max(e[4] for e in group)
        if markers and markers[0][0] == start:
            evict.extend(e[3] for e in markers[1:])
        else:
            evict.extend(e[3] for e in markers)
            place.append((start, end))

    group: list = []
    for event in events:
        if event[2] == "text":
            close(group)
            group = []
        else:
            group.append(event)
    close(group)
    return evict, place


class ElisionMarkers:
    """Places elision markers for culled line runs.

    Args:
        tokenizer: the host tokenizer; marker_text: the marker's text (HaloConfig.marker_text).
        source_code: the source code of marker tokens (HaloConfig.source_code("marker")).

    Attributes:
        token_ids: list[int] the marker's token ids.
        pending_runs: (unit id, first position, last position) of culled runs not marked yet (a placement that
            failed, e.g. interrupted, leaves its runs here for the next settle).
    """

    def __init__(self, tokenizer, marker_text: str, source_code: int):
        self.token_ids: list[int] = tokenizer(marker_text, add_special_tokens=False)["input_ids"]
        if not self.token_ids:
            raise ValueError(f"marker_text {marker_text!r} tokenises to nothing")
        self.source_code = source_code
        self.pending_runs: list[tuple[int, int, int]] = []

    def settle(self, cache, culled_runs: list[tuple[int, int, int]], run_forward) -> CullResult:
        """Mark `culled_runs` (and any pending ones), then cull and mark again until the cache is within budget.

        Args:
            cache: the HaloCache. culled_runs: runs culled by the forward that just closed.
            run_forward: callable(ForwardSpec) that runs a service forward through `cache.run`.
        Returns:
            What the extra culls and merges evicted (markers placed during this settle are protected from it).
        """
        self.pending_runs.extend(culled_runs)
        done = CullResult()
        if not self.pending_runs and cache.n_valid <= cache.config.budget:
            return done
        placed_from = cache.next_serial
        for _ in range(SETTLE_ROUNDS):
            if self.pending_runs:
                snap = cache.snapshot()
                evict, place = plan_markers(snap["positions"].tolist(), snap["sources"].tolist(),
                                            snap["units"].tolist(), self.pending_runs, self.source_code)
                self.pending_runs = [(-1, start, end) for start, end in place]  # until their markers exist
                if evict:
                    done.evictions.append(cache.evict_units(evict))
                if place:
                    run_forward(self.spec(cache, place))
                self.pending_runs = []
            if cache.n_valid <= cache.config.budget:
                return done
            culled = cache.cull(protect_serials_from=placed_from)
            done.evictions.extend(culled.evictions)
            self.pending_runs.extend(culled.culled_runs)
        raise RuntimeError("elision markers did not settle within the budget; raise the budget or lower chunk_size")

    def spec(self, cache, runs: list[tuple[int, int]]) -> ForwardSpec:
        """The service forward that inserts one marker per run (first position, last position)."""
        m, device, n = len(self.token_ids), cache.device, cache.n_valid
        rows = m * len(runs)
        ids = torch.tensor(self.token_ids * len(runs), dtype=torch.int64, device=device)
        offsets = torch.arange(m, device=device)
        positions = torch.cat([start + offsets.clamp(max=end - start) for start, end in runs])
        starts = torch.tensor([start for start, _ in runs], device=device).repeat_interleave(m)
        visible = torch.zeros(rows, n + rows, dtype=torch.bool, device=device)
        visible[:, :n] = cache.retained_visibility(starts)
        block = torch.tril(torch.ones(m, m, dtype=torch.bool, device=device))
        visible[:, n:] = torch.block_diag(*[block] * len(runs))
        units = cache.new_unit_ids(len(runs)).repeat_interleave(m).to(device)
        return ForwardSpec(ids, positions, self.source_code, rows, n, units, visible, horizon=starts, streams=False)
