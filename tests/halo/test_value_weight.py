"""HaloConfig.value_weight: per-layer (and per-head) brightness income weighed by each slot's value norm."""

import pytest
import torch

from tiny import tiny_llama
from halo import HaloConfig, Session
from halo.brightness import rows_seeing, value_norms, value_weights, value_weights_rows

TEXT = ("the quick brown fox jumps over the lazy dog and keeps running far away into the night while "
        "seven small owls count 48213 stars above the quiet river bank")


def test_config_refuses_bad_value_weights():
    with pytest.raises(ValueError, match="value_weight must be finite and >= 0"):
        HaloConfig(value_weight=-1.0)
    with pytest.raises(ValueError, match="value_weight must be finite"):
        HaloConfig(value_weight=float("inf"))
    with pytest.raises(ValueError, match="value_weight needs per-layer or per-head memory"):
        HaloConfig(value_weight=1.0, granularity="token")
    assert HaloConfig().value_weight == 0.0  # DESIGN.md's rule by default


def test_value_weights_have_mean_one_and_follow_the_norms():
    norms = torch.tensor([1.0, 2.0, 4.0, 1.0])
    for power in (0.5, 1.0, 2.0):
        w = value_weights(norms, power)
        torch.testing.assert_close(w.mean(), torch.tensor(1.0))
        torch.testing.assert_close(w / w[0], (norms / norms[0]) ** power)
    torch.testing.assert_close(value_weights(norms, 0.0), torch.ones(4))
    torch.testing.assert_close(value_norms(torch.ones(2, 3, 4) * torch.tensor([1.0, 3.0])[:, None, None]),
                               torch.full((3,), 4.0))  # norms 2 and 6, mean over the 2 KV heads


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_value_weights_rows_are_each_rows_value_weights_then_ones(power):
    norms = torch.rand(5, 1023, generator=torch.Generator().manual_seed(0)) * 3
    ends = torch.tensor([1, 1023, 7, 512, 1000])
    got = value_weights_rows(norms, ends, power)
    for row, end in enumerate(ends.tolist()):
        torch.testing.assert_close(got[row, :end], value_weights(norms[row, :end], power))
        assert bool((got[row, end:] == 1).all())


def _expected_norms(cache, row: int, count: int) -> torch.Tensor:
    """The value norms row `row` must hold in its first `count` slots: per layer the mean over the layer's KV heads,
    per KV head (row l * Hkv + h) head h's own."""
    if cache.granularity == "layer":
        return value_norms(cache.kv[row, 1, :, :count])
    layer, head = divmod(row, cache.num_kv_heads)
    return cache.kv[layer, 1, head, :count].float().norm(dim=-1)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_first_forward_income_is_the_attention_income_times_the_weights(tiny_pair, granularity):
    """One forward from empty (no cull): brightness - (initial - decay * rows seeing) is alpha * mass at weight 0
    and alpha * mass * value_weights at weight 1, row by row (a layer, or per KV head that head's own norms)."""
    model, tok = tiny_pair
    sessions = {p: Session(model, tok, HaloConfig(budget=400, chunk_size=256, value_weight=p, granularity=granularity))
                for p in (0.0, 1.0)}
    for session in sessions.values():
        session.feed(TEXT)
    plain, weighed = sessions[0.0].cache, sessions[1.0].cache
    n = plain.n_valid
    user = plain.config.sources["user"]
    base = user.initial - user.decay * rows_seeing(0, n, "cpu").float()
    gain0, gain1 = plain.brightness[:, :n] - base, weighed.brightness[:, :n] - base
    kept = (plain.brightness[:, :n] > 0) & (plain.brightness[:, :n] < 255) & (weighed.brightness[:, :n] > 0) \
        & (weighed.brightness[:, :n] < 255)
    assert kept.float().mean() > 0.5
    for row in range(plain.num_rows):
        norms = weighed.slot_field("value_norm")[row, :n]
        torch.testing.assert_close(norms, _expected_norms(weighed, row, n))
        mask = kept[row]
        torch.testing.assert_close(gain1[row][mask], (gain0[row] * value_weights(norms, 1.0))[mask],
                                   rtol=1e-4, atol=1e-3)
    if granularity == "head":  # each head its own norms
        assert not torch.allclose(weighed.slot_field("value_norm")[0, :n], weighed.slot_field("value_norm")[1, :n])


