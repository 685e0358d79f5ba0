"""The model a Session benchmark runs on: the embedded SmolLM2 where its package is installed, else (a GPU machine,
which has no registry and cannot carry the 94 MB package) a randomly initialised TinyLlama-1.1B-shaped Llama.

The random model keeps TinyLlama's layers, widths and heads (22 layers, hidden 2048, ffn 5632, 32 query / 4 KV
heads, bf16 on CUDA) but its vocabulary is the tests' in-process tokenizer's (tests/tiny.py, 320 ids), so that every
id a Session feeds, decodes and splits into words is one its tokenizer knows: the embedding and LM head shrink from
32000 rows to 320 (about 4% of a TinyLlama decode step's weights), the same for Halo and its reference.
"""

from __future__ import annotations

import pytest
import torch

from halo import load_model
from halo.models import ModelNotFoundError


def random_tinyllama(device: str = "cuda", dtype: torch.dtype = torch.bfloat16):
    """(model, tokenizer): a random TinyLlama-shaped Llama (bench_targets.TINYLLAMA) over the tiny tokenizer's
    vocabulary, on `device`."""
    from bench_targets import TINYLLAMA, build_llama
    from tiny import tiny_tokenizer  # tests/ is on the path (pyproject's pythonpath)

    tokenizer = tiny_tokenizer()
    model = build_llama({**TINYLLAMA, "vocab_size": len(tokenizer)}, device, dtype)
    model.config.name_or_path = "random-tinyllama-1.1b-shape"
    return model, tokenizer


def session_pair():
    """(model, tokenizer) for a Session benchmark; skips without the embedded model and without CUDA."""
    try:
        return load_model()
    except ModelNotFoundError as exc:
        if not torch.cuda.is_available():
            pytest.skip(f"embedded model unavailable: {exc}")
    return random_tinyllama()


def token_ids(model, count: int, seed: int) -> torch.Tensor:
    """int64 [count] random ids in [100, min(40000, vocab)): clear of the first ids, where tokenizers keep their
    specials (for the tiny tokenizer most of them are byte symbols, each a token of its own)."""
    g = torch.Generator().manual_seed(seed)
    high = min(40000, model.config.vocab_size)
    return torch.randint(min(100, high - 1), high, (count,), generator=g)
