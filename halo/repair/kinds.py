"""Token kinds: what a host token is at a word boundary, so that repair never moves a boundary.

Every host token gets one `TokenKind` from the bytes it adds to running text (`TokenPieces.bytes`, where a
word-start piece carries its leading space in every style: SentencePiece `▁fox`, byte-level `Ġfox`, WordPiece
`fox` -> b" fox"):

* `WORD_START` / `WORD_CONTINUATION`: text with at least one letter or digit, with / without a leading space
  (`▁fox`, `Ġfox`, `fox` | `s`, `##s`);
* `SYMBOL_START` / `SYMBOL_CONTINUATION`: punctuation or symbols only (`▁,`, `Ġ(` | `,`, `∆`);
* `SPACE`: whitespace only (`▁`, `▁▁`, `Ġ`, `Ċ`);
* `BYTE`: a SentencePiece byte-fallback piece (`<0x0A>`) or bytes that are not whole UTF-8 characters;
* `SPECIAL`: special and control tokens (they add no text), ids beyond the tokenizer, and pieces that mix text
  with inner whitespace.

A repair candidate must have exactly the target's kind (`candidate_mask`), so a whole word is only ever
replaced by a whole word, a suffix by a suffix, a symbol by a symbol. `SPACE`, `BYTE` and `SPECIAL` targets get
no candidate at all: whitespace carries layout (lines, indentation), a lone byte may be part of a multi-byte
character, and a control token is structure, none of which repair guesses.
"""

from __future__ import annotations

import enum

import torch

from .bridge import TokenPieces, token_pieces


class TokenKind(enum.IntEnum):
    """Kind of a token at word boundaries (values stored as int8; repairable kinds come first)."""

    WORD_START = 0
    WORD_CONTINUATION = 1
    SYMBOL_START = 2
    SYMBOL_CONTINUATION = 3
    SPACE = 4
    BYTE = 5
    SPECIAL = 6


FIRST_FROZEN_KIND = TokenKind.SPACE  # kinds >= this never get a repair candidate


def piece_kind(data: bytes, *, byte_fallback: bool = False) -> TokenKind:
    """The kind of a token that adds `data` to running text (a leading space marks a word start)."""
    if not data:
        return TokenKind.SPECIAL
    if byte_fallback:
        return TokenKind.BYTE
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return TokenKind.BYTE
    if text.isspace():
        return TokenKind.SPACE
    starts = text.startswith(" ")
    body = text[1:] if starts else text
    if any(c.isspace() for c in body):
        return TokenKind.SPECIAL
    if any(c.isalnum() for c in body):
        return TokenKind.WORD_START if starts else TokenKind.WORD_CONTINUATION
    return TokenKind.SYMBOL_START if starts else TokenKind.SYMBOL_CONTINUATION


def token_kinds(tokenizer_or_pieces, size: int | None = None) -> torch.Tensor:
    """int8 [size] `TokenKind` of every token id, computed once from a tokenizer or its `TokenPieces`.

    size: the table length (default the vocabulary's); ids past the vocabulary (e.g. a model's padded embedding
        rows) are `SPECIAL`, and ids past `size` are dropped.
    """
    pieces = tokenizer_or_pieces if isinstance(tokenizer_or_pieces, TokenPieces) else token_pieces(tokenizer_or_pieces)
    size = len(pieces) if size is None else int(size)
    kinds = torch.full((size,), int(TokenKind.SPECIAL), dtype=torch.int8)
    n = min(size, len(pieces))
    kinds[:n] = torch.tensor([int(piece_kind(pieces.bytes[i], byte_fallback=pieces.byte_fallback[i]))
                              for i in range(n)], dtype=torch.int8)
    return kinds


def candidate_mask(target_kinds: torch.Tensor, candidate_kinds: torch.Tensor) -> torch.Tensor:
    """bool [K, V]: candidate v may replace target k (same kind, and the kind is repairable).

    Args:
        target_kinds: int8 [K] kind of each target's current token.
        candidate_kinds: int8 [V] kind of each candidate (on the same device).

    Tensor ops only: no host synchronisation, safe inside CUDA-graph capture.
    """
    same = candidate_kinds[None, :] == target_kinds[:, None]
    return same & (target_kinds < int(FIRST_FROZEN_KIND))[:, None]
