"""Per-layer memory (HaloConfig(granularity="layer")): every layer keeps its own tokens, the accounting stays exact."""

import pytest
import torch

from tiny import tiny_llama
from halo import HaloConfig, Session, SourcePolicy, default_sources
from halo.baselines import make_policy
from halo.eval.runner import policy_setup
from halo.cache import HaloCache
from halo.layered_cache import LayeredHaloCache

TEXT = ("the quick brown fox jumps over the lazy dog and keeps running far away into the night while "
        "seven small owls count 48213 stars above the quiet river bank")
LOG = "".join(f"2026-11-22 12:{i:02d} worker {i % 3} processed batch {i} ok\n" for i in range(24))


def layered(model, tok, policy=None, **changes):
    """A per-layer session. User text decays by 1.0 a row, as much as uniform attention earns: a random tiny
    model's attention is near uniform, and with less decay every token would brighten alike and age would decide."""
    sources = {**default_sources(), "user": SourcePolicy(initial=128.0, decay=1.0, priority=320.0)}
    config = HaloConfig(**{"budget": 40, "sink_tokens": 2, "recent_tokens": 6, "chunk_size": 4, "sources": sources,
                           "granularity": "layer", **changes})
    return Session(model, tok, config, policy=policy)


class KVOracle:
    """Remembers each (layer, position)'s K/V as written; every later read must find exactly that."""

    def __init__(self, cache):
        self.cache, self.seen = cache, {}

    def check(self):
        cache = self.cache
        for layer in range(cache.num_layers):
            for slot in range(cache.layer_length(layer)):
                key = (layer, int(cache.positions[layer, slot]))
                kv = cache.kv[layer, :, :, slot].clone()
                if key in self.seen:
                    assert torch.equal(self.seen[key], kv), f"layer {layer} slot {slot} holds another token's K/V"
                else:
                    self.seen[key] = kv


def check_accounting(session, fed: int):
    cache, config = session.cache, session.config
    counts = cache.layer_counts.tolist()
    assert max(counts) == cache.n_valid <= config.budget
    for row in range(cache.num_rows):  # a layer's (or a KV head's) slots
        positions = cache.positions[row, : counts[row]].tolist()
        assert len(set(positions)) == len(positions)
    mem = session.memory()
    real = [p for p, s in zip(mem.positions.tolist(), mem.sources) if s != "marker"]
    journal = [e.position for e in session.journal.evicted]
    assert sorted(real + journal) == list(range(fed))  # remembered + journal = fed, exactly once each
    assert ((mem.layers >= 1) & (mem.layers <= cache.num_rows)).all()
    stats = session.stats()
    assert stats["remembered"] == len(mem) and stats["remembered"] - stats["markers"] + stats["evicted"] == fed
    return mem


def test_halo_cache_follows_the_granularity(tiny_model):
    assert type(HaloCache(tiny_model, HaloConfig(granularity="layer"))) is LayeredHaloCache
    assert type(HaloCache(tiny_model, HaloConfig(granularity="token"))) is HaloCache
    with pytest.raises(ValueError, match="granularity"):
        HaloConfig(granularity="channel")


def test_without_eviction_the_layered_cache_generates_like_the_token_cache(tiny_pair):
    model, tok = tiny_pair
    token = Session(model, tok, HaloConfig(budget=400, chunk_size=8))
    layer = Session(model, tok, HaloConfig(budget=400, chunk_size=8, granularity="layer"))
    for session in (token, layer):
        session.feed(TEXT)
    torch.testing.assert_close(token.last_logits, layer.last_logits)
    assert token.generate(12) == layer.generate(12)
    assert torch.equal(token.memory().positions, layer.memory().positions)
    assert (layer.memory().layers == model.config.num_hidden_layers).all()


