"""Bridge table: word starts to word starts, continuations to continuations, everything else -1."""

import pytest
from transformers import PreTrainedTokenizerFast

from halo.repair.bridge import CONTINUATION, NO_PIECE, WORD_START, bridge_tokenizers, token_pieces

MLM_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "fox", "##fox", "the", "##s", "jump", "##ing", "cat",
             ",", "##e"]


def _mlm():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    backend = Tokenizer(models.WordPiece({t: i for i, t in enumerate(MLM_VOCAB)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


SP_VOCAB = ["<unk>", "<s>", "</s>", "\u2581fox", "fox", "\u2581The", "\u2581the", "s", "\u2581", "<0x0A>",
            "\u2581jump", "e", "\u2581\u2581", "\u2581,"]


def _sp_host():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.Unigram([(t, -1.0) for t in SP_VOCAB], unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


BL_VOCAB = ["<|endoftext|>", "\u0120fox", "fox", "\u0120The", "\u0120the", "s", "\u0120", "\u010a", "\u0120jump",
            "e", "\u0120\u0120", "\u00c3", "\u00a9", "caf\u00c3\u00a9", ","]


def _bl_host():
    from tokenizers import Tokenizer, models, pre_tokenizers

    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(BL_VOCAB)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|endoftext|>")


def test_token_pieces_classification():
    sp = token_pieces(_sp_host())
    assert sp.style == "sentencepiece" and not sp.lowercases
    assert (sp.kinds[3], sp.texts[3]) == (WORD_START, "fox")
    assert (sp.kinds[4], sp.texts[4]) == (CONTINUATION, "fox")
    assert sp.kinds[0] == sp.kinds[1] == sp.kinds[8] == sp.kinds[9] == sp.kinds[12] == NO_PIECE
    assert sp.bytes[9] == b"\n" and sp.bytes[3] == b" fox" and sp.bytes[1] == b""
    bl = token_pieces(_bl_host())
    assert bl.style == "byte_level"
    assert (bl.kinds[1], bl.texts[1]) == (WORD_START, "fox")
    assert (bl.kinds[5], bl.texts[5]) == (CONTINUATION, "s")
    assert bl.kinds[11] == bl.kinds[12] == NO_PIECE  # partial UTF-8 bytes
    assert bl.bytes[11] + bl.bytes[12] == "\u00e9".encode()
    assert (bl.kinds[13], bl.texts[13]) == (CONTINUATION, "caf\u00e9")
    wp = token_pieces(_mlm())
    assert wp.style == "wordpiece" and wp.lowercases
    assert (wp.kinds[6], wp.texts[6]) == (CONTINUATION, "fox") and (wp.kinds[5], wp.texts[5]) == (WORD_START, "fox")
    assert all(wp.kinds[i] == NO_PIECE for i in range(5))


@pytest.mark.parametrize("host_kind", ["sentencepiece", "byte_level"])
def test_bridge_maps_kind_to_kind(host_kind):
    host = _sp_host() if host_kind == "sentencepiece" else _bl_host()
    table = bridge_tokenizers(host, _mlm())
    space = "\u2581" if host_kind == "sentencepiece" else "\u0120"
    h = host.convert_tokens_to_ids
    expected = {"fox": h(space + "fox"), "##fox": h("fox"), "the": h(space + "the"), "##s": h("s"),
                "jump": h(space + "jump"), "##e": h("e"),
                # no host token of the same kind and text:
                "##ing": -1, "cat": -1,
                # "," is a word start in WordPiece: it bridges to "▁," (present in the SentencePiece vocabulary),
                # never to the continuation "," of the byte-level one.
                ",": h(space + ",") if host_kind == "sentencepiece" else -1,
                "[PAD]": -1, "[UNK]": -1, "[CLS]": -1, "[SEP]": -1, "[MASK]": -1}
    for token, host_id in expected.items():
        assert int(table.mlm_to_host[MLM_VOCAB.index(token)]) == host_id, token
    assert table.bridged.tolist() == [v >= 0 for v in table.mlm_to_host.tolist()]
    # Reverse map: lower-cased for the uncased MLM, so "The" and "the" both spell MLM "the".
    assert int(table.host_to_mlm[h(space + "The")]) == MLM_VOCAB.index("the")
    assert int(table.host_to_mlm[h(space + "the")]) == MLM_VOCAB.index("the")
    assert int(table.host_to_mlm[h("fox")]) == MLM_VOCAB.index("##fox")
    assert int(table.host_to_mlm[h(space)]) == -1
    assert int(table.host_to_mlm[h(space + space)]) == -1


def test_bridge_on_trained_tokenizers(sp_host_tokenizer, bl_host_tokenizer, mlm_tokenizer):
    for host in (sp_host_tokenizer, bl_host_tokenizer):
        table = bridge_tokenizers(host, mlm_tokenizer)
        kinds = token_pieces(host).kinds
        assert int(table.bridged.sum()) > 100
        for m in table.bridged.nonzero().flatten().tolist():
            mt = mlm_tokenizer.convert_ids_to_tokens(m)
            h = int(table.mlm_to_host[m])
            spelled = host.decode([h])  # the host token's own text, through the host decoder
            if mt.startswith("##"):
                assert spelled == mt[2:] and kinds[h] == CONTINUATION
            else:
                assert spelled.strip() == mt and kinds[h] == WORD_START
