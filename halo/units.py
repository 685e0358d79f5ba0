"""Units: log and tool output lives and dies by whole lines (elision markers: halo.markers)."""

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
