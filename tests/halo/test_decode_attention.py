"""The fused decode attention (halo.decode_attention): output and column mass of one decode row, on CPU.

The operator is held to its PyTorch twin at odd shapes (one slot, 1023 slots, heads holding different counts,
head dims that take the AVX2 path and ones that do not, K/V as strided views of a cache's buffers), the twin to
SDPA and the column mass references it replaces; opcheck; errors that name the problem and leave the mass as it
was; and sessions whose decode steps take the fused path against the same sessions on the reference backend.
"""

import dataclasses

import pytest
import torch

from halo import HaloConfig, Session, decode_attention
from halo.brightness import attention_column_mass, attention_column_mass_heads
from tiny import tiny_llama

needs_operator = pytest.mark.skipif(not decode_attention.operator_available(), reason="halo._C is not built")

SHAPES = [  # hq, hkv, counts per KV head (retained slots before the decode row), d
    (9, 3, [512, 17, 300], 64),
    (9, 3, [512, 512, 512], 64),
    (1, 1, [1022], 8),  # (1, 1, 1023) visible slots
    (6, 2, [0, 6], 24),
    (5, 5, [3, 1, 4, 1, 5], 12),  # a head dim that is not a multiple of 8
    (4, 4, [7, 7, 7, 7], 16),
]


def _case(hq, hkv, counts, d, seed):
    """query [Hq, D]; key, value [Hkv, W, D] views of one layer of a [L, 2, Hkv, C, D] buffer; mass rows."""
    g = torch.Generator().manual_seed(seed)
    width = max(counts) + 1
    buffer = torch.randn(2, 2, hkv, width + 5, d, generator=g)
    query = torch.randn(hq, d, generator=g)
    mass = torch.rand(hkv, width + 4, generator=g) * 100
    last = torch.rand(hkv, width + 4, generator=g)
    return query, buffer[1, 0, :, :width], buffer[1, 1, :, :width], mass, last


def _mass_rows(mass, rows):
    """The per-head target, or one row for the layer (only when every head holds the same count)."""
    return mass if rows == "head" else mass[:1]


