"""Token kinds: classification of pieces of every style, and the candidate mask built from them."""

import pytest
import torch
from repair_helpers import word_shape

from halo.repair import TokenKind, candidate_mask, token_kinds, token_pieces
from halo.repair.kinds import piece_kind

K = TokenKind


@pytest.mark.parametrize("data,byte_fallback,kind", [
    (b" fox", False, K.WORD_START), (b" 42", False, K.WORD_START), (b" don't", False, K.WORD_START),
    (b"s", False, K.WORD_CONTINUATION), ("\u00e9".encode(), False, K.WORD_CONTINUATION),
    (b" ,", False, K.SYMBOL_START), (b" (", False, K.SYMBOL_START),
    (b",", False, K.SYMBOL_CONTINUATION), ("\u2206".encode(), False, K.SYMBOL_CONTINUATION),
    (b" ", False, K.SPACE), (b"\n", False, K.SPACE), (b"  \t", False, K.SPACE),
    (b"\n", True, K.BYTE), (b"A", True, K.BYTE), (b"\xc3", False, K.BYTE), (b" \xe2\x88", False, K.BYTE),
    (b"", False, K.SPECIAL), (b";\r", False, K.SPECIAL), (b"  fox", False, K.SPECIAL),
])
def test_piece_kind(data, byte_fallback, kind):
    assert piece_kind(data, byte_fallback=byte_fallback) == kind


def _kinds_by_token(tokenizer, kinds):
    return {tokenizer.convert_ids_to_tokens(i): TokenKind(int(k)) for i, k in enumerate(kinds.tolist())}


def test_token_kinds_of_each_style(sp_host_tokenizer, bl_host_tokenizer, mlm_tokenizer):
    sp = _kinds_by_token(sp_host_tokenizer, token_kinds(sp_host_tokenizer))
    assert sp["<unk>"] == sp["<s>"] == sp["</s>"] == K.SPECIAL
    assert sp["<0x0A>"] == sp["<0x41>"] == K.BYTE
    assert sp["\u2581the"] == K.WORD_START and sp["s"] == K.WORD_CONTINUATION
    assert sp["\u2581"] == K.SPACE and sp["."] == K.SYMBOL_CONTINUATION
    bl = _kinds_by_token(bl_host_tokenizer, token_kinds(bl_host_tokenizer))
    assert bl["<|endoftext|>"] == K.SPECIAL
    assert bl["\u0120the"] == K.WORD_START and bl["s"] == K.WORD_CONTINUATION
    assert bl["\u0120"] == bl["\u010a"] == K.SPACE and bl["."] == K.SYMBOL_CONTINUATION
    assert bl["\u00c3"] == K.BYTE  # the first byte of a two-byte character
    wp = _kinds_by_token(mlm_tokenizer, token_kinds(mlm_tokenizer))
    assert wp["[MASK]"] == wp["[PAD]"] == K.SPECIAL
    assert wp["the"] == K.WORD_START and wp["##s"] == K.WORD_CONTINUATION and wp["."] == K.SYMBOL_START


@pytest.mark.parametrize("style", ["sentencepiece", "byte_level"])
def test_token_kinds_agree_with_the_spelling_of_every_token(style, sp_host_tokenizer, bl_host_tokenizer):
    tok = sp_host_tokenizer if style == "sentencepiece" else bl_host_tokenizer
    kinds = token_kinds(tok).tolist()
    shapes = {(True, True): K.WORD_START, (False, True): K.WORD_CONTINUATION, (True, False): K.SYMBOL_START,
              (False, False): K.SYMBOL_CONTINUATION}
    for i, kind in enumerate(kinds):
        shape = word_shape(tok, i, style)
        if shape is None:
            assert kind >= K.SPACE, tok.convert_ids_to_tokens(i)
        else:
            assert kind == shapes[shape], tok.convert_ids_to_tokens(i)


def test_token_kinds_pads_and_truncates_to_a_model_vocabulary(sp_host_tokenizer):
    full = token_kinds(sp_host_tokenizer)
    assert full.dtype == torch.int8 and full.shape == (len(sp_host_tokenizer),)
    padded = token_kinds(token_pieces(sp_host_tokenizer), size=len(full) + 64)
    assert torch.equal(padded[: len(full)], full) and (padded[len(full):] == K.SPECIAL).all()
    assert torch.equal(token_kinds(sp_host_tokenizer, size=10), full[:10])


def test_candidate_mask_is_same_kind_and_never_for_frozen_targets():
    candidates = torch.tensor(list(TokenKind) * 2, dtype=torch.int8)
    targets = torch.tensor(list(TokenKind), dtype=torch.int8)
    mask = candidate_mask(targets, candidates)
    assert mask.dtype == torch.bool and mask.shape == (len(targets), len(candidates))
    for t, kind in enumerate(TokenKind):
        expected = [c == kind and kind < K.SPACE for c in candidates.tolist()]
        assert mask[t].tolist() == expected, kind
