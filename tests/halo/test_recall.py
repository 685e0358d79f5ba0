"""Recall (HaloConfig(recall=True), halo.recall): forgotten units come back whole, at their positions, in every
layer (per-layer memory) or every KV head (per-head memory), with the budget and the accounting exact at every
step."""

import io

import pytest
import torch

from tiny import tiny_llama
from halo import HaloConfig, Session, SourcePolicy, default_sources
from halo.cli.chat import run_chat
from halo.eval.runner import policy_setup
from halo.recall import pick_units
from halo.units import sentence_end_table, word_table
from halo.render import render_html
from recall_session import QUESTION, TEXT, check_accounting, recalling

GRANULARITIES = pytest.mark.parametrize("granularity", ["layer", "head"])


@GRANULARITIES
def test_recall_holds_the_budget_and_the_accounting_at_every_step(tiny_tok, granularity):
    session = recalling(tiny_llama(layers=3, vocab=len(tiny_tok)), tiny_tok, granularity=granularity)
    for _ in range(3):
        session.feed(TEXT, "user")
        check_accounting(session)
        session.feed("2026-11-22 worker 3 processed batch 7 ok\n" * 3, "tool")
        check_accounting(session)
    session.feed(QUESTION, "user")
    session.generate(6, stop_on_eos=False)
    check_accounting(session)
    stats = session.stats()
    assert stats["recalled"] > 0 and stats["archived"] > 0 and session.recall.events > 0
    assert session.journal.count("recalled") == stats["recalled"] == session.recall.recalled


def _layer0_keys(cache) -> dict[tuple[int, int], torch.Tensor]:
    """(KV head, position) -> layer 0's key of every slot layer 0 holds (per head, each head's own slots)."""
    rows = cache.rows_per_layer  # layer 0's rows: 1 per layer, Hkv per KV head
    heads = cache.num_kv_heads // rows
    keys = {}
    for row in range(rows):
        for slot in range(int(cache.layer_counts[row])):
            for head in range(row * heads, (row + 1) * heads):
                keys[(head, int(cache.positions[row, slot]))] = cache.kv[0, 0, head, slot]
    return keys


