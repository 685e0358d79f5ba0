"""halo.key_novelty and HaloConfig.key_weight: the cull basis weighed by how unlike its head's keys a key points."""

import math

import pytest
import torch

from halo import HaloConfig, Session
from halo.eval import eval_config, stream_nll
from halo.key_novelty import key_cosines, key_cosines_reference, key_novelty, operator_available
from halo.policy import HaloPolicy
from halo.text import embedded_text


def _reference(kv, n, counts, per_head):
    """Row by row: -cos(key, sum of the held unit keys), centred on the held slots' mean; 0 on free slots."""
    layers, heads = kv.shape[0], kv.shape[2]
    cos = torch.zeros(layers, heads, n, dtype=torch.float64)
    held = torch.zeros(layers, heads, n, dtype=torch.bool)
    for layer in range(layers):
        for head in range(heads):
            if counts is None:
                k = n
            else:
                k = int(counts[layer * heads + head]) if per_head else int(counts[layer])
            keys = kv[layer, 0, head, :n].double()
            anchor = (keys[:k] / keys[:k].norm(dim=-1, keepdim=True)).sum(0)
            cos[layer, head] = keys @ anchor / (keys.norm(dim=-1) * anchor.norm())
            held[layer, head, :k] = True
    if per_head:
        cos, held = cos.reshape(layers * heads, n), held.reshape(layers * heads, n)
    elif counts is not None:
        cos, held = cos.mean(1), held[:, 0]
    else:
        cos, held = cos.mean((0, 1)), held[0, 0]
    rows, masks = cos.reshape(-1, n), held.reshape(-1, n)
    out = torch.stack([torch.where(mask, row[mask].mean() - row, 0.0) for row, mask in zip(rows, masks)])
    return out.reshape(cos.shape)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kind", ["token", "layer", "head"])
def test_novelty_matches_the_row_by_row_reference(dtype, tol, kind):
    torch.manual_seed(0)
    layers, heads, capacity, dim, n = 3, 2, 23, 7, 19  # odd shapes, free slots past n
    kv = torch.randn(layers, 2, heads, capacity, dim).to(dtype)
    counts = {"token": None, "layer": torch.tensor([19, 11, 17]),
              "head": torch.tensor([19, 5, 13, 19, 1, 8])}[kind]
    got = key_novelty(kv, n, counts, per_head=kind == "head")
    want = _reference(kv.float(), n, counts, kind == "head")
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)


def test_a_key_against_the_common_direction_is_the_most_novel_and_norms_do_not_count():
    torch.manual_seed(1)
    kv = torch.zeros(1, 2, 1, 9, 4)
    kv[0, 0, 0, :8] = torch.tensor([1.0, 0.0, 0.0, 0.0]) + 0.1 * torch.randn(8, 4)
    kv[0, 0, 0, 5] = torch.tensor([-1.0, 0.2, 0.0, 0.0])
    novelty = key_novelty(kv, 8, torch.tensor([8]), per_head=False)
    assert int(novelty[0].argmax()) == 5
    assert float(novelty[0].sum()) == pytest.approx(0.0, abs=1e-5)  # centred on the held slots
    scaled = kv.clone()
    scaled[0, 0, 0, :8] *= torch.linspace(0.1, 30.0, 8)[:, None]
    torch.testing.assert_close(key_novelty(scaled, 8, torch.tensor([8]), per_head=False), novelty)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_config_refuses_a_bad_key_weight(bad):
    with pytest.raises(ValueError, match="key_weight must be finite and >= 0"):
        HaloConfig(key_weight=bad)


@pytest.fixture(scope="module")
def pair(tiny_tok):
    from tiny import tiny_llama

    return tiny_llama(vocab=len(tiny_tok)), tiny_tok


@pytest.mark.parametrize("granularity", ["token", "layer", "head"])
def test_the_cull_basis_is_multiplied_by_exp_of_weighted_novelty(pair, granularity):
    """With no dark bias and no words, each held slot's score is its brightness x exp(k x novelty) + priority."""
    model, tok = pair
    k = 2.5
    config = HaloConfig(budget=32, chunk_size=8, recent_tokens=8, dark_bias=0.0, word_units=False,
                        granularity=granularity, key_weight=k)
    session = Session(model, tok, config)
    ids = tok(embedded_text(max_chars=400), add_special_tokens=False)["input_ids"][:24]
    session.step(torch.tensor(ids), "user")
    cache, n = session.cache, session.cache.n_valid
    counts = cache.layer_counts if cache.per_layer else None
    novelty = key_novelty(cache.kv, n, counts, granularity == "head")
    priority = config.source_priorities()[config.source_code("user")]
    want = cache.brightness[..., :n] * torch.exp(k * novelty) + priority
    got = HaloPolicy(dark_bias=0.0).scores(cache)
    if cache.per_layer:
        held = torch.arange(n) < counts[:, None]
        torch.testing.assert_close(got[held], want[held])
    else:
        torch.testing.assert_close(got, want)
    assert not torch.allclose(got, cache.brightness[..., :n] + priority)  # the weight did change the scores


