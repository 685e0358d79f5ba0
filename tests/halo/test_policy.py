"""HaloPolicy's cull order: source priority and line pooling (scores only; brightness is the cache's)."""

from types import SimpleNamespace

import pytest
import torch

from halo import HaloConfig, Session
from halo.backend import REFERENCE
from halo.config import SourcePolicy, default_sources
from halo.cull import select_unit_victims
from halo.policy import HaloPolicy


def fake_cache(config, sources, brightness, units, positions=None):
    """The slots HaloPolicy.scores reads, with the reference backend (positions default to slot order). It holds no
    K/V, so the config's key novelty is switched off (tests/halo/test_key_novelty.py holds that term)."""
    n = len(sources)
    cache = SimpleNamespace(
        config=config.replace(key_weight=0.0), n_valid=n, device=torch.device("cpu"), backend=REFERENCE,
        sources=torch.tensor([config.source_code(s) for s in sources]),
        brightness=torch.tensor(brightness, dtype=torch.float32),
        units=torch.tensor(units, dtype=torch.int64),
        positions=torch.arange(n) if positions is None else torch.tensor(positions))
    return cache


def victims(policy, cache, need):
    """Slots culled to free `need` (nothing protected), unit by unit in dying order."""
    n = cache.n_valid
    policy.attach(cache)
    return select_unit_victims(policy.scores(cache), cache.positions, cache.brightness[:n],
                               torch.zeros(n, dtype=torch.bool), cache.units[:n], need, None).tolist()


def test_default_priorities_order_conversation_above_tool_output():
    sources = default_sources()
    assert sources["user"].priority > sources["assistant"].priority > sources["tool"].priority
    assert sources["tool"].priority == sources["log"].priority == sources["marker"].priority == 0.0
    # dead user text outlives a log line at full brightness unless the line sits in a bright region too
    assert sources["user"].priority - sources["log"].priority > 255


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_priority_must_be_finite(bad):
    with pytest.raises(ValueError, match="priority"):
        SourcePolicy(priority=bad)


@pytest.mark.parametrize("level", [0.0, 40.0, 255.0])
@pytest.mark.parametrize("log_first", [True, False])
def test_user_text_outlives_log_text_of_equal_brightness(log_first, level):
    config = HaloConfig(budget=64, sink_tokens=0, recent_tokens=0)
    user = (["user"] * 4, [0, 0, 1, 1])  # two words
    log = (["log"] * 6, [2, 2, 2, 3, 3, 3])  # two lines
    parts = [log, user] if log_first else [user, log]
    sources = parts[0][0] + parts[1][0]
    units = parts[0][1] + parts[1][1]
    cache = fake_cache(config, sources, [level] * 10, units)
    log_slots = [i for i, s in enumerate(sources) if s == "log"]
    assert sorted(victims(HaloPolicy(), cache, 6)) == log_slots
    # without the priority the oldest text dies first, whatever its source
    flat = config.replace(sources={k: SourcePolicy(v.initial, v.decay, v.pinned) for k, v in config.sources.items()})
    assert sorted(victims(HaloPolicy(), fake_cache(flat, sources, [level] * 10, units), 6))[:6] == list(range(6))


def test_a_log_line_must_score_the_priority_difference_higher_to_outlive_user_text():
    sources = default_sources()
    sources["user"] = SourcePolicy(initial=128.0, decay=1.0, priority=50.0)
    config = HaloConfig(budget=64, sink_tokens=0, recent_tokens=0, dark_bias=0.0, sources=sources)
    # slot 0-1: a user word at 10; slots 2-3: a log line at 59 (dies first), slots 4-5 a log line at 61 (outlives)
    cache = fake_cache(config, ["user"] * 2 + ["log"] * 4, [10.0, 10.0, 59.0, 59.0, 61.0, 61.0], [0, 0, 1, 1, 2, 2])
    assert victims(HaloPolicy(), cache, 4) == [2, 3, 0, 1]


def test_a_long_log_line_does_not_outlive_a_short_one_of_the_same_per_token_brightness():
    config = HaloConfig(budget=64, sink_tokens=0, recent_tokens=0, dark_bias=0.0)
    # slots 0-7: a long line whose tokens average 59 (one of them at 100); slots 8-9: a short line at 60
    long_line = [100.0] + [(59.0 * 8 - 100.0) / 7] * 7
    cache = fake_cache(config, ["log"] * 10, long_line + [60.0, 60.0], [0] * 8 + [1, 1])
    assert victims(HaloPolicy(), cache, 2) == list(range(8))  # the long line goes first, whole
    # scored by its best token (line_pooling="max"), the long line would outlive the short one
    assert victims(HaloPolicy(line_pooling="max"), cache, 2) == [8, 9]


def test_line_pooling_leaves_words_and_plain_tokens_alone():
    config = HaloConfig(budget=64, sink_tokens=0, recent_tokens=0, dark_bias=0.0)
    cache = fake_cache(config, ["user"] * 3 + ["log"] * 2, [10.0, 90.0, 50.0, 20.0, 80.0], [0, 0, -1, 1, 1])
    policy = HaloPolicy()
    policy.attach(cache)
    scores = policy.scores(cache) - config.sources["user"].priority * torch.tensor([1.0, 1, 1, 0, 0])
    assert scores.tolist() == [10.0, 90.0, 50.0, 50.0, 50.0]  # the user word keeps per-token scores (max rule)
    assert cache.brightness.tolist() == [10.0, 90.0, 50.0, 20.0, 80.0]  # brightness untouched


def test_line_pooling_is_checked():
    with pytest.raises(ValueError, match="line_pooling"):
        HaloPolicy(line_pooling="median")


def test_a_user_fact_survives_a_log_flood_many_times_the_budget(tiny_pair):
    model, tok = tiny_pair
    fact = "The pass key is 52445. Remember it."
    log = "".join(f"12:{i:02d} worker {i % 3} processed batch {i} ok\n" for i in range(60))

    def fact_kept(user: SourcePolicy) -> bool:
        sources = default_sources()
        sources["user"] = user
        session = Session(model, tok, HaloConfig(budget=96, sink_tokens=2, recent_tokens=12, chunk_size=16,
                                                 sources=sources))
        session.feed("You are a careful assistant.", source="system")
        start = session.cache.seen
        session.feed(fact, source="user")
        fact_positions = set(range(start, session.cache.seen))
        session.feed(log, source="log")
        assert session.cache.seen > 16 * session.config.budget  # a flood many times the budget
        return fact_positions <= set(session.memory().positions.tolist())

    assert fact_kept(default_sources()["user"])
    # user text born and fading like log text still outlives it, by its priority alone ...
    log_like = default_sources()["log"]
    assert fact_kept(SourcePolicy(log_like.initial, log_like.decay, priority=default_sources()["user"].priority))
    # ... and without it, it dies first: the oldest of equally dark text
    assert not fact_kept(SourcePolicy(log_like.initial, log_like.decay))