def test_value_norms_move_with_their_slots_through_culls(tiny_pair):
    """After many culls and compactions every held slot's recorded norm is the norm of the value it holds."""
    model, tok = tiny_pair
    model = tiny_llama(vocab=len(tok), layers=3)
    session = Session(model, tok, HaloConfig(budget=40, sink_tokens=2, recent_tokens=6, chunk_size=4,
                                             value_weight=1.0))
    for word in (TEXT + " " + TEXT).split():
        session.feed(" " + word)
    session.generate(8)
    cache = session.cache
    assert cache.seen > 2 * session.config.budget
    for layer in range(cache.num_layers):
        count = cache.layer_length(layer)
        torch.testing.assert_close(cache.slot_field("value_norm")[layer, :count],
                                   value_norms(cache.kv[layer, 1, :, :count]))


def test_a_saved_session_keeps_its_value_norms(tiny_pair, tmp_path):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=40, sink_tokens=2, recent_tokens=6, chunk_size=8,
                                             value_weight=0.5))
    session.feed(TEXT)
    restored = Session.load(session.save(tmp_path / "s.halo"), model, tok)
    assert restored.config.value_weight == 0.5
    n = session.cache.n_valid
    torch.testing.assert_close(restored.cache.slot_field("value_norm")[:, :n],
                               session.cache.slot_field("value_norm")[:, :n])
    session.feed(" and more")
    restored.feed(" and more")
    for layer in range(session.cache.num_layers):
        count = session.cache.layer_length(layer)
        assert restored.cache.layer_length(layer) == count
        torch.testing.assert_close(restored.cache.brightness[layer, :count], session.cache.brightness[layer, :count])


def test_eval_rows_at_token_level_drop_the_value_weight():
    """`halo eval --set value_weight=P` weighs the per-layer rows; token-level rows (the baselines as published,
    `halo-token`) cannot read it and run without it."""
    from halo.eval.runner import policy_setup

    config = HaloConfig(value_weight=1.0)
    assert policy_setup("halo", config)[1].value_weight == 1.0
    assert policy_setup("halo+recall", config)[1].value_weight == 1.0
    assert policy_setup("halo-head", config)[1].value_weight == 1.0
    for row in ("tova", "streaming", "halo-token", "full"):
        name, cfg = policy_setup(row, config)
        assert cfg.granularity == "token" and cfg.value_weight == 0.0


def test_per_head_value_norms_move_with_their_slots_through_culls_markers_and_recall(tiny_pair):
    """Culls, compactions, markers, and recall (at threshold 0 every user forward brings text back and recomputes
    its own rows as patch rows): every held slot's norm stays its head's value norm."""
    model, tok = tiny_pair
    model = tiny_llama(vocab=len(tok), layers=3)
    session = Session(model, tok, HaloConfig(budget=40, sink_tokens=2, recent_tokens=6, chunk_size=4,
                                             value_weight=1.0, granularity="head", recall=True, recall_threshold=0.0,
                                             recall_tokens=6, recall_context=2, recall_grace=8))
    for start in range(0, len(TEXT), 24):
        session.feed(TEXT[start:start + 24])
        session.feed("2026-11-22 worker 3 processed batch 7 ok\n", "log")
    session.generate(8)
    cache, stats = session.cache, session.stats()
    assert cache.seen > 2 * session.config.budget and stats["markers"] > 0 and stats["recalled"] > 0
    for row in range(cache.num_rows):
        count = int(cache.layer_counts[row])
        torch.testing.assert_close(cache.slot_field("value_norm")[row, :count], _expected_norms(cache, row, count))
