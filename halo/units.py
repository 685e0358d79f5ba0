"""Units: tokens that live and die together. Log and tool output is split into lines (their culled runs become
elision markers, halo.markers); all other text into words, so a number, a name or a URL is never cut."""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass

import torch

from .repair.bridge import token_pieces
from .repair.kinds import TokenKind, token_kinds


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


# ------------------------------------------------------------------ words
MAX_WORD_TOKENS = 24
"""A word unit never grows past this many tokens (a long unspaced run such as minified JSON splits)."""


@dataclass(frozen=True)
class WordState:
    """Where the stream stands in a word: the last token's unit id (-1 after a line unit), its kind, the length."""

    unit: int = -1
    kind: int = int(TokenKind.SPACE)
    length: int = 0


_CONTINUES = frozenset(map(int, (TokenKind.WORD_CONTINUATION, TokenKind.SYMBOL_CONTINUATION, TokenKind.BYTE)))
_TEXT = frozenset(map(int, (TokenKind.WORD_START, TokenKind.WORD_CONTINUATION, TokenKind.SYMBOL_START,
                            TokenKind.SYMBOL_CONTINUATION, TokenKind.BYTE)))
_PER_TOKENIZER: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CLOSERS = b"\"')]*"


def _per_tokenizer(tokenizer, key, build):
    """`build()`, computed once per tokenizer object and `key` (the tables below share one `token_pieces`)."""
    store = _PER_TOKENIZER.setdefault(tokenizer, {})
    if key not in store:
        store[key] = build()
    return store[key]


def _pieces(tokenizer):
    return _per_tokenizer(tokenizer, "pieces", lambda: token_pieces(tokenizer))


def kind_table(tokenizer, size: int) -> torch.Tensor:
    """int8 [size] TokenKind per id (halo.repair.kinds), computed once per tokenizer object."""
    return _per_tokenizer(tokenizer, ("kinds", size), lambda: token_kinds(_pieces(tokenizer), size))


def word_table(tokenizer, size: int) -> torch.Tensor:
    """bool [size]: whether a token holds a letter or a digit (TokenKind WORD_START or WORD_CONTINUATION)."""
    return kind_table(tokenizer, size) <= int(TokenKind.WORD_CONTINUATION)


def sentence_end_table(tokenizer, size: int) -> torch.Tensor:
    """bool [size]: whether a token ends a sentence (its text holds a newline, or ends in `.`, `!` or `?`, closing
    quotes and brackets aside), computed once per tokenizer object; ids past the vocabulary end nothing."""
    def build() -> torch.Tensor:
        data = _pieces(tokenizer).bytes[:size]
        ends = [b"\n" in d or d.rstrip(_CLOSERS).endswith((b".", b"!", b"?")) for d in data]
        return torch.tensor(ends + [False] * (size - len(ends)), dtype=torch.bool)

    return _per_tokenizer(tokenizer, ("sentence_ends", size), build)


def word_starts(kinds: list[int], state: WordState) -> tuple[list[bool], WordState]:
    """Which tokens start a new word, given their kinds and where the stream stood before them.

    A word is a whitespace-delimited run of text tokens (`52445`, `it.`, `https://x.org/a`, `foo_bar()`): a token
    continues the previous one's word when it has no leading space (a continuation, a glued symbol or a byte
    piece), the previous token was text, and the word is shorter than MAX_WORD_TOKENS. Whitespace, special and
    control tokens are words of their own. Returns (starts, the state after the last token); the caller gives
    each start a fresh unit id and every other token the unit of the token before it.
    """
    starts = []
    kind_prev, length = state.kind, state.length if state.unit >= 0 else 0
    for kind in kinds:
        joins = kind in _CONTINUES and kind_prev in _TEXT and 0 < length < MAX_WORD_TOKENS
        starts.append(not joins)
        length = length + 1 if joins else 1
        kind_prev = kind
    return starts, WordState(state.unit, kind_prev, length)


class WordTracker:
    """Gives the tokens of a stream their word unit ids, continuing the word the stream is in across calls.

    Args:
        tokenizer: the host tokenizer; vocab_size: the model's vocabulary size (the kind table's length).

    Attributes:
        state: WordState, where the stream stands (saved with a session).
    """

    def __init__(self, tokenizer, vocab_size: int):
        self.kinds = kind_table(tokenizer, vocab_size)
        self.state = WordState()

    def units(self, token_ids: torch.Tensor, new_unit_ids) -> torch.Tensor:
        """int64 [T] a word unit id per token; `new_unit_ids(count)` reserves fresh ids (HaloCache.new_unit_ids)."""
        starts, after = word_starts(self.kinds[token_ids.cpu()].tolist(), self.state)
        fresh = iter(new_unit_ids(sum(starts)).tolist())
        units, unit = [], self.state.unit
        for start in starts:
            unit = next(fresh) if start else unit
            units.append(unit)
        self.state = WordState(unit, after.kind, after.length)
        return torch.tensor(units, dtype=torch.int64)
