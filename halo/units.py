"""Units: log and tool output lives and dies by whole lines; culled runs of lines become elision markers."""

from __future__ import annotations

import bisect


def tokenize_lines(tokenizer, text: str, add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Tokenise `text` once and give each token the index of the line it starts in.

    A token that starts on a newline belongs to the line that newline ends. Returns (token_ids, line_index).
    """
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        newlines = [i for i, ch in enumerate(text) if ch == "\n"]
        lines = [bisect.bisect_left(newlines, start) for start, _ in enc["offset_mapping"]]
        return list(enc["input_ids"]), lines
    ids: list[int] = []
    lines: list[int] = []
    for index, line in enumerate(text.splitlines(keepends=True)):
        piece = tokenizer(line, add_special_tokens=add_special_tokens and index == 0)["input_ids"]
        ids.extend(piece)
        lines.extend([index] * len(piece))
    return ids, lines


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
