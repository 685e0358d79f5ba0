"""The compiled decode column mass (halo.decode_mass) against the PyTorch reference, on CPU.

Odd shapes (one slot, 1023 slots, non-power-of-two heads and head dims; head dims that are multiples of 8 take the
AVX2 path where the CPU has it, the others the matmul path), GQA and MHA, keys as a strided view of a
larger buffer, with and without the last-row target; opcheck on the operator; the fallbacks; errors that name
the problem.
"""

import pytest
import torch

from halo import HaloCache, HaloConfig, decode_mass
from halo.brightness import attention_column_mass as reference_mass
from tiny import tiny_llama

needs_operator = pytest.mark.skipif(not decode_mass.operator_available(), reason="halo._C is not built")

SHAPES = [  # hq, hkv, n (visible slots), d
    (1, 1, 1, 1),
    (9, 3, 513, 64),
    (4, 4, 1023, 16),
    (6, 2, 7, 24),
    (8, 1, 300, 8),
    (5, 5, 33, 12),  # a head dim that is not a multiple of 8: the matmul path
]


def _case(hq, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(hq, 1, d, generator=g)
    buffer = torch.randn(2, hkv, n + 5, d, generator=g)  # K and V of one layer, 5 free slots after the visible ones
    mass = torch.rand(n + 5, generator=g) * 100  # accumulates onto what is there
    last = torch.rand(n + 5, generator=g)
    return query, buffer[0], mass, last


@needs_operator
@pytest.mark.parametrize("hq,hkv,n,d", SHAPES)
@pytest.mark.parametrize("with_last", [True, False])
def test_decode_row_matches_reference(hq, hkv, n, d, with_last):
    query, key, mass, last = _case(hq, hkv, n, d, seed=hq * 1000 + n)
    want_mass, want_last = mass.clone(), last.clone()
    reference_mass(query, key, 0.3, n - 1, want_mass, want_last if with_last else None)
    decode_mass.attention_column_mass(query, key, 0.3, n - 1, mass, last if with_last else None)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want_last if with_last else last.clone(), rtol=1e-5, atol=1e-5)
    assert torch.equal(mass[n:], want_mass[n:])  # slots past the visible ones are untouched


@needs_operator
def test_update_follows_the_mass():
    query, key, mass, _ = _case(9, 3, 200, 32, seed=1)
    bright = torch.rand(205) * 255
    decay = torch.full((205,), 1.5)
    want_mass, want_bright = mass.clone(), bright.clone()
    from halo.brightness import attention_column_mass_and_update
    attention_column_mass_and_update(query, key, 0.2, 199, want_mass, want_bright, decay, 1.0, 3)
    decode_mass.attention_column_mass_and_update(query, key, 0.2, 199, mass, bright, decay, 1.0, 3)
    torch.testing.assert_close(bright, want_bright, rtol=1e-5, atol=1e-4)


@needs_operator
def test_opcheck():
    for hq, hkv, n, d in SHAPES:
        query, key, mass, last = _case(hq, hkv, n, d, seed=n)
        torch.library.opcheck(torch.ops.halo.decode_column_mass.default, (query[:, 0], key[:, :n], 0.5, mass, last))
        torch.library.opcheck(torch.ops.halo.decode_column_mass.default, (query[:, 0], key[:, :n], 0.5, mass, None))


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 3), (torch.float16, 1), (torch.bfloat16, 1)])
def test_other_cases_run_the_reference(dtype, rows):
    g = torch.Generator().manual_seed(2)
    query, key = torch.randn(4, rows, 8, generator=g).to(dtype), torch.randn(2, 40, 8, generator=g).to(dtype)
    mass, want = torch.zeros(40), torch.zeros(40)
    reference_mass(query, key, 0.5, 40 - rows, want)
    decode_mass.attention_column_mass(query, key, 0.5, 40 - rows, mass)
    assert torch.equal(mass, want)


def test_runs_the_reference_without_the_operator(monkeypatch):
    monkeypatch.setattr(decode_mass, "operator_available", lambda: False)
    query, key, mass, last = _case(6, 2, 50, 16, seed=4)
    want_mass, want_last = mass.clone(), last.clone()
    reference_mass(query, key, 0.5, 49, want_mass, want_last)
    decode_mass.attention_column_mass(query, key, 0.5, 49, mass, last)
    assert torch.equal(mass, want_mass) and torch.equal(last, want_last)


@needs_operator
@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 1, 8), torch.zeros(2, 5, 8), 0.5, torch.zeros(5), None), "query must be \\[Hq, D\\]"),
    ((torch.zeros(4, 8), torch.zeros(3, 5, 8), 0.5, torch.zeros(5), None), "multiple of key heads"),
    ((torch.zeros(4, 8), torch.zeros(2, 5, 7), 0.5, torch.zeros(5), None), "head dims differ"),
    ((torch.zeros(4, 8), torch.zeros(2, 5, 8), 0.5, torch.zeros(4), None), "fewer than the 5 visible keys"),
    ((torch.zeros(4, 8), torch.zeros(2, 5, 8), 0.5, torch.zeros(5, dtype=torch.float64), None), "mass must be float32"),
    ((torch.zeros(4, 8).half(), torch.zeros(2, 5, 8).half(), 0.5, torch.zeros(5), None), "must be float32"),
    ((torch.zeros(4, 8), torch.zeros(2, 5, 8), 0.5, torch.zeros(5), torch.zeros(10)[::2]), "last_row_mass must be a contiguous"),
])
def test_operator_errors_name_the_problem(args, match):
    mass_before = args[3].clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.halo.decode_column_mass(*args)
    assert torch.equal(args[3], mass_before)


