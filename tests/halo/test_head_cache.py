"""Per-head memory (HaloConfig(granularity="head")): every KV head of every layer keeps its own tokens."""

import pytest
import torch
from transformers import AttentionInterface

from tiny import tiny_llama
from halo import HaloConfig, HeadHaloCache, Session, SourcePolicy, default_sources
from halo.cache import HaloCache
from halo.eval.runner import policy_setup
from halo.forward import head_visibility, stream_spec
from halo.model_runner import ModelRunner

TEXT = ("the quick brown fox jumps over the lazy dog and keeps running far away into the night while "
        "seven small owls count 48213 stars above the quiet river bank")
LOG = "".join(f"2026-11-22 12:{i:02d} worker {i % 3} processed batch {i} ok\n" for i in range(24))


def per_head(model, tok, **changes):
    """A per-head session; user text decays by 1.0 a row (a random tiny model's attention is near uniform)."""
    sources = {**default_sources(), "user": SourcePolicy(initial=128.0, decay=1.0, priority=320.0)}
    config = HaloConfig(**{"budget": 40, "sink_tokens": 2, "recent_tokens": 6, "chunk_size": 4, "sources": sources,
                           "granularity": "head", **changes})
    return Session(model, tok, config)


def held_positions(cache) -> dict[tuple[int, int], list[int]]:
    """(layer, KV head) -> the positions that head holds."""
    counts, heads = cache.layer_counts.tolist(), cache.num_kv_heads
    return {(row // heads, row % heads): cache.positions[row, : counts[row]].tolist() for row in range(len(counts))}


def test_halo_cache_builds_a_per_head_memory(tiny_model):
    cache = HaloCache(tiny_model, HaloConfig(granularity="head", budget=16, recent_tokens=4, chunk_size=4))
    assert isinstance(cache, HeadHaloCache)
    layers, heads = tiny_model.config.num_hidden_layers, tiny_model.config.num_key_value_heads
    assert cache.num_rows == layers * heads
    assert tuple(cache.brightness.shape) == (layers * heads, cache.capacity)
    assert tuple(cache.kv.shape[:3]) == (layers, 2, heads)


def test_a_per_head_memory_takes_recall_and_memory_positions():
    HaloConfig(granularity="head", rope_positions="memory", recall=True).validate()
    with pytest.raises(ValueError, match="recall needs per-layer or per-head memory"):
        HaloConfig(granularity="token", recall=True).validate()


def _masked_attention(held):
    """Eager attention where the last query row of layer l, KV head h sees only `held[(l, h)]` (positions)."""
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        hq, hkv, t, n = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
        group = hq // hkv
        key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        logits = (query @ key.transpose(-1, -2)) * scaling
        visible = torch.ones(hq, t, n, dtype=torch.bool).tril(n - t)
        for head in range(hkv):
            last = torch.zeros(n, dtype=torch.bool)
            last[held[(module.layer_idx, head)]] = True
            last[n - 1] = True  # the row's own token
            visible[head * group:(head + 1) * group, t - 1] = last
        probs = logits.masked_fill(~visible[None], float("-inf")).softmax(-1)
        return (probs @ value).transpose(1, 2).contiguous(), None
    return attention


def test_each_head_attends_to_exactly_the_tokens_it_holds(tiny_pair):
    """Evict different tokens from every (layer, head), feed one token: its logits equal a full run whose last
    row sees, at each layer and head, only what that head holds."""
    model, tok = tiny_pair
    config = HaloConfig(budget=48, sink_tokens=2, recent_tokens=2, chunk_size=32, granularity="head")
    cache = HaloCache(model, config)
    runner = ModelRunner(model, cache)
    ids = torch.randint(0, len(tok), (31,), generator=torch.Generator().manual_seed(3))
    runner.stream(stream_spec(cache, ids[:30], "user"))  # under budget: nothing culled yet
    rows = cache.num_rows
    victims = torch.full((rows, 4), -1, dtype=torch.int64)
    for row in range(rows):  # row r drops r % 4 + 1 slots, each row others
        drop = [(row * 7 + 5 * i) % 26 + 2 for i in range(row % 4 + 1)]
        victims[row, : len(set(drop))] = torch.tensor(sorted(set(drop)))
    cache.evict(victims)
    held = held_positions(cache)
    assert len({len(p) for p in held.values()}) > 1  # the heads of a layer hold different counts
    logits, _ = runner.stream(stream_spec(cache, ids[30:], "user"))

    reference = tiny_llama(vocab=len(tok))
    AttentionInterface.register("test_per_head_mask", _masked_attention(held))
    reference.set_attn_implementation("test_per_head_mask")
    with torch.inference_mode():
        expected = reference(input_ids=ids[None]).logits[0, -1]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_without_eviction_the_per_head_cache_generates_like_the_token_cache(tiny_pair):
    model, tok = tiny_pair
    replies = []
    for granularity in ("token", "head"):
        session = per_head(model, tok, budget=256, granularity=granularity)
        session.feed(TEXT)
        replies.append(session.generate(12))
    assert replies[0] == replies[1]


def test_every_head_culls_to_budget_with_exact_accounting_and_kv(tiny_pair):
    model, tok = tiny_pair
    session = per_head(model, tok)
    cache, written = session.cache, {}
    fed = 0
    for piece in (TEXT, LOG, TEXT, TEXT):
        fed += session.feed(piece, source="log" if piece is LOG else "user")
        counts = cache.layer_counts.tolist()
        assert max(counts) <= session.config.budget
        heads = cache.num_kv_heads
        for row, count in enumerate(counts):  # each head's K/V is the one written for its token, never moved wrong
            layer, head = divmod(row, heads)
            for slot in range(count):
                key = (layer, head, int(cache.serials[row, slot]))  # a marker reuses its run's first position
                kv = cache.kv[layer, :, head, slot].clone()
                assert torch.equal(written.setdefault(key, kv), kv), f"row {row} slot {slot} holds another K/V"
    mem = session.memory()
    real = [p for p, s in zip(mem.positions.tolist(), mem.sources) if s != "marker"]
    assert sorted(real + [e.position for e in session.journal.evicted]) == list(range(fed))
    assert ((mem.layers >= 1) & (mem.layers <= cache.num_rows)).all()
    held = held_positions(cache)
    per_layer = [{tuple(sorted(held[(layer, h)])) for h in range(cache.num_kv_heads)}
                 for layer in range(cache.num_layers)]
    assert any(len(sets) > 1 for sets in per_layer)  # the heads keep different tokens


def test_words_die_whole_within_each_head(tiny_pair):
    model, tok = tiny_pair
    text = TEXT + " " + TEXT + " " + TEXT
    full = per_head(model, tok, budget=512)
    full.feed(text)
    words = {}
    for position, unit in zip(full.memory().positions.tolist(), full.memory().units.tolist()):
        words.setdefault(unit, set()).add(position)
    session = per_head(model, tok)
    session.feed(text)
    cache, cut = session.cache, 0
    for row, count in enumerate(cache.layer_counts.tolist()):
        units, positions = cache.units[row, :count].tolist(), cache.positions[row, :count].tolist()
        for unit in set(units) - {-1}:
            held = {p for p, u in zip(positions, units) if u == unit}
            assert held == words[unit], f"row {row} holds part of word {unit}"
        cut += len(set(words) - set(units))
    assert cut > 0  # some words died in some heads


def test_save_and_load_continue_exactly(tiny_pair, tmp_path):
    model, tok = tiny_pair
    session = per_head(model, tok)
    session.feed(TEXT + " " + TEXT)
    path = session.save(tmp_path / "memory.halo")
    loaded = Session.load(path, model, tok)
    assert isinstance(loaded.cache, HeadHaloCache)
    assert loaded.cache.layer_counts.tolist() == session.cache.layer_counts.tolist()
    assert loaded.generate(8) == session.generate(8)


def test_eval_rows_name_the_head_granularity():
    name, config = policy_setup("halo-head", HaloConfig(value_weight=1.0))
    assert name == "halo" and config.granularity == "head" and config.value_weight == 1.0


def test_log_lines_are_marked_once_no_head_holds_them(tiny_pair):
    model, tok = tiny_pair
    session = per_head(model, tok, budget=60, recent_tokens=10, chunk_size=16)
    session.feed("Check the worker log.")
    session.feed(LOG, source="log")
    mem = session.memory()
    assert "marker" in mem.sources and "[...]" in session.memory_text()
    culled_lines = {e.position for e in session.journal.evicted if e.source == "log"}
    text_positions = {p for p, s in zip(mem.positions.tolist(), mem.sources) if s != "marker"}
    assert culled_lines and not culled_lines & text_positions
    assert sorted(text_positions | {e.position for e in session.journal.evicted}) == list(range(session.cache.seen))


def test_repair_diffs_reach_every_head_that_holds_the_token(tiny_pair):
    """A diff changes the token in every (layer, head) holding it and recomputes its K/V there (layer 0: the fresh
    key of the new token at that position); a head that does not hold it keeps its K/V."""
    from transformers import DynamicCache
    model, tok = tiny_pair
    session = per_head(model, tok, budget=30, recent_tokens=4)
    session.feed(TEXT)
    cache, heads = session.cache, session.cache.num_kv_heads
    mem = session.memory()
    partial = [i for i in range(len(mem)) if 0 < int(mem.layers[i]) < cache.num_rows and mem.sources[i] != "marker"
               and int(mem.positions[i]) >= session.config.sink_tokens]
    target = partial[0]
    position, old = int(mem.positions[target]), int(mem.token_ids[target])
    new = (old + 7) % len(tok)
    before = held_positions(cache)
    kv_before = cache.kv.clone()
    assert session.apply_diffs([(position, old, new)]) == 1
    fresh = DynamicCache(config=model.config)
    with torch.no_grad():
        model(torch.tensor([[new]]), position_ids=torch.tensor([[position]]), past_key_values=fresh)
    after = held_positions(cache)
    for (layer, head), held in after.items():
        row = layer * heads + head
        if position in before[(layer, head)]:
            slot = held.index(position)
            assert int(cache.token_ids[row, slot]) == new
            if layer == 0:
                torch.testing.assert_close(cache.kv[0, 0, head, slot], fresh.layers[0].keys[0, head, 0], rtol=1e-5,
                                           atol=1e-5)
        else:
            assert position not in held
            assert torch.equal(cache.kv[layer, :, head, : len(held)], kv_before[layer, :, head, : len(held)])
    assert session.memory().token_ids[target] == new


def test_html_view_says_how_many_heads_hold_each_token(tiny_pair, tmp_path):
    model, tok = tiny_pair
    session = per_head(model, tok)
    session.feed(TEXT)
    page = session.render_html(tmp_path / "memory.html").read_text()
    rows = session.cache.num_rows
    partial = int((session.memory().layers < rows).sum())
    assert partial > 0 and page.count(f"of {rows} KV heads") == partial


def test_visibility_hides_each_heads_free_slots():
    seen = head_visibility(torch.tensor([2, 4]), 2, 6)
    assert seen[0].tolist() == [[True] * 3 + [False] * 3, [True] * 4 + [False] * 2]
    assert seen[1].tolist() == [[True] * 5 + [False], [True] * 6]


def test_a_cache_class_refuses_a_config_of_another_granularity(tiny_model):
    from halo import LayeredHaloCache
    with pytest.raises(ValueError, match="HeadHaloCache serves granularity 'head'"):
        HeadHaloCache(tiny_model, HaloConfig(value_weight=1.0, budget=16, recent_tokens=4))
    with pytest.raises(ValueError, match="LayeredHaloCache serves granularity 'layer'"):
        LayeredHaloCache(tiny_model, HaloConfig(granularity="head", budget=16, recent_tokens=4))


@pytest.mark.parametrize("suite", ["essays", "conversation"])
def test_eval_refuses_a_setting_a_row_cannot_take_before_any_row_runs(suite):
    from halo.eval.conversation_runner import run_conversations
    from halo.eval.runner import evaluate
    with pytest.raises(ValueError, match="recall needs per-layer or per-head memory"):
        if suite == "essays":  # no model: the check comes before the first row
            evaluate(None, None, ["text"], policies=["full", "halo-head", "halo-token"],
                     config_overrides={"recall": True})
        else:
            run_conversations(None, None, policies=["full", "halo-token"], config_overrides={"recall": True})
