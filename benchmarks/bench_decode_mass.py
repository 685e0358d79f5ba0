"""The compiled decode column mass (halo.decode_mass, CPU) against the PyTorch reference, in the same run.

One decode step's capture on every layer of SmolLM2-135M (30 layers, 9 query heads, 3 KV heads, head dim 64,
float32) at 512 retained slots: what a CPU `Session.generate` step spends on attention mass. The operator is
CPU-only (CUDA caches run the Triton kernels), so this runs on CPU everywhere; skipped where `halo._C` is not
built. `pytest benchmarks/bench_decode_mass.py --benchmark-group-by=group` prints the ratio.
"""

import os

import pytest
import torch

from halo import decode_mass
from halo.brightness import attention_column_mass

GROUP = "decode-column-mass-cpu"
LAYERS, HQ, HKV, D, N = 30, 9, 3, 64, 512
ROUNDS = int(os.environ.get("HALO_BENCH_ROUNDS") or 50)

pytestmark = pytest.mark.skipif(not decode_mass.operator_available(), reason="halo._C is not built")


@pytest.fixture(scope="module")
def decode_state():
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(LAYERS, 2, HKV, N + 64, D, generator=g)  # the cache's buffers: 64 free slots of headroom
    query = torch.randn(LAYERS, HQ, 1, D, generator=g)
    return kv, query


def _capture_every_layer(mass_fn, kv, query):
    mass, last = torch.zeros(N + 64), torch.zeros(N + 64)

    def step():
        for layer in range(LAYERS):
            mass_fn(query[layer], kv[layer, 0, :, :N], D ** -0.5, N - 1, mass, last)
    return step, mass


def bench_decode_mass_reference(benchmark, decode_state, record_ratio):
    step, _ = _capture_every_layer(attention_column_mass, *decode_state)
    benchmark.group = GROUP
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3)
    record_ratio(benchmark, GROUP, "reference")


def bench_decode_mass_operator(benchmark, decode_state, record_ratio):
    step, mass = _capture_every_layer(decode_mass.attention_column_mass, *decode_state)
    benchmark.group = GROUP
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3)
    ref_step, ref_mass = _capture_every_layer(attention_column_mass, *decode_state)
    mass.zero_()
    step()
    ref_step()
    torch.testing.assert_close(mass, ref_mass, rtol=1e-5, atol=1e-4)  # one step each: the same mass
    record_ratio(benchmark, GROUP, "halo")
