"""The compiled key cosines (halo.key_novelty, CPU) against the PyTorch reference, in the same run.

What a CPU cull with `HaloConfig.key_weight` spends on key novelty each step: every retained key of every layer
of SmolLM2-135M (30 layers, 3 KV heads, head dim 64, float32) at 512 retained slots, read through the strided view
of the cache's [L, 2, Hkv, C, D] buffers. The operator is CPU-only (CUDA caches run the reference, a few batched
products there), so this runs on CPU everywhere; skipped where `halo._C` is not built.
`pytest benchmarks/bench_key_novelty.py --benchmark-group-by=group` prints the ratio.
"""

import os

import pytest
import torch

from halo import key_novelty

GROUP = "key-cosines-cpu"
LAYERS, HKV, D, N = 30, 3, 64, 512
ROUNDS = int(os.environ.get("HALO_BENCH_ROUNDS") or 50)

pytestmark = pytest.mark.skipif(not key_novelty.operator_available(), reason="halo._C is not built")


@pytest.fixture(scope="module")
def keys_and_counts():
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(LAYERS, 2, HKV, N + 64, D, generator=g)  # the cache's buffers: 64 free slots of headroom
    counts = torch.randint(N - 8, N + 1, (LAYERS, 1), generator=g).expand(LAYERS, HKV)  # per layer, a little ragged
    return kv[:, 0, :, :N], counts


def bench_key_cosines_reference(benchmark, keys_and_counts, record_ratio):
    benchmark.group = GROUP
    benchmark.pedantic(key_novelty.key_cosines_reference, keys_and_counts, rounds=ROUNDS, warmup_rounds=3)
    record_ratio(benchmark, GROUP, "reference")


def bench_key_cosines_operator(benchmark, keys_and_counts, record_ratio):
    benchmark.group = GROUP
    got = benchmark.pedantic(key_novelty.key_cosines, keys_and_counts, rounds=ROUNDS, warmup_rounds=3)
    torch.testing.assert_close(got, key_novelty.key_cosines_reference(*keys_and_counts), rtol=1e-4, atol=2e-5)
    record_ratio(benchmark, GROUP, "halo")