@GRANULARITIES
def test_recalled_tokens_return_at_their_positions_with_their_layer0_keys(tiny_tok, granularity):
    """Layer 0's K/V depend only on the token and its position: a recalled token's must match the original's
    (text positions; with memory positions, tests/halo/test_archive_positions.py)."""
    session = recalling(tiny_llama(layers=2, vocab=len(tiny_tok)), tiny_tok, granularity=granularity,
                        rope_positions="text")
    cache, first_k = session.cache, {}
    for start in range(0, 3 * len(TEXT), 40):
        session.feed((TEXT * 3)[start:start + 40], "user")
        for where, key in _layer0_keys(cache).items():
            first_k.setdefault(where, key.clone())
    recalled_positions = {e.position for e in session.journal if e.kind == "recalled"}
    assert recalled_positions
    checked = 0
    for (head, position), key in _layer0_keys(cache).items():
        if position in recalled_positions:
            torch.testing.assert_close(key, first_k[(head, position)], rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 0
    evicted = {e.position for e in session.journal.evicted}
    assert recalled_positions <= evicted  # only what was forgotten comes back


def test_recall_sources_choose_which_forwards_score_the_archive(tiny_tok):
    session = recalling(tiny_llama(layers=2, vocab=len(tiny_tok)), tiny_tok, recall_sources=("tool",))
    for _ in range(3):
        session.feed(TEXT, "user")
    assert session.stats()["recalled"] == 0 and session.stats()["archived"] > 0


@pytest.mark.parametrize("chunk,min_rows,recalls", [(4, 5, False), (4, 4, True), (1, 2, False), (1, 1, True)])
def test_forwards_with_fewer_rows_than_recall_min_rows_do_not_score_the_archive(tiny_tok, chunk, min_rows, recalls):
    session = recalling(tiny_llama(layers=2, vocab=len(tiny_tok)), tiny_tok, chunk_size=chunk,
                        recall_min_rows=min_rows)
    for _ in range(2):
        session.feed(TEXT, "user")
    stats = session.stats()
    assert stats["archived"] > 0 and (stats["recalled"] > 0) == recalls
    check_accounting(session)


@GRANULARITIES
def test_memory_flags_and_html_outline_recalled_tokens(tiny_tok, granularity):
    session = recalling(tiny_llama(layers=2, vocab=len(tiny_tok)), tiny_tok, granularity=granularity)
    for _ in range(3):
        session.feed(TEXT, "user")
    mem = session.memory()
    assert mem.recalled.dtype == torch.bool and bool(mem.recalled.any())
    assert "t recalled" in render_html(session)


@GRANULARITIES
def test_save_and_load_carry_the_archive_and_continue_identically(tiny_tok, tmp_path, granularity):
    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    a = recalling(model, tiny_tok, granularity=granularity)
    for _ in range(3):
        a.feed(TEXT, "user")
    path = a.save(tmp_path / "recall.halo")
    b = Session.load(path, model, tiny_tok)
    assert b.stats()["archived"] == a.stats()["archived"]
    for session in (a, b):
        session.feed(QUESTION, "user")
    assert a.generate(6, stop_on_eos=False) == b.generate(6, stop_on_eos=False)
    assert {k: v for k, v in a.stats().items() if "seconds" not in k} == \
        {k: v for k, v in b.stats().items() if "seconds" not in k}


def test_a_corrupted_archive_is_refused_and_the_session_stays_fresh(tiny_tok):
    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    a = recalling(model, tiny_tok)
    for _ in range(2):
        a.feed(TEXT, "user")
    state = a.state_dict()
    fields = state["cache"]["recall"]["archive"]["fields"]
    entry = int(torch.nonzero(fields["serials"][0] >= 0)[0])
    fields["positions"][0, entry] = 10 ** 9
    b = recalling(model, tiny_tok)
    with pytest.raises(ValueError, match="never fed"):
        b.load_state_dict(state)
    assert b.cache.seen == 0 and b.cache.n_valid == 0 and len(b.cache.archive) == 0
    plain = Session(model, tiny_tok, b.config.replace(recall=False))
    with pytest.raises(ValueError, match="disagree on recall"):
        plain.load_state_dict(a.state_dict())


@pytest.mark.parametrize("changes,match", [
    ({"granularity": "token"}, "per-layer or per-head memory"),
    ({"recall_tokens": 40}, "recall_tokens"),
    ({"recall_sources": ("nobody",)}, "recall_sources"),
    ({"recall_layers": (1.5,)}, "recall_layers"),
    ({"recall_threshold": float("nan")}, "recall_threshold"),
    ({"recall_heads": "max"}, "recall_heads"),
    ({"recall_min_rows": 0}, "recall_min_rows"),
    ({"recall_held_reads": "yes"}, "recall_held_reads"),
])
def test_bad_recall_settings_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        HaloConfig(**{"budget": 48, "sink_tokens": 2, "recent_tokens": 6, "recall": True, **changes})


def test_recall_layers_are_fractions_of_the_depth():
    assert HaloConfig(recall_layers=(0.0, 0.5, 1.0)).recall_layer_indices(30) == (0, 14, 29)
    assert HaloConfig(recall_layers=(0.5, 0.5)).recall_layer_indices(2) == (0,)


def _scores(serials, mass, units, floor=1.0):
    s = torch.tensor(serials)
    return {"mass": torch.tensor(mass, dtype=torch.float32), "floor": torch.full((len(serials),), floor),
            "serials": s, "positions": s + 100, "token_ids": s + 1000, "sources": torch.ones_like(s),
            "units": torch.tensor(units)}


def _held(serials, layers, units):
    s = torch.tensor(serials, dtype=torch.int64)
    return {"serials": s, "positions": s + 100, "token_ids": s + 1000, "sources": torch.ones_like(s),
            "units": torch.tensor(units, dtype=torch.int64), "layers": torch.tensor(layers, dtype=torch.int64)}


def test_pick_units_takes_hits_whole_then_their_neighbourhood():
    # units: 7 = serials 0-2 (forgotten, one bright token), 8 = serials 3-4 (held by one of two layers),
    # 9 = serials 10-11 (forgotten, far away, dim); serial 20 is held by every layer
    scores = _scores([0, 1, 2, 3, 10, 11], [0.5, 5.0, 0.1, 2.0, 0.2, 0.2], [7, 7, 7, 8, 9, 9])
    held = _held([3, 4, 20], [1, 1, 2], [8, 8, -1])
    pick = pick_units(scores, held, num_rows=2, marker=5, threshold=3.0, most=8, context=2, alpha=1.0)
    assert pick.serials.tolist() == [0, 1, 2, 3, 4]  # unit 7 (the hit), unit 8 (next to it, made whole)
    assert pick.positions.tolist() == [100, 101, 102, 103, 104] and pick.token_ids.tolist()[0] == 1000
    assert pick.brightness.tolist() == [5.0] * 5  # alpha * the hit's mass


def test_pick_units_makes_a_partly_held_hit_whole():
    """A token one layer still holds but a retrieval layer archived is a hit of its own: per-layer memory keeps a
    fact in a few layers only, and the question must be able to bring it back into all of them."""
    held = _held([3, 4, 20], [1, 1, 2], [8, 8, -1])
    pick = pick_units(_scores([3], [9.0], [8]), held, num_rows=2, marker=5, threshold=3.0, most=8, context=0,
                      alpha=1.0)
    assert pick.serials.tolist() == [3, 4] and pick.brightness.tolist() == [9.0, 9.0]
    whole = _held([3, 4, 20], [2, 2, 2], [8, 8, -1])  # every layer holds it: nothing to bring back
    assert pick_units(_scores([3], [9.0], [8]), whole, num_rows=2, marker=5, threshold=3.0, most=8, context=0,
                      alpha=1.0) is None


def test_pick_units_respects_the_threshold_and_the_token_limit():
    scores = _scores([0, 1, 2, 3], [5.0, 5.0, 5.0, 4.0], [7, 7, 7, -1])
    held = _held([20], [2], [-1])
    kw = {"num_rows": 2, "marker": 5, "context": 0, "alpha": 1.0}
    assert pick_units(scores, held, threshold=6.0, most=8, **kw) is None
    assert pick_units(scores, held, threshold=3.0, most=2, **kw).serials.tolist() == [3]  # unit 7 is too big
    assert pick_units(scores, held, threshold=3.0, most=4, **kw).serials.tolist() == [0, 1, 2, 3]


def test_pick_units_brings_each_hit_back_with_its_sentence_first():
    """Two hits read one fact in two sentences (`The pass key is 77013. ... 77013 is the pass key.`): windows of
    `context` positions around each fill the token limit with words beside the hits and leave out the number
    between them; sentences first bring both sentences back whole (traced on a development essay at 1/8)."""
    units = [-1] * 20
    units[6:9], units[10:13] = [8] * 3, [9] * 3  # two three-token numbers
    mass = [0.1] * 20
    mass[13], mass[4] = 9.0, 8.0  # the hits
    scores, held = _scores(list(range(20)), mass, units), _held([30], [2], [-1])
    ends = torch.zeros(1100, dtype=torch.bool)
    ends[[1002, 1009, 1014]] = True  # serials 2, 9 and 14 end sentences: 3-9 and 10-14 are the fact's two
    kw = {"num_rows": 2, "marker": 5, "threshold": 3.0, "most": 12, "context": 4, "alpha": 1.0}
    assert not {6, 7, 8} & set(pick_units(scores, held, **kw).serials.tolist())
    assert pick_units(scores, held, sentence_ends=ends, **kw).serials.tolist() == list(range(3, 15))


def test_only_tokens_with_a_letter_or_a_digit_are_hits():
    """Newlines and punctuation draw attention as structure (the question's best hits in `halo demo --recall` were
    two newlines of the tool output); with a word table they cannot be hits, and still come back around one."""
    scores = _scores([0, 1, 2, 3], [9.0, 0.1, 4.0, 0.1], [-1, -1, -1, -1])  # serial 0: a newline, 2: a word
    held = _held([30], [2], [-1])
    words = torch.ones(1100, dtype=torch.bool)
    words[1000] = False
    kw = {"num_rows": 2, "marker": 5, "threshold": 3.0, "most": 8, "context": 0, "alpha": 1.0}
    assert pick_units(scores, held, **kw).serials.tolist() == [0, 2]
    pick = pick_units(scores, held, words=words, **kw)
    assert pick.serials.tolist() == [2] and pick.brightness.tolist() == [4.0]
    assert pick_units(scores, held, words=words, **dict(kw, context=2)).serials.tolist() == [0, 1, 2, 3]


def test_sentence_ends_are_full_stops_questions_exclamations_and_newlines(tiny_tok):
    table = sentence_end_table(tiny_tok, len(tiny_tok))
    ids = tiny_tok("It is done. Is it? Yes! A.B\nnext", add_special_tokens=False)["input_ids"]
    ends = "".join(tiny_tok.decode(ids[: i + 1]) + "|" for i in range(len(ids)) if table[ids[i]])
    assert ends.count("|") == 5 and all(piece[-1] in ".?!\n" for piece in ends.split("|")[:-1])
    assert sentence_end_table(tiny_tok, len(tiny_tok)) is table  # computed once per tokenizer
    words = word_table(tiny_tok, len(tiny_tok))
    for token in tiny_tok("It is 52445.\n", add_special_tokens=False)["input_ids"]:
        text = tiny_tok.decode([token])
        assert bool(words[token]) == any(c.isalnum() for c in text), text


def test_the_eval_row_switches_recall_on_per_layer():
    base, config = policy_setup("halo+recall", HaloConfig())
    assert base == "halo" and config.recall and config.granularity == "layer"
    base, config = policy_setup("tova-layer+recall", HaloConfig())
    assert base == "tova" and config.recall
    base, config = policy_setup("halo-head+recall", HaloConfig())
    assert base == "halo" and config.recall and config.granularity == "head"


def test_per_head_rings_keep_each_heads_own_key_of_what_that_head_evicted(tiny_tok):
    """Per KV head a retrieval layer has one ring per head, filled by that head's evictions with that head's key
    alone: layer 0's key depends only on the token and its position, so each entry must equal a full run's."""
    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    session = recalling(model, tiny_tok, granularity="head", recall_sources=("tool",),  # nothing comes back
                        rope_positions="text")  # keys at text positions: the full run's as they are
    for _ in range(3):
        session.feed(TEXT, "user")
    cache, archive = session.cache, session.cache.archive
    assert archive.layers == (0, 1, 2, 3)  # retrieval layers 0 and 1 of the tiny model, 2 KV heads each
    assert tuple(archive.keys.shape[:2]) == (4, 1)
    fed = {e.position: e.token_id for e in session.journal.evicted}
    memory = session.memory()
    fed.update(zip(memory.positions.tolist(), memory.token_ids.tolist()))
    assert sorted(fed) == list(range(cache.seen))  # user text only: no markers
    full = model(torch.tensor([[fed[p] for p in range(cache.seen)]]), use_cache=True).past_key_values
    checked = 0
    for head in range(2):
        width = int((archive.fields["serials"][head] >= 0).sum())
        positions = archive.fields["positions"][head, :width]
        expected = full.layers[0].keys[0, head, positions]
        torch.testing.assert_close(archive.keys[head, 0, :width].float(), expected, rtol=2e-3, atol=2e-3)
        checked += width
    assert checked > 0


@GRANULARITIES
def test_chat_shows_what_was_recalled(tiny_tok, granularity):
    session = recalling(tiny_llama(layers=2, vocab=len(tiny_tok)), tiny_tok, budget=64, granularity=granularity)
    script = "\n".join([TEXT, TEXT, QUESTION, "/recalled", "/quit"]) + "\n"
    out = io.StringIO()
    run_chat(session, io.StringIO(script), out, system=None, max_new_tokens=4)
    text = out.getvalue()
    assert "tokens recalled in" in text and "| recalled " in text


def test_pick_units_never_pushes_out_text_that_outranks_it():
    # source 1 (the test's) has priority 0, source 2 priority 320: the unit comes back only where what its
    # tokens would push out does not outrank it; past the end of `displaced` only protected text is left
    scores = _scores([0, 1, 2], [5.0, 5.0, 5.0], [7, 7, 7])
    held = _held([20], [2], [-1])
    kw = {"num_rows": 2, "marker": 5, "threshold": 3.0, "most": 8, "context": 0, "alpha": 1.0,
          "priority": torch.tensor([0.0, 0.0, 320.0])}
    assert pick_units(scores, held, displaced=torch.tensor([0.0, 0.0, 320.0]), **kw) is None
    assert pick_units(scores, held, displaced=torch.tensor([0.0, 0.0, 0.0, 320.0]), **kw).serials.tolist() == [0, 1, 2]
    assert pick_units(scores, held, displaced=torch.tensor([0.0]), **kw).serials.tolist() == [0, 1, 2]
    outranked = dict(kw, priority=torch.tensor([0.0, 320.0, 320.0]))  # ties come back
    assert len(pick_units(scores, held, displaced=torch.full((3,), 320.0), **outranked)) == 3


def test_tool_output_never_recalls_older_tool_output(tiny_tok):
    """A forward of tool text scores the archive but brings back no tool or log line (a flood would keep re-reading
    itself): at threshold 0 everything forgotten is a hit, and only user text comes back."""
    sources = {**default_sources(), "user": SourcePolicy(initial=128.0, decay=1.0),
               "tool": SourcePolicy(initial=128.0, decay=1.0)}  # equal priorities: tool lines could come back
    session = recalling(tiny_llama(layers=2, vocab=len(tiny_tok)), tiny_tok, sources=sources)
    session.feed(TEXT, "user")
    for batch in range(6):
        session.feed(f"w{batch} ok\n" * 4, "tool")  # lines of 5 tokens: each fits recall_tokens
        check_accounting(session)
    recalled = [e for e in session.journal if e.kind == "recalled"]
    assert recalled and all(e.source != "tool" for e in recalled)  # the user text came back, no tool line


def test_a_grace_period_never_blocks_the_cull(tiny_tok):
    """recall_tokens near the room left by the protected set: recalled lines under grace plus the markers being
    placed once left a layer nothing to cull (RuntimeError); the budget now wins over the grace period."""
    sources = {**default_sources(), "user": SourcePolicy(initial=128.0, decay=1.0),
               "tool": SourcePolicy(initial=128.0, decay=1.0)}
    session = recalling(tiny_llama(layers=2, vocab=len(tiny_tok)), tiny_tok, sources=sources, recall_tokens=30)
    session.feed(TEXT, "user")
    for batch in range(6):
        session.feed(f"2026-11-22 worker {batch} processed batch 7 ok\n" * 3, "tool")
        session.feed(QUESTION, "user")
        check_accounting(session)
    assert session.stats()["recalled"] > 0