def test_key_weight_keeps_the_budget_and_changes_what_is_kept(pair):
    model, tok = pair
    ids = tok(embedded_text(max_chars=2000), add_special_tokens=False)["input_ids"][:80]
    kept = {}
    for k in (0.0, 3.0):
        run = stream_nll(model, tok, ids, eval_config(24, sinks=2, recent=4, key_weight=k), "halo")
        assert run.max_retained == 24 and all(math.isfinite(x) for x in run.nll)
        kept[k] = run.nll
    assert kept[0.0] != kept[3.0]


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, None])
def test_config_refuses_a_bad_key_refresh(bad):
    with pytest.raises(ValueError, match="key_refresh must be an int >= 1"):
        HaloConfig(key_refresh=bad)


def _kept_by_serial(cache) -> dict[tuple[int, int], float]:
    """(row, serial) -> the novelty kept for it, for every held slot of every row that a cull has claimed (a slot
    written after the last cull holds what its slot held before until the next cull zeroes it)."""
    counts = cache.layer_counts.tolist() if cache.per_layer else [cache.n_valid]
    kept, owner, serials = (cache.slot_field(name).view(len(counts), -1)
                            for name in ("key_novelty", "key_novelty_serial", "serials"))
    return {(row, int(serials[row, j])): float(kept[row, j]) for row, c in enumerate(counts) for j in range(c)
            if owner[row, j] == serials[row, j]}


@pytest.mark.parametrize("granularity", ["token", "layer", "head"])
def test_key_refresh_reuses_the_kept_novelty_between_refreshes(pair, granularity):
    """Single-row forwards: the cull after one that crosses a multiple of key_refresh fed rows computes novelty
    afresh; the others rank by the kept values, which move with their slots."""
    model, tok = pair
    config = HaloConfig(budget=24, chunk_size=8, recent_tokens=4, sink_tokens=2, granularity=granularity,
                        key_weight=3.0, key_refresh=3)
    session = Session(model, tok, config)
    ids = tok(embedded_text(max_chars=600), add_special_tokens=False)["input_ids"][:40]
    session.step(torch.tensor(ids[:24]), "user")  # 24 fed rows: a refresh at the first cull
    changed = []
    for i in range(24, 36):
        before = _kept_by_serial(session.cache)
        session.step(torch.tensor(ids[i:i + 1]), "user")
        after = _kept_by_serial(session.cache)
        same = all(after[key] == value for key, value in before.items() if key in after)
        if (i + 1) % 3:  # no multiple of 3 crossed: reused
            assert same, i
        changed.append(not same)
    assert any(changed)  # the refreshes did recompute


needs_operator = pytest.mark.skipif(not operator_available(), reason="halo._C without key_cosines")


@needs_operator
@pytest.mark.parametrize("shape", [(1, 1, 1023, 64), (3, 2, 19, 7), (2, 3, 1, 5)])
def test_operator_matches_its_reference_on_strided_views(shape):
    layers, heads, n, dim = shape
    g = torch.Generator().manual_seed(n)
    kv = torch.randn(layers, 2, heads, n + 4, dim, generator=g)
    kv[0, 0, 0, n // 2] = 0.0  # a zero key: cosine 0, not NaN
    keys = kv[:, 0, :, :n]  # the strided view the policy passes
    counts = torch.randint(0, n + 1, (layers, heads), generator=g)
    got = torch.ops.halo.key_cosines(keys, counts)
    torch.testing.assert_close(got, key_cosines_reference(keys, counts), atol=2e-5, rtol=1e-4)
    assert float(got[0, 0, n // 2]) == 0.0
    torch.library.opcheck(torch.ops.halo.key_cosines.default, (keys, counts))


@needs_operator
def test_operator_errors_name_the_argument():
    keys, counts = torch.randn(2, 3, 10, 4), torch.full((2, 3), 10)
    with pytest.raises(RuntimeError, match="keys must be Float"):
        torch.ops.halo.key_cosines(keys.double(), counts)
    with pytest.raises(RuntimeError, match=r"counts must be \[2, 3\]"):
        torch.ops.halo.key_cosines(keys, counts[:1])
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.halo.key_cosines(keys, torch.full((2, 3), 11))
    with pytest.raises(RuntimeError, match=r"keys must be \[L, Hkv, n, D\]"):
        torch.ops.halo.key_cosines(keys[0], counts)


def test_dispatch_takes_the_reference_for_other_dtypes():
    keys, counts = torch.randn(2, 3, 10, 4), torch.full((2, 3), 7)
    torch.testing.assert_close(key_cosines(keys.half(), counts), key_cosines_reference(keys.half(), counts))
    torch.testing.assert_close(key_cosines(keys, counts), key_cosines_reference(keys, counts), atol=2e-5, rtol=1e-4)
