"""Fixtures for the repair tests: tokenizers trained in-process on stdlib text, tiny random models.

Nothing here reads outside the repository or downloads anything: the corpus is `pydoc_data.topics`, the host
tokenizers are a SentencePiece unigram model (trained with `sentencepiece`, served through a tokenizers
Unigram + Metaspace backend, Llama-2 style `▁` pieces with byte fallback) and a byte-level BPE (GPT-2/SmolLM2
style `Ġ` pieces); the MLM tokenizer is an uncased WordPiece with [CLS] [SEP] [MASK] [PAD] [UNK].

Real vocabularies (the Llama-2 SentencePiece tokenizer, the BERT uncased WordPiece tokenizer) are used when a
folder of them is present in the shared data folder (`$HALO_SHARED_DATA`, default `../shared/data` next to the
repository); tests that need them skip otherwise, so the repository never depends on that folder.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from repair_helpers import tiny_distilbert

SHARED_DATA = Path(os.environ.get("HALO_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def shared_tokenizer(folder: str):
    """The tokenizer saved in SHARED_DATA/folder (loaded offline), or skip the test when it is absent."""
    path = SHARED_DATA / folder
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip(f"{path} is not present (optional real vocabulary)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@pytest.fixture(scope="session")
def llama2_tokenizer():
    """The real Llama-2 SentencePiece tokenizer (32000 pieces, byte fallback), if present."""
    return shared_tokenizer("llama2-tokenizer")


@pytest.fixture(scope="session")
def bert_uncased_tokenizer():
    """The real BERT uncased WordPiece tokenizer (30522 pieces), if present."""
    return shared_tokenizer("bert-uncased-tokenizer")


@pytest.fixture(scope="session")
def bert_vocab_mlm(bert_uncased_tokenizer):
    """A tiny random DistilBERT MLM over the real BERT uncased vocabulary (nothing downloaded)."""
    return tiny_distilbert(len(bert_uncased_tokenizer), seed=5)


@pytest.fixture(scope="session")
def tiny_bl_tokenizer():
    """The tiny byte-level BPE of tests/tiny.py (320 ids)."""
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    from pydoc_data.topics import topics

    text = "\n".join(topics[k] for k in sorted(topics))[:120_000]
    return [line.strip() for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def sp_host_tokenizer(corpus_lines):
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus_lines), model_writer=buf, vocab_size=1000,
                                   model_type="unigram", byte_fallback=True, character_coverage=1.0, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    # The SentencePiece model and its tokenizers twin agree.
    probe = "The quick brown fox returns an object."
    assert tok.convert_ids_to_tokens(tok(probe, add_special_tokens=False)["input_ids"]) == sp.encode(probe, out_type=str)
    return tok


@pytest.fixture(scope="session")
def bl_host_tokenizer(corpus_lines):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_lines, vocab_size=1000, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", unk_token="<|endoftext|>")


@pytest.fixture(scope="session")
def mlm_tokenizer(corpus_lines):
    from tokenizers import BertWordPieceTokenizer, processors
    from transformers import PreTrainedTokenizerFast

    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(corpus_lines, vocab_size=1500, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                           show_progress=False)
    backend = wp._tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="session")
def mlm_model(mlm_tokenizer):
    return tiny_distilbert(len(mlm_tokenizer))