@needs_operator
@pytest.mark.parametrize("hq,hkv,counts,d", SHAPES)
@pytest.mark.parametrize("rows", ["head", "layer"])
@pytest.mark.parametrize("with_last", [True, False])
def test_operator_matches_the_reference(hq, hkv, counts, d, rows, with_last):
    if rows == "layer" and len(set(counts)) > 1:
        pytest.skip("a one-row mass needs every head to hold the same slots")
    query, key, value, mass, last = _case(hq, hkv, counts, d, seed=sum(counts) + d)
    counts_t = torch.tensor(counts)
    want_mass, want_last = _mass_rows(mass.clone(), rows), _mass_rows(last.clone(), rows)
    got_mass, got_last = _mass_rows(mass.clone(), rows), _mass_rows(last.clone(), rows)
    want = decode_attention.decode_attention_reference(query, key, value, 0.3, counts_t, want_mass,
                                                       want_last if with_last else None)
    got = torch.ops.halo.decode_attention(query, key, value, 0.3, counts_t, got_mass, got_last if with_last else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_mass, want_mass, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_last, want_last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hq,hkv,counts,d", SHAPES)
def test_reference_is_sdpa_and_the_column_mass(hq, hkv, counts, d):
    query, key, value, mass, last = _case(hq, hkv, counts, d, seed=len(counts) + d)
    group, width = hq // hkv, max(counts) + 1
    got_mass, got_last = mass.clone(), last.clone()
    out = decode_attention.decode_attention_reference(query, key, value, 0.3, torch.tensor(counts), got_mass, got_last)
    visible = torch.arange(width)[None, :] <= torch.tensor(counts)[:, None]  # [Hkv, W]
    mask = visible.repeat_interleave(group, 0)[None, :, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(
        query[None, :, None], key.repeat_interleave(group, 0)[None], value.repeat_interleave(group, 0)[None],
        attn_mask=mask, scale=0.3)
    torch.testing.assert_close(out, want[0, :, 0], rtol=1e-5, atol=1e-5)
    want_mass, want_last = mass.clone(), last.clone()
    attention_column_mass_heads(query[:, None], key, 0.3, counts, want_mass, want_last)
    torch.testing.assert_close(got_mass, want_mass, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got_last, want_last, rtol=1e-5, atol=1e-5)
    if len(set(counts)) == 1:  # one row for the layer: the per-layer column mass
        layer_mass, want_layer = mass[:1].clone(), mass[0].clone()
        decode_attention.decode_attention_reference(query, key, value, 0.3, torch.tensor(counts), layer_mass)
        attention_column_mass(query[:, None], key, 0.3, counts[0], want_layer)
        torch.testing.assert_close(layer_mass[0], want_layer, rtol=1e-5, atol=1e-4)


@needs_operator
def test_opcheck():
    for hq, hkv, counts, d in SHAPES:
        query, key, value, mass, last = _case(hq, hkv, counts, d, seed=d)
        counts_t = torch.tensor(counts)
        torch.library.opcheck(torch.ops.halo.decode_attention.default, (query, key, value, 0.5, counts_t, mass, last))
        torch.library.opcheck(torch.ops.halo.decode_attention.default, (query, key, value, 0.5, counts_t, mass, None))


@needs_operator
@pytest.mark.parametrize("change,match", [
    (dict(mass=torch.zeros(1, 9)), "a one-row mass needs every head to hold the same slots; head 1 holds 4"),
    (dict(counts=torch.tensor([2, 8])), "head 1 holds 8 slots; the key view has 6"),
    (dict(counts=torch.tensor([2.0, 4.0])), "counts must be a CPU int64 \\[Hkv\\]"),
    (dict(value=torch.zeros(2, 6, 8, dtype=torch.float64)), "value must be float32 \\[Hkv, N, D\\]"),
    (dict(value=torch.zeros(2, 6, 16)[..., ::2]), "value must be float32 .* with contiguous rows"),
    (dict(mass=torch.zeros(3, 9)), "mass must be float32 \\[1, C\\] or \\[Hkv, C\\]"),
    (dict(last=torch.zeros(1, 9)), "last_row_mass has 1 rows, mass 2"),
])
def test_operator_errors_name_the_problem(change, match):
    args = dict(query=torch.zeros(4, 8), key=torch.zeros(2, 6, 8), value=torch.zeros(2, 6, 8),
                counts=torch.tensor([2, 4]), mass=torch.zeros(2, 9), last=None)
    args.update(change)
    before = args["mass"].clone()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.halo.decode_attention(args["query"], args["key"], args["value"], 0.5, args["counts"], args["mass"],
                                        args["last"])
    assert torch.equal(args["mass"], before)


def test_reference_refuses_a_one_row_mass_over_unequal_heads():
    with pytest.raises(ValueError, match="one-row mass needs every head to hold the same slots"):
        decode_attention.decode_attention_reference(torch.zeros(4, 8), torch.zeros(2, 6, 8), torch.zeros(2, 6, 8), 0.5,
                                                    torch.tensor([2, 4]), torch.zeros(1, 9))


@needs_operator
@pytest.mark.parametrize("granularity", ["token", "layer", "head"])
def test_sessions_decode_through_it_as_on_the_reference(granularity, tiny_tok):
    """Decode steps take the fused path (counted) and generate what the reference backend generates."""
    model = tiny_llama(seed=3, layers=3, heads=6, kv_heads=2, hidden=48, vocab=320)
    prompt = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(4))
    runs = {}
    for kernels in ("auto", "reference"):
        session = Session(model, tiny_tok, HaloConfig(budget=24, recent_tokens=4, sink_tokens=2, chunk_size=8,
                                                  granularity=granularity, kernels=kernels))
        calls = []
        if kernels == "auto":
            fused = session.cache.backend.decode_attention
            session.cache.backend = dataclasses.replace(session.cache.backend,
                                                        decode_attention=lambda *a: calls.append(1) or fused(*a))
        session.feed_ids(prompt)
        ids = session.generate(12, stop_on_eos=False)
        runs[kernels] = (ids, session.cache.snapshot(), len(calls))
    (ids, auto, calls), (ref_ids, ref, ref_calls) = runs["auto"], runs["reference"]
    assert calls == 12 * 3 and ref_calls == 0  # every layer of every decode step, none on the reference
    assert ids == ref_ids
    assert torch.equal(auto["positions"], ref["positions"])
    torch.testing.assert_close(auto["brightness"], ref["brightness"], rtol=1e-5, atol=1e-3)
