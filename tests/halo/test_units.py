"""Word units: the tokens of one word live and die together; protection and culls never split a word."""

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from halo import HaloConfig, Session
from halo.repair.kinds import TokenKind
from halo.units import MAX_WORD_TOKENS, WordState, word_starts
from tiny import tiny_llama

K = TokenKind
WORDS = ["52445", "fox", "dog's", "https://x.org/a?b=1", "foo_bar()", "the", "42.", "error:", "ok", "(quick)"]


def test_a_word_is_a_whitespace_delimited_run_of_text_tokens():
    kinds = [K.WORD_START, K.WORD_CONTINUATION, K.SYMBOL_CONTINUATION, K.SPACE, K.WORD_CONTINUATION,
             K.SYMBOL_START, K.WORD_CONTINUATION, K.SPECIAL, K.WORD_CONTINUATION]
    starts, state = word_starts([int(k) for k in kinds], WordState())
    assert starts == [True, False, False, True, True, True, False, True, True]
    assert state.length == 1 and state.kind == int(K.WORD_CONTINUATION)


def test_a_word_continues_across_feeds_and_is_capped():
    state = WordState(unit=7, kind=int(K.WORD_START), length=1)
    starts, state = word_starts([int(K.WORD_CONTINUATION)] * (MAX_WORD_TOKENS + 2), state)
    assert starts[0] is False and starts.count(True) == 1 and starts.index(True) == MAX_WORD_TOKENS - 1
    assert word_starts([int(K.WORD_CONTINUATION)], WordState())[0] == [True], "nothing to continue after a line"


def _units_by_position(session, seen: dict[int, int]) -> None:
    snap = session.memory()
    for position, unit, source in zip(snap.positions.tolist(), snap.units.tolist(), snap.sources):
        if source != "marker":
            seen.setdefault(position, unit)


def _assert_no_partial_word(session, units_of: dict[int, int]) -> None:
    retained = {p for p, s in zip(session.memory().positions.tolist(), session.memory().sources) if s != "marker"}
    members: dict[int, set[int]] = {}
    for position, unit in units_of.items():
        members.setdefault(unit, set()).add(position)
    for unit, positions in members.items():
        kept = positions & retained
        assert not kept or kept == positions, f"unit {unit} is partial: kept {sorted(kept)} of {sorted(positions)}"


step = st.one_of(
    st.tuples(st.just("user"), st.lists(st.sampled_from(WORDS), min_size=1, max_size=10)),
    st.tuples(st.just("assistant"), st.lists(st.sampled_from(WORDS), min_size=1, max_size=6)),
    st.tuples(st.just("log"), st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3), min_size=1,
                                       max_size=3)),
    st.tuples(st.just("generate"), st.integers(1, 5)),
)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(budget=st.integers(72, 110), sinks=st.integers(0, 4), recent=st.integers(1, 8), chunk=st.integers(1, 8),
       steps=st.lists(step, min_size=1, max_size=6))
def test_no_retained_word_is_ever_partial(tiny_tok, budget, sinks, recent, chunk, steps):
    """After any sequence of feeds, generations and culls, every unit (word or line) is retained whole or not
    at all, and every fed position is retained or journaled exactly once (budgets that hold the protected set
    and the units around its edges)."""
    model = tiny_llama(vocab=len(tiny_tok))
    session = Session(model, tiny_tok, HaloConfig(budget=budget, sink_tokens=sinks, recent_tokens=recent,
                                                  chunk_size=chunk))
    units_of: dict[int, int] = {}
    for kind, arg in steps:
        if kind == "generate":
            if session.last_logits is None:
                continue
            session.generate(arg, stop_on_eos=False)
        elif kind == "log":
            session.feed("".join(" ".join(line) + "\n" for line in arg), source="log")
        else:
            session.feed(" " + " ".join(arg), source=kind)
        _units_by_position(session, units_of)
        _assert_no_partial_word(session, units_of)
        assert session.cache.n_valid <= budget
    evicted = [e.position for e in session.journal.evicted]
    assert sorted(evicted + [p for p, s in zip(session.memory().positions.tolist(), session.memory().sources)
                             if s != "marker"]) == list(range(session.cache.seen))


def test_a_number_is_kept_whole_or_not_at_all(tiny_tok):
    """`52445` is several tokens of the tiny tokenizer: under cull pressure they go together."""
    assert len(tiny_tok(" 52445", add_special_tokens=False)["input_ids"]) > 1
    session = Session(tiny_llama(vocab=len(tiny_tok)), tiny_tok, HaloConfig(budget=40, sink_tokens=2,
                                                                            recent_tokens=4, chunk_size=4))
    session.feed("The pass key is 52445. Remember it.")
    units_of: dict[int, int] = {}
    for i in range(12):
        session.feed(f" filler words number {i} keep coming and going")
        _units_by_position(session, units_of)
        _assert_no_partial_word(session, units_of)
    text = session.memory_text()
    assert "52445" in text or not any(d in text for d in ("5244", "2445"))


def test_word_units_can_be_switched_off(tiny_tok):
    session = Session(tiny_llama(vocab=len(tiny_tok)), tiny_tok, HaloConfig(budget=40, recent_tokens=8, word_units=False))
    session.feed("The pass key is 52445.")
    assert set(session.memory().units.tolist()) == {-1}


@pytest.mark.parametrize("source", ["user", "assistant"])
def test_generated_tokens_continue_the_fed_word(tiny_tok, source):
    session = Session(tiny_llama(vocab=len(tiny_tok)), tiny_tok, HaloConfig(budget=200))
    session.feed("pass key 5244", source=source)
    last_unit = session.memory().units[-1].item()
    assert session.words.state.unit == last_unit
    ids = torch.tensor(tiny_tok("5", add_special_tokens=False)["input_ids"])
    session.feed_ids(ids, source=source)  # a digit glued to the number joins its word
    assert session.memory().units[-1].item() == last_unit


def test_a_budget_too_small_for_whole_units_cuts_them_instead_of_failing(tiny_tok):
    """Sinks and the recent window protect the whole lines they touch; when that leaves nothing to cull, lines
    are cut at their unprotected tokens and the budget still holds."""
    session = Session(tiny_llama(vocab=len(tiny_tok)), tiny_tok, HaloConfig(budget=37, sink_tokens=3,
                                                                            recent_tokens=3, chunk_size=2))
    session.feed("52445 52445\nhttps://x.org/a?b=1 (quick)\n", source="log")
    session.generate(1, stop_on_eos=False)
    session.feed(" fox (quick)")
    session.feed("ok error: the\n", source="log")
    assert session.cache.n_valid <= 37
