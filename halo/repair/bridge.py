"""Vocabulary bridge between a host tokenizer and a masked LM's tokenizer.

Every token of a tokenizer is classified by `token_pieces` into a *kind* and the text it spells:

* `WORD_START`: begins a word (SentencePiece `▁fox`, byte-level BPE `Ġfox`, WordPiece `fox`), text `fox`;
* `CONTINUATION`: continues a word (SentencePiece/byte-level `s`, WordPiece `##s`), text `s`;
* `NO_PIECE`: special tokens, byte-fallback pieces (`<0x0A>`), partial UTF-8 bytes, and pieces whose text is
  empty or contains whitespace; these never bridge.

`build_bridge` then maps each MLM token to the single host token of the same kind and the same text, or -1
(`mlm_to_host`), and each host token to the MLM token that spells it (`host_to_mlm`, lower-cased first when the
MLM lower-cases its input, e.g. `distilbert-base-uncased`), which is how a backend scores the current token.
`TokenPieces.bytes` also keeps what every host token contributes to the text, for rebuilding window text.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

WORD_START, CONTINUATION, NO_PIECE = 1, 0, -1

_SP_SPACE = "\u2581"  # ▁
_BL_SPACE = "\u0120"  # Ġ
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """The GPT-2 byte-level BPE alphabet: printable stand-in character -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@dataclass(frozen=True)
class TokenPieces:
    """Per-token classification of a vocabulary (length V = len(tokenizer)).

    Attributes:
        style: "sentencepiece", "byte_level" or "wordpiece".
        kinds: list[int] WORD_START / CONTINUATION / NO_PIECE per token id.
        texts: list[str | None] the spelled text (None for NO_PIECE).
        bytes: list[bytes] the UTF-8 bytes the token contributes to running text (leading space for word starts;
            empty for special tokens).
        lowercases: whether the tokenizer lower-cases its input text.
        byte_fallback: list[bool] True for SentencePiece byte-fallback pieces (`<0x0A>`), which stand for one raw
            byte rather than for text of the vocabulary.
    """

    style: str
    kinds: list[int]
    texts: list
    bytes: list
    lowercases: bool
    byte_fallback: list

    def __len__(self) -> int:
        return len(self.kinds)


def _detect_style(tokens: list) -> str:
    counts = {"sentencepiece": 0, "byte_level": 0, "wordpiece": 0}
    for t in tokens:
        if not t:
            continue
        if t.startswith(_SP_SPACE):
            counts["sentencepiece"] += 1
        elif t.startswith(_BL_SPACE):
            counts["byte_level"] += 1
        elif t.startswith("##"):
            counts["wordpiece"] += 1
    return max(counts, key=counts.get)


def _lowercases(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    normalizer = getattr(backend, "normalizer", None) if backend is not None else None
    if normalizer is not None:
        try:
            return normalizer.normalize_str("AbC") == "abc"
        except Exception:  # noqa: BLE001 - exotic normalizers: fall back to the attribute
            pass
    return bool(getattr(tokenizer, "do_lower_case", False))


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


def _bridgeable(text: str) -> bool:
    return bool(text) and not any(c.isspace() for c in text)


def token_pieces(tokenizer) -> TokenPieces:
    """Classifies every token of `tokenizer` (see the module docstring)."""
    size = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(size)))
    style = _detect_style(tokens)
    special = _special_ids(tokenizer)
    alphabet = byte_level_alphabet()
    kinds, texts, raw, fallback = [], [], [], []
    for i, tok in enumerate(tokens):
        kind, text, data, is_byte = NO_PIECE, None, b"", False
        if tok is None or i in special:
            pass
        elif style == "wordpiece":
            if tok.startswith("##") and len(tok) > 2:
                kind, text, data = CONTINUATION, tok[2:], tok[2:].encode()
            else:
                kind, text, data = WORD_START, tok, b" " + tok.encode()
        elif style == "sentencepiece":
            m = _BYTE_FALLBACK.match(tok)
            if m:
                data, is_byte = bytes([int(m.group(1), 16)]), True
            elif tok.startswith(_SP_SPACE):
                kind, text, data = WORD_START, tok[1:].replace(_SP_SPACE, " "), tok.replace(_SP_SPACE, " ").encode()
            else:
                kind, text, data = CONTINUATION, tok.replace(_SP_SPACE, " "), tok.replace(_SP_SPACE, " ").encode()
        else:  # byte_level
            if all(c in alphabet for c in tok):
                data = bytes(alphabet[c] for c in tok)
            else:  # an added token spelled in plain text
                data = tok.encode()
            body, kind = (data[1:], WORD_START) if data.startswith(b" ") else (data, CONTINUATION)
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:  # a partial character: contributes bytes, never bridges
                kind, text = NO_PIECE, None
        if text is not None and not _bridgeable(text):
            kind, text = NO_PIECE, None
        kinds.append(kind)
        texts.append(text)
        raw.append(data)
        fallback.append(is_byte)
    return TokenPieces(style, kinds, texts, raw, _lowercases(tokenizer), fallback)


@dataclass(frozen=True)
class BridgeTable:
    """Token maps between a host vocabulary and an MLM vocabulary.

    Attributes:
        mlm_to_host: int64 [V_mlm] the host token with the same kind and text, or -1.
        host_to_mlm: int64 [V_host] the MLM token spelling the host token (lower-cased first for an uncased
            MLM), or -1.
        bridged: bool [V_mlm] mlm_to_host >= 0.
    """

    mlm_to_host: torch.Tensor
    host_to_mlm: torch.Tensor
    bridged: torch.Tensor

    def to(self, device) -> "BridgeTable":
        return BridgeTable(self.mlm_to_host.to(device), self.host_to_mlm.to(device), self.bridged.to(device))


def build_bridge(host: TokenPieces, mlm: TokenPieces) -> BridgeTable:
    """Precomputes the bridge for one (host tokenizer, MLM tokenizer) pair from their `token_pieces`."""
    host_index: dict[tuple[int, str], int] = {}
    for h, (kind, text) in enumerate(zip(host.kinds, host.texts)):
        if kind != NO_PIECE:
            host_index.setdefault((kind, text), h)
    mlm_index: dict[tuple[int, str], int] = {}
    mlm_to_host = torch.full((len(mlm),), -1, dtype=torch.int64)
    for m, (kind, text) in enumerate(zip(mlm.kinds, mlm.texts)):
        if kind == NO_PIECE:
            continue
        mlm_index.setdefault((kind, text), m)
        mlm_to_host[m] = host_index.get((kind, text), -1)
    host_to_mlm = torch.full((len(host),), -1, dtype=torch.int64)
    for h, (kind, text) in enumerate(zip(host.kinds, host.texts)):
        if kind != NO_PIECE:
            host_to_mlm[h] = mlm_index.get((kind, text.lower() if mlm.lowercases else text), -1)
    return BridgeTable(mlm_to_host, host_to_mlm, mlm_to_host >= 0)


def bridge_tokenizers(host_tokenizer, mlm_tokenizer) -> BridgeTable:
    """`build_bridge(token_pieces(host_tokenizer), token_pieces(mlm_tokenizer))`."""
    return build_bridge(token_pieces(host_tokenizer), token_pieces(mlm_tokenizer))
