"""Session invariants on a tiny random Llama with an in-process tokenizer."""

import pytest
import torch

from tiny import tiny_llama
from halo import HaloConfig, Session

LOG = "".join(f"2026-11-22 12:{i:02d} worker {i % 3} processed batch {i} ok\n" for i in range(40))


def check_invariants(session, fed_positions):
    cache, config = session.cache, session.config
    n = cache.n_valid
    assert n <= config.budget
    mem = session.memory()
    marker = [s == "marker" for s in mem.sources]
    real_positions = [p for p, m in zip(mem.positions.tolist(), marker) if not m]
    journal_positions = [e.position for e in session.journal.evicted]
    # nothing lost: every fed position is retained or journaled, exactly once
    assert sorted(real_positions + journal_positions) == sorted(fed_positions)
    assert all(0 <= b <= 255 for b in mem.brightness.tolist())
    seen = cache.seen
    for p in range(min(config.sink_tokens, seen)):
        assert p in real_positions
    for p in range(max(0, seen - config.recent_tokens), seen):
        assert p in real_positions
    return mem, marker


def test_budget_holds_and_nothing_is_lost(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=40, sink_tokens=2, recent_tokens=8, chunk_size=8))
    session.feed("You are a careful assistant.", source="system")
    pinned = session.cache.seen
    fed = list(range(pinned))
    for i in range(6):
        start = session.cache.seen
        session.feed(f"Message {i}: the quick brown fox jumps over the lazy dog number {i}.", source="user")
        fed += list(range(start, session.cache.seen))
        check_invariants(session, fed)
    start = session.cache.seen
    reply = session.generate(12)
    fed += list(range(start, session.cache.seen))
    assert isinstance(reply, str)
    mem, _ = check_invariants(session, fed)
    assert set(range(pinned)) <= set(mem.positions.tolist())  # pinned system text never dies
    stats = session.stats()
    assert stats["retained"] <= 40 and stats["evicted"] == len(session.journal.evicted) > 0
    assert {"tokens_fed", "retained", "evicted", "steps", "halo_seconds", "model_seconds"} <= set(stats)


def test_log_lines_die_whole_and_leave_one_merged_marker(tiny_pair):
    model, tok = tiny_pair
    config = HaloConfig(budget=60, sink_tokens=2, recent_tokens=10, chunk_size=16)
    session = Session(model, tok, config)
    session.feed("Check the worker log.", source="user")
    first_log = session.cache.seen
    session.feed(LOG, source="log")
    fed = list(range(session.cache.seen))
    mem, marker = check_invariants(session, fed)
    dead_positions = {e.position for e in session.journal.evicted}
    assert dead_positions
    # units die whole: every log line is either fully retained or fully journaled
    from halo.units import tokenize_lines
    _, lines = tokenize_lines(tok, LOG, add_special_tokens=False)
    line_positions = {}
    for offset, line in enumerate(lines):
        line_positions.setdefault(line, []).append(first_log + offset)
    line_starts = {positions[0] for positions in line_positions.values()}
    for line, positions in line_positions.items():
        dead = [p in dead_positions for p in positions]
        assert all(dead) or not any(dead), f"line {line} partly culled"
    # markers: each sits at the first position of a culled line, and no two are adjacent
    units = mem.units.tolist()
    marker_starts = {}
    for position, unit, is_marker in zip(mem.positions.tolist(), units, marker):
        if is_marker:
            marker_starts.setdefault(unit, position)
    assert marker_starts, "culled log lines must leave an elision marker"
    for start in marker_starts.values():
        assert start in line_starts and start in dead_positions
    kinds = "".join("M" if m else "T" for m in marker)
    assert "M" * (len(session.markers.token_ids) + 1) not in kinds, "adjacent markers must merge"
    assert config.marker_text in session.memory_text()
    # the conversation goes on: the budget still holds
    session.feed("What failed?", source="user")
    check_invariants(session, list(range(session.cache.seen)))


def test_bad_input_is_rejected_and_session_stays_usable(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=30, sink_tokens=2, recent_tokens=6, chunk_size=8))
    session.feed("hello there", source="user")
    before = (session.cache.n_valid, session.cache.seen, session.cache.brightness.clone())
    with pytest.raises(ValueError, match="empty"):
        session.feed("")
    with pytest.raises(TypeError, match="str"):
        session.feed(b"bytes")
    with pytest.raises(ValueError, match="unknown source 'narrator'"):
        session.feed("text", source="narrator")
    with pytest.raises(ValueError, match="protected set"):
        session.feed("a very long system prompt " * 10, source="system")
    with pytest.raises(ValueError, match="device"):
        session.feed_ids(torch.tensor([1, 2], device="meta"))
    with pytest.raises(ValueError, match="int64"):
        session.feed_ids(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="out of range"):
        session.feed_ids(torch.tensor([1, 100000]))
    with pytest.raises(ValueError, match="1-D"):
        session.feed_ids(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        session.generate(-1)
    assert (session.cache.n_valid, session.cache.seen) == before[:2]
    assert torch.equal(session.cache.brightness, before[2])
    session.feed("still works", source="user")
    assert session.cache.seen > before[1]


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="protected set"):
        HaloConfig(budget=10, sink_tokens=4, recent_tokens=6)
    with pytest.raises(ValueError, match="budget must be a positive int"):
        HaloConfig(budget=0)
    from halo import SourcePolicy
    with pytest.raises(ValueError, match="decay"):
        SourcePolicy(initial=10, decay=-1)
    with pytest.raises(ValueError, match="initial"):
        SourcePolicy(initial=300)
    with pytest.raises(ValueError, match="cull_threshold"):
        HaloConfig(cull_threshold=float("nan"))
    with pytest.raises(ValueError, match="repair_margin"):
        HaloConfig(repair="self", repair_margin=float("nan"))
    with pytest.raises(ValueError, match="repair_guidance"):
        HaloConfig(repair="self", repair_guidance="gentle")
    with pytest.raises(ValueError, match="repair_rerank must be None or an int >= 2"):
        HaloConfig(repair="self", repair_rerank=1)


