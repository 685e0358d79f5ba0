"""Tiny in-process models and tokenizers for CPU tests (random weights; nothing is downloaded).

Import as `from tiny import ...` (pytest puts tests/ on the path, see pyproject.toml).
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 320  # ids of the tiny tokenizer (256 byte symbols, merges, 2 specials)


def tiny_llama(seed: int = 0, *, layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64,
               vocab: int = 128, dtype=torch.float32) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough for CPU tests (GQA when kv_heads < heads)."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=8192, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (TINY_VOCAB ids) trained in-process on embedded documentation text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from halo.text import embedded_text

    text = embedded_text(max_chars=60_000).encode("ascii", "ignore").decode()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
