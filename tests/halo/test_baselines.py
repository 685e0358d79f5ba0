"""Baseline cull policies on the same HaloCache: exactness without eviction, budget, protected set, positions."""

import pytest
import torch

from halo.baselines import ALL_POLICY_NAMES, POLICIES, H2OPolicy, StreamingPolicy, make_policy
from halo.eval import eval_config, stream_nll
from halo.text import embedded_text


@pytest.fixture(scope="module")
def pair(tiny_tok):
    from tiny import tiny_llama

    return tiny_llama(vocab=len(tiny_tok)), tiny_tok


@pytest.fixture(scope="module")
def ids(tiny_tok):
    return tiny_tok(embedded_text(max_chars=2000), add_special_tokens=False)["input_ids"][:72]


def test_every_policy_equals_full_when_the_budget_covers_the_text(pair, ids):
    model, tok = pair
    text = ids[:40]
    config = eval_config(48, sinks=2, recent=6)
    full = stream_nll(model, tok, text, config, "full").nll
    for name in POLICIES:  # equal up to float rounding: a policy that reads no attention decodes through SDPA,
        # one that does through the fused decode operator on the CPU (halo.decode_attention: another summation order)
        assert stream_nll(model, tok, text, config, name).nll == pytest.approx(full, rel=1e-5, abs=1e-5), name


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_respects_budget_and_protected_set(pair, ids, name):
    model, tok = pair
    budget, sinks, recent = 24, 2, 6
    config = eval_config(budget, sinks=sinks, recent=recent)

    def check(session):
        cache = session.cache
        assert cache.n_valid <= budget
        rows = cache.positions[:, : cache.n_valid] if cache.per_layer else cache.positions[None, : cache.n_valid]
        for layer, row in enumerate(rows):  # `halo` keeps one set per layer, the baselines one for all
            held = row[: cache.layer_length(layer)].tolist()
            kept = set(held)
            seen = cache.seen
            assert set(range(min(sinks, seen))) <= kept
            assert set(range(max(0, seen - recent), seen)) <= kept
            assert len(kept) == len(held)  # no duplicated positions after compaction

    run = stream_nll(model, tok, ids, config, name, seed=3, on_step=check)
    assert run.max_retained == budget and run.steps == len(ids)


def test_streaming_keeps_exactly_sinks_and_the_most_recent_tokens(pair, ids):
    model, tok = pair
    budget, sinks = 20, 3

    def check(session):
        cache = session.cache
        got = sorted(cache.positions[: cache.n_valid].tolist())
        seen = cache.seen
        if seen <= budget:
            assert got == list(range(seen))
        else:
            assert got == list(range(sinks)) + list(range(seen - (budget - sinks), seen))
        assert sorted(cache.token_ids[: cache.n_valid][torch.argsort(cache.positions[: cache.n_valid])].tolist()) == \
            sorted(ids[p] for p in got)

    stream_nll(model, tok, ids, eval_config(budget, sinks=sinks, recent=4), "streaming", on_step=check)


def test_h2o_accumulates_the_mass_each_token_received(pair, ids):
    model, tok = pair
    text = ids[:30]
    expected: dict[int, float] = {}

    def track(session):
        cache = session.cache
        for pos, m in zip(cache.positions[: cache.n_valid].tolist(), cache.mass[: cache.n_valid].tolist()):
            expected[pos] = expected.get(pos, 0.0) + m
        got = dict(zip(cache.positions[: cache.n_valid].tolist(), cache.slot_field("h2o_score")[: cache.n_valid].tolist()))
        for pos, value in got.items():
            assert value == pytest.approx(expected[pos], rel=1e-5, abs=1e-5)

    # no eviction here: `cache.mass` is indexed by slot before compaction, so read it only while slots stay put
    stream_nll(model, tok, text, eval_config(40, sinks=2, recent=4), "h2o", on_step=track)


def test_make_policy_names():
    assert ALL_POLICY_NAMES[0] == "full" and set(ALL_POLICY_NAMES[1:]) == {"streaming", "h2o", "tova", "random", "halo", "halo-mean"}
    assert isinstance(make_policy("streaming"), StreamingPolicy) and isinstance(make_policy("h2o"), H2OPolicy)
    assert make_policy("random", seed=5).seed == 5
    for name in POLICIES:
        assert POLICIES[name].__doc__ and make_policy(name).name == name
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("full")
