"""Shared fixtures. Without CUDA, Triton kernels run under the interpreter (set before any kernel import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def tiny_llama(seed: int = 0, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64,
               vocab: int = 128, dtype=torch.float32) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for CPU tests (GQA when kv_heads < heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture
def tiny_model():
    return tiny_llama()


TINY_VOCAB = 320  # ids of the tiny tokenizer (256 byte symbols, merges, 2 specials)


def tiny_tokenizer():
    """A BPE tokenizer (TINY_VOCAB ids, ASCII alphabet) trained in-process on embedded documentation text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from halo.text import embedded_text

    text = embedded_text(max_chars=60_000).encode("ascii", "ignore").decode()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    return wrapped


@pytest.fixture(scope="session")
def tiny_tok():
    return tiny_tokenizer()


@pytest.fixture
def tiny_pair(tiny_tok):
    """(model, tokenizer): a random tiny Llama whose vocabulary covers the tiny tokenizer."""
    return tiny_llama(vocab=len(tiny_tok)), tiny_tok