def test_generate_needs_context_and_greedy_matches_hf(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=200, recent_tokens=8))
    with pytest.raises(ValueError, match="feed"):
        session.generate(3)
    prompt = "the quick brown fox"
    session.feed(prompt)
    got = session.generate(20, stop_on_eos=False)
    plain = tiny_llama(vocab=len(tok))
    plain.load_state_dict(model.state_dict())
    ids = torch.tensor([tok(prompt)["input_ids"]])
    expected = plain.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None)
    assert got == tok.decode(expected[0, ids.shape[1]:])


def test_cull_threshold_kills_neglected_tokens_under_budget(tiny_pair):
    model, tok = tiny_pair
    from halo import SourcePolicy, default_sources
    sources = default_sources()
    sources["user"] = SourcePolicy(initial=20.0, decay=5.0)
    session = Session(model, tok, HaloConfig(budget=500, sink_tokens=1, recent_tokens=4, chunk_size=4,
                                             cull_threshold=1.0, sources=sources))
    session.feed("one two three four five six seven eight nine ten eleven twelve")
    assert len(session.journal) > 0 and session.cache.n_valid < session.cache.seen
    assert all(e.brightness <= 1.0 for e in session.journal)


def _fresh_keys_values(model, token_ids, positions):
    """Per-layer (K, V) [Hkv, D] of the last token, running the model from scratch on these tokens."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([token_ids]), position_ids=torch.tensor([positions]), past_key_values=cache)
    return [(layer.keys[0, :, -1], layer.values[0, :, -1]) for layer in cache.layers]


def test_kv_patch_equals_running_the_model_on_the_retained_prefix(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=300, sink_tokens=2, recent_tokens=4, chunk_size=16,
                                             granularity="token"))
    session.feed("the quick brown fox jumps over the lazy dog and keeps running far away")
    snap = session.memory()
    ids, positions = snap.token_ids.tolist(), snap.positions.tolist()
    target = 7
    new_id = (ids[target] + 5) % len(tok)
    applied = session.apply_diffs([(positions[target], ids[target], new_id)])
    assert applied == 1 and session.diffs == [(positions[target], ids[target], new_id)]
    expected = _fresh_keys_values(model, ids[:target] + [new_id], positions[:target + 1])
    cache = session.cache
    slot = int((cache.positions[: cache.n_valid] == positions[target]).nonzero())
    for layer, (k, v) in enumerate(expected):
        torch.testing.assert_close(cache.kv[layer, 0, :, slot], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.kv[layer, 1, :, slot], v, rtol=1e-5, atol=1e-5)
    assert cache.n_valid == len(ids) and int(cache.token_ids[slot]) == new_id
    replaced = [e for e in session.journal.entries if e.kind == "replaced"]
    assert [(e.position, e.token_id) for e in replaced] == [(positions[target], ids[target])]
    assert session.memory_text() == tok.decode(ids[:target] + [new_id] + ids[target + 1:])


def test_kv_patch_after_evictions_uses_the_cached_prefix(tiny_pair):
    from transformers import DynamicCache
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=24, sink_tokens=2, recent_tokens=4, chunk_size=4,
                                             granularity="token"))
    session.feed("the quick brown fox jumps over the lazy dog and keeps running far away into the night")
    cache = session.cache
    snap = session.memory()
    order = torch.sort(cache.positions[: cache.n_valid]).indices
    target_rank = 10
    slot = int(order[target_rank])
    position, old = int(cache.positions[slot]), int(cache.token_ids[slot])
    prefix = order[:target_rank]
    reference = DynamicCache(config=model.config)
    for layer in range(model.config.num_hidden_layers):
        reference.update(cache.kv[layer, 0, None, :, prefix].clone(), cache.kv[layer, 1, None, :, prefix].clone(), layer)
    new_id = (old + 3) % len(tok)
    with torch.no_grad():
        model(torch.tensor([[new_id]]), position_ids=torch.tensor([[position]]), past_key_values=reference)
    session.apply_diffs([(position, old, new_id)])
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(cache.kv[layer, 0, :, slot], reference.layers[layer].keys[0, :, -1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.kv[layer, 1, :, slot], reference.layers[layer].values[0, :, -1], rtol=1e-5, atol=1e-5)
    assert len(snap) == cache.n_valid


def test_bad_diffs_apply_nothing(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=100, recent_tokens=4))
    session.feed("hello there general kenobi")
    snap = session.memory()
    p, old = int(snap.positions[3]), int(snap.token_ids[3])
    kv = session.cache.kv.clone()
    for bad, message in [([(p, old, 1), (p + 1000, 0, 1)], "not a retained"), ([(p, old + 1, 2)], "holds token"),
                         ([(p, old, 10 ** 6)], "out of range"), ([(p, old, 1), (p, old, 2)], "twice")]:
        with pytest.raises(ValueError, match=message):
            session.apply_diffs(bad)
    assert torch.equal(session.cache.kv, kv) and session.diffs == [] and len(session.journal.entries) == 0
