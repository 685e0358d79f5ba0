"""Property tests: random feed/generate/budget sequences keep the engine's invariants."""

import math

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from halo import HaloConfig, Session
from tiny import tiny_llama

WORDS = ["fox", "dog", "the", "quick", "lazy", "jumps", "over", "brown", "42", "error", "ok", "."]

plain_step = st.one_of(
    st.tuples(st.just("user"), st.lists(st.sampled_from(WORDS), min_size=1, max_size=12)),
    st.tuples(st.just("assistant"), st.lists(st.sampled_from(WORDS), min_size=1, max_size=8)),
    st.tuples(st.just("generate"), st.integers(0, 6)),
)
step = st.one_of(
    st.tuples(st.just("user"), st.lists(st.sampled_from(WORDS), min_size=1, max_size=12)),
    st.tuples(st.just("assistant"), st.lists(st.sampled_from(WORDS), min_size=1, max_size=8)),
    st.tuples(st.just("log"), st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3), min_size=1, max_size=4)),
    st.tuples(st.just("generate"), st.integers(0, 6)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(budget=st.integers(20, 72), sinks=st.integers(0, 3), recent=st.integers(1, 8), chunk=st.integers(1, 8),
       system=st.booleans(), steps=st.lists(plain_step, min_size=1, max_size=6))
def test_invariants_hold(tiny_tok, budget, sinks, recent, chunk, system, steps):
    run_steps(tiny_tok, budget, sinks, recent, chunk, system, steps)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: it takes minutes here
@given(budget=st.integers(40, 72), sinks=st.integers(0, 3), recent=st.integers(1, 8), chunk=st.integers(1, 8),
       system=st.booleans(), steps=st.lists(step, min_size=1, max_size=6))
def test_invariants_hold_with_log_units(tiny_tok, budget, sinks, recent, chunk, system, steps):
    run_steps(tiny_tok, budget, sinks, recent, chunk, system, steps)


def run_steps(tiny_tok, budget, sinks, recent, chunk, system, steps):
    model = tiny_llama(vocab=len(tiny_tok))
    config = HaloConfig(budget=budget, sink_tokens=sinks, recent_tokens=recent, chunk_size=chunk)
    session = Session(model, tiny_tok, config)
    fed: list[int] = []
    pinned: set[int] = set()
    if system:
        session.feed("Be brief.", source="system")
        pinned = set(range(session.cache.seen))
        fed += sorted(pinned)
    session.feed("Start.")
    fed += list(range(len(fed), session.cache.seen))
    for kind, arg in steps:
        start = session.cache.seen
        if kind == "generate":
            session.generate(arg)
        elif kind == "log":
            session.feed("".join(" ".join(line) + "\n" for line in arg), source="log")
        else:
            session.feed(" " + " ".join(arg), source=kind)
        fed += list(range(start, session.cache.seen))
        check(session, fed, pinned)


def check(session, fed, pinned):
    cache, config = session.cache, session.config
    assert cache.n_valid <= config.budget
    mem = session.memory()
    real = [p for p, s in zip(mem.positions.tolist(), mem.sources) if s != "marker"]
    journal = [e.position for e in session.journal]
    assert sorted(real + journal) == sorted(fed)  # exactly once: retained or journaled
    assert len(set(real)) == len(real)
    for b in mem.brightness.tolist() + [e.brightness for e in session.journal]:
        assert math.isfinite(b) and 0.0 <= b <= 255.0
    retained = set(real)
    seen = cache.seen
    assert pinned <= retained
    assert set(range(min(config.sink_tokens, seen))) <= retained
    recent = set(range(max(0, seen - config.recent_tokens), seen))
    assert recent <= retained



def test_marker_forward_larger_than_the_headroom_grows_plain_buffers(tiny_tok):
    """Found by the property test: buffers regrown inside inference_mode must stay plain tensors."""
    model = tiny_llama(vocab=len(tiny_tok))
    session = Session(model, tiny_tok, HaloConfig(budget=40, sink_tokens=0, recent_tokens=1, chunk_size=1))
    session.feed("alpha beta gamma delta epsilon zeta eta theta")
    session.feed("ok\n", source="log")  # a 2-token line: its 6-token marker overflows the 1-slot headroom
    for _ in range(4):
        session.feed(" iota kappa lambda mu nu xi omicron pi rho sigma")
    assert session.cache.capacity > 41, "the marker forward should have grown the buffers"
    assert session.cache.n_valid <= 40 and not session.cache.kv.is_inference()
    assert not session.cache.positions.is_inference()