@pytest.mark.parametrize("policy", ["halo", "tova", "h2o", "streaming", "random"])
def test_every_layer_culls_to_budget_with_exact_accounting_and_exact_kv(tiny_pair, policy):
    model, tok = tiny_pair
    model = tiny_llama(vocab=len(tok), layers=3)
    session = layered(model, tok, policy=make_policy(policy))
    oracle = KVOracle(session.cache)
    for word in TEXT.split():
        session.feed(" " + word)
        oracle.check()
        check_accounting(session, session.cache.seen)
    session.generate(10)
    oracle.check()
    mem = check_accounting(session, session.cache.seen)
    assert session.cache.seen > 2 * session.config.budget
    if policy in ("halo", "tova"):  # rules fed by recent attention: layers keep different tokens
        sets = [set(session.cache.positions[layer, : session.cache.layer_length(layer)].tolist())
                for layer in range(3)]
        assert len({frozenset(s) for s in sets}) > 1
        assert len(mem) > session.config.budget  # together they remember more than one budget


def test_layer_zero_keys_match_a_fresh_run_at_their_positions(tiny_pair):
    """Layer 0's keys depend only on the token and its position: compaction must keep both with the slot."""
    from transformers import DynamicCache
    model, tok = tiny_pair
    session = layered(model, tok)
    session.feed(TEXT)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([ids]), past_key_values=full)
    cache = session.cache
    for slot in range(cache.layer_length(0)):
        position = int(cache.positions[0, slot])
        assert int(cache.token_ids[0, slot]) == ids[position]
        torch.testing.assert_close(cache.kv[0, 0, :, slot], full.layers[0].keys[0, :, position], rtol=1e-5, atol=1e-5)


def test_words_die_whole_within_each_layer(tiny_pair):
    model, tok = tiny_pair
    session = layered(model, tok)
    session.feed(TEXT)
    cache = session.cache
    for layer in range(cache.num_layers):
        n = cache.layer_length(layer)
        units = cache.units[layer, :n].tolist()
        positions = cache.positions[layer, :n].tolist()
        for unit in set(units) - {-1}:
            held = sorted(p for p, u in zip(positions, units) if u == unit)
            assert held == list(range(held[0], held[-1] + 1))
            whole = session.memory()
            # every token of a word any layer holds is fed; a layer holding part of a word holds all of it
            word_positions = [p for p, u in zip(whole.positions.tolist(), whole.units.tolist()) if u == unit]
            assert set(held) == set(word_positions) or len(held) == len(word_positions)


def test_log_lines_are_marked_once_no_layer_holds_them(tiny_pair):
    model, tok = tiny_pair
    session = layered(model, tok, budget=60, recent_tokens=10, chunk_size=16)
    session.feed("Check the worker log.")
    session.feed(LOG, source="log")
    mem = check_accounting(session, session.cache.seen)
    assert "marker" in mem.sources and "[...]" in session.memory_text()
    assert session.stats()["markers"] == sum(s == "marker" for s in mem.sources)
    culled_lines = {e.position for e in session.journal.evicted if e.source == "log"}
    text_positions = {p for p, s in zip(mem.positions.tolist(), mem.sources) if s != "marker"}
    assert culled_lines and not culled_lines & text_positions


def test_save_and_load_continue_exactly(tiny_pair, tmp_path):
    model, tok = tiny_pair
    session = layered(model, tok)
    session.feed(TEXT)
    path = session.save(tmp_path / "memory.halo")
    loaded = Session.load(path, model, tok)
    assert loaded.cache.layer_counts.tolist() == session.cache.layer_counts.tolist()
    assert loaded.generate(8) == session.generate(8)
    assert [e.position for e in loaded.journal.evicted] == [e.position for e in session.journal.evicted]


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_a_state_with_wrong_layer_counts_is_refused_and_changes_nothing(tiny_pair, granularity):
    model, tok = tiny_pair
    session = layered(model, tok, granularity=granularity)
    session.feed(TEXT)
    state = session.cache.state_dict()
    other = layered(model, tok, granularity=granularity)
    other.feed("hello there")
    before = other.cache.layer_counts.clone(), other.cache.kv.clone()
    with pytest.raises(ValueError, match="layer_counts"):
        other.cache.load_state_dict(dict(state, layer_counts=state["layer_counts"][:-1]))
    with pytest.raises(ValueError, match="layer_counts"):
        other.cache.load_state_dict(dict(state, layer_counts=[c + 1 for c in state["layer_counts"]]))
    assert torch.equal(other.cache.layer_counts, before[0]) and torch.equal(other.cache.kv, before[1])