@needs_operator
def test_cpu_caches_choose_the_operator_and_match_the_reference():
    model = tiny_llama(seed=5, layers=2, heads=6, kv_heads=2, hidden=48)
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(6))
    caches = {}
    for kernels in ("auto", "reference"):
        cache = HaloCache(model, HaloConfig(budget=16, recent_tokens=4, sink_tokens=2, chunk_size=8, kernels=kernels))
        caches[kernels] = cache
        model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert caches["auto"].backend.name == "cpu-operator" and caches["reference"].backend.name == "reference"
    a, r = caches["auto"], caches["reference"]
    assert torch.equal(a.positions[: a.n_valid].sort().values, r.positions[: r.n_valid].sort().values)
    torch.testing.assert_close(a.brightness[: a.n_valid], r.brightness[: r.n_valid], rtol=1e-5, atol=1e-3)


HEAD_SHAPES = [  # hq, hkv, counts per KV head (retained slots before the decode row), d
    (9, 3, [512, 17, 300], 64),
    (1, 1, [1022], 8),     # (1, 1, 1023) visible slots
    (6, 2, [0, 6], 24),
    (5, 5, [3, 1, 4, 1, 5], 12),  # a head dim that is not a multiple of 8
]


def _head_case(hq, hkv, counts, d, seed):
    g = torch.Generator().manual_seed(seed)
    width = max(counts) + 1
    query = torch.randn(hq, 1, d, generator=g)
    key = torch.randn(hkv, width + 3, d, generator=g)[:, :width]  # the layer's view over a larger buffer
    mass = torch.rand(hkv, width + 4, generator=g) * 100
    last = torch.rand(hkv, width + 4, generator=g)
    return query, key, mass, last


@needs_operator
@pytest.mark.parametrize("hq,hkv,counts,d", HEAD_SHAPES)
@pytest.mark.parametrize("with_last", [True, False])
def test_decode_row_of_every_head_matches_the_reference_head_by_head(hq, hkv, counts, d, with_last):
    from halo.brightness import attention_column_mass_heads
    query, key, mass, last = _head_case(hq, hkv, counts, d, seed=sum(counts))
    base, want_mass, want_last = mass.clone(), mass.clone(), last.clone()
    attention_column_mass_heads(query, key, 0.3, counts, want_mass, want_last if with_last else None)
    decode_mass.attention_column_mass_heads(query, key, 0.3, counts, mass, last if with_last else None)
    torch.testing.assert_close(mass, want_mass, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, want_last, rtol=1e-5, atol=1e-5)
    group = hq // hkv
    for head, n in enumerate(counts):  # the reference is the per-layer column mass of each head alone
        alone = torch.zeros(mass.shape[1])
        reference_mass(query[head * group:(head + 1) * group], key[head:head + 1], 0.3, n, alone)
        torch.testing.assert_close(want_mass[head, : n + 1] - base[head, : n + 1], alone[: n + 1], rtol=1e-4,
                                   atol=1e-4)
        assert torch.equal(mass[head, n + 1:], want_mass[head, n + 1:])  # a head's free slots are untouched


@needs_operator
def test_heads_opcheck():
    for hq, hkv, counts, d in HEAD_SHAPES:
        query, key, mass, last = _head_case(hq, hkv, counts, d, seed=len(counts))
        counts_t = torch.tensor(counts)
        torch.library.opcheck(torch.ops.halo.decode_column_mass_heads.default,
                              (query[:, 0], key, 0.5, counts_t, mass, last))
        torch.library.opcheck(torch.ops.halo.decode_column_mass_heads.default,
                              (query[:, 0], key, 0.5, counts_t, mass, None))


@needs_operator
@pytest.mark.parametrize("counts,mass,match", [
    (torch.tensor([1, 2]), torch.zeros(3, 8), "mass must be float32 \\[Hkv, C\\]"),
    (torch.tensor([1, 2, 3]), torch.zeros(2, 8), "counts must be a CPU int64 \\[Hkv\\]"),
    (torch.tensor([1.0, 2.0]), torch.zeros(2, 8), "counts must be a CPU int64"),
    (torch.tensor([1, 7]), torch.zeros(2, 8), "head 1 holds 7 slots; the key view has 5"),
])
def test_heads_operator_errors_name_the_problem(counts, mass, match):
    before = mass.clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.halo.decode_column_mass_heads(torch.zeros(4, 8), torch.zeros(2, 5, 8), 0.5, counts, mass, None)
    assert torch.equal(mass, before)
