"""Decode step with HaloCache (brightness + cull + compact every step) vs the model's default cache.

Both hold the same context length: the default DynamicCache is cropped back after each step, HaloCache culls
one token per step at its budget. Target (CPU, SmolLM2-135M, budget 512): Halo's extra time <= 15% of the
plain decode step. On CUDA the same benchmark runs the fused kernels.
"""

import pytest
import torch
from transformers import DynamicCache

from halo import HaloCache, HaloConfig, load_model

BUDGET = 512
GROUP = "decode-step-512"


@pytest.fixture(scope="module")
def smollm():
    model, tokenizer = load_model()
    return model


def _prompt(model):
    g = torch.Generator().manual_seed(0)
    return torch.randint(100, 40000, (1, BUDGET), generator=g).to(model.device)


def bench_default_cache_decode_step(benchmark, smollm, record_ratio):
    model = smollm
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        model(_prompt(model), past_key_values=cache, use_cache=True)
        token = torch.tensor([[42]], device=model.device)

        def step():
            model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache.crop(-1)  # back to BUDGET tokens: same context length every step

        benchmark.pedantic(step, rounds=30, warmup_rounds=3)
    record_ratio(benchmark, GROUP, "reference")


def bench_halo_cache_decode_step(benchmark, smollm, record_ratio):
    model = smollm
    with torch.inference_mode():
        cache = HaloCache(model, HaloConfig(budget=BUDGET, recent_tokens=64, chunk_size=64))
        prompt = _prompt(model)
        for start in range(0, BUDGET, 64):
            model(prompt[:, start:start + 64], past_key_values=cache, use_cache=True, logits_to_keep=1)
        token = torch.tensor([[42]], device=model.device)
        model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        assert cache.n_valid == BUDGET and len(cache.journal) >= 1

        def step():
            model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)

        benchmark.pedantic(step, rounds=30, warmup_rounds=3)
        assert cache.n_valid == BUDGET
    record_ratio(benchmark, GROUP, "halo")