def test_eval_rows_name_the_granularity():
    base = HaloConfig()
    assert policy_setup("tova-layer", base)[0] == "tova"
    assert policy_setup("tova-layer", base)[1].granularity == "layer"
    assert policy_setup("halo", base)[1].granularity == "layer"  # the default engine
    assert policy_setup("halo-token", base)[1].granularity == "token"
    assert policy_setup("tova", base)[1].granularity == "token"  # baselines as published
    assert policy_setup("halo+repair", base)[1].repair == "self"
    assert policy_setup("halo-layer+repair", base)[1].granularity == "layer"


def test_html_view_says_how_many_layers_hold_each_token(tiny_pair, tmp_path):
    model, tok = tiny_pair
    session = layered(model, tok)
    session.feed(TEXT)
    page = session.render_html(tmp_path / "memory.html").read_text()
    partial = int((session.memory().layers < model.config.num_hidden_layers).sum())
    assert partial > 0 and page.count(f"of {model.config.num_hidden_layers} layers") == partial
    assert "opacity:" in page


def test_repair_diffs_reach_every_layer_that_holds_the_token(tiny_pair):
    """A diff changes the token in every layer holding it and recomputes its K/V there: layer 0's new key is the
    fresh key of the new token at that position; a layer that does not hold the token is left untouched."""
    from transformers import DynamicCache
    model, tok = tiny_pair
    session = layered(model, tok, budget=30, recent_tokens=4)
    session.feed(TEXT)
    cache = session.cache
    mem = session.memory()
    partial = [i for i in range(len(mem)) if 0 < int(mem.layers[i]) < cache.num_layers and mem.sources[i] != "marker"
               and int(mem.positions[i]) >= session.config.sink_tokens]
    target = partial[0]
    position, old = int(mem.positions[target]), int(mem.token_ids[target])
    new = (old + 7) % len(tok)
    kv_before = cache.kv.clone()
    holders = [layer for layer in range(cache.num_layers)
               if position in cache.positions[layer, : cache.layer_length(layer)].tolist()]
    assert session.apply_diffs([(position, old, new)]) == 1
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([[new]]), position_ids=torch.tensor([[position]]), past_key_values=fresh)
    for layer in range(cache.num_layers):
        held = cache.positions[layer, : cache.layer_length(layer)].tolist()
        if layer in holders:
            slot = held.index(position)
            assert int(cache.token_ids[layer, slot]) == new
            if layer == 0:
                torch.testing.assert_close(cache.kv[0, 0, :, slot], fresh.layers[0].keys[0, :, 0], rtol=1e-5,
                                           atol=1e-5)
        else:
            assert position not in held
            assert torch.equal(cache.kv[layer], kv_before[layer])
    replaced = [e for e in session.journal.entries if e.kind == "replaced"]
    assert [(e.position, e.token_id) for e in replaced] == [(position, old)]
    assert session.memory().token_ids[target] == new


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_self_repair_runs_on_per_layer_memory(tiny_pair, granularity):
    model, tok = tiny_pair
    session = layered(model, tok, repair="self", repair_threshold=200.0, repair_radius=16, repair_margin=0.0,
                      granularity=granularity)
    for word in TEXT.split():
        session.feed(" " + word)
    check_accounting(session, session.cache.seen)
    assert session.stats()["repairs"] == len(session.diffs) > 0
    journal = {(e.position, e.token_id) for e in session.journal.entries if e.kind == "replaced"}
    assert {(p, old) for p, old, _ in session.diffs} == journal


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_an_interrupted_forward_changes_nothing_and_the_session_goes_on(tiny_pair, granularity):
    model, tok = tiny_pair
    session = layered(model, tok, granularity=granularity)
    session.feed(TEXT)
    before = session.memory(), session.cache.layer_counts.clone(), session.cache.positions.clone()

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    hook = model.model.layers[-1].register_forward_hook(interrupt)  # after every layer but the last wrote K/V
    try:
        with pytest.raises(KeyboardInterrupt):
            session.feed(" and then some more words arrive")
    finally:
        hook.remove()
    cache = session.cache
    assert torch.equal(cache.layer_counts, before[1]) and torch.equal(cache.positions, before[2])
    assert torch.equal(session.memory().positions, before[0].positions)
    session.feed(" and then some more words arrive")
    check_accounting(session, cache.seen)
