"""The fused decode attention (halo.decode_attention, CPU) against what a decode step ran before it, in one run.

One decode row through every layer of SmolLM2-135M (30 layers, 9 query heads, 3 KV heads, head dim 64, float32) at
512 retained slots per KV head (per-head memory: the heads hold 512, 509 and 511), K/V read in place from the
cache's buffers. Groups:
- `decode-attention-cpu`: the operator against its PyTorch twin (`decode_attention_reference`);
- `decode-attention-vs-sdpa`: the operator against SDPA with the per-head masks plus the per-head column mass
  operator (`decode_column_mass_heads`), the two calls it replaces in a per-head decode step.
CPU-only (CUDA caches run the Triton kernels); skipped where `halo._C` is not built.
`pytest benchmarks/bench_decode_attention.py --benchmark-group-by=group` prints the ratios.
"""

import os

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from halo import decode_attention, decode_mass

GROUP, SDPA_GROUP = "decode-attention-cpu", "decode-attention-vs-sdpa"
LAYERS, HQ, HKV, D, N = 30, 9, 3, 64, 512
COUNTS = torch.tensor([N, N - 3, N - 1])
ROUNDS = int(os.environ.get("HALO_BENCH_ROUNDS") or 50)

pytestmark = pytest.mark.skipif(not (decode_attention.operator_available() and decode_mass.operator_available()),
                                reason="halo._C is not built")


class _Attention:
    """What `sdpa_attention_forward` reads of a Llama attention module."""
    is_causal = True
    num_key_value_groups = HQ // HKV
    training = False


@pytest.fixture(scope="module")
def decode_state():
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(LAYERS, 2, HKV, N + 64, D, generator=g)  # the cache's buffers: 64 free slots of headroom
    query = torch.randn(LAYERS, HQ, D, generator=g)
    return kv, query


def _every_layer(attend, kv, query):
    """step() runs `attend(layer, query [Hq, D], key, value [Hkv, N + 1, D], mass, last)` on every layer."""
    mass, last = torch.zeros(HKV, N + 64), torch.zeros(HKV, N + 64)
    outs = []

    def step():
        outs.clear()
        for layer in range(LAYERS):
            outs.append(attend(query[layer], kv[layer, 0, :, : N + 1], kv[layer, 1, :, : N + 1], mass, last))
    return step, mass, outs


def _fused(query, key, value, mass, last):
    return decode_attention.decode_attention(query, key, value, D ** -0.5, COUNTS, mass, last)


def _twin(query, key, value, mass, last):
    return decode_attention.decode_attention_reference(query, key, value, D ** -0.5, COUNTS, mass, last)


_MASK = (torch.arange(N + 1)[None, :] <= COUNTS[:, None]).repeat_interleave(HQ // HKV, 0)[None, :, None, :]


def _sdpa_and_mass(query, key, value, mass, last):
    out, _ = sdpa_attention_forward(_Attention(), query[None, :, None], key[None], value[None], _MASK,
                                    scaling=D ** -0.5)
    decode_mass.attention_column_mass_heads(query[:, None], key, D ** -0.5, COUNTS.tolist(), mass, last)
    return out[0, 0]


def _run(benchmark, attend, decode_state, group, role, record_ratio):
    step, mass, outs = _every_layer(attend, *decode_state)
    benchmark.group = group
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3)
    record_ratio(benchmark, group, role)
    return step, mass, outs


def bench_decode_attention_reference(benchmark, decode_state, record_ratio):
    _run(benchmark, _twin, decode_state, GROUP, "reference", record_ratio)


def bench_decode_sdpa_and_column_mass(benchmark, decode_state, record_ratio):
    _run(benchmark, _sdpa_and_mass, decode_state, SDPA_GROUP, "reference", record_ratio)


def bench_decode_attention_operator(benchmark, decode_state, record_ratio):
    step, mass, outs = _run(benchmark, _fused, decode_state, GROUP, "halo", record_ratio)
    record_ratio(benchmark, SDPA_GROUP, "halo")
    for other in (_twin, _sdpa_and_mass):  # one step each: the same outputs and mass
        other_step, other_mass, other_outs = _every_layer(other, *decode_state)
        mass.zero_()
        step()
        other_step()
        torch.testing.assert_close(torch.stack(outs), torch.stack(other_outs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mass, other_mass, rtol=1e-5, atol=1e-3)
