"""halo.session_state: the session's own part of the state dict, checked on load; a session from a file."""

import pytest
import torch

from halo import HaloConfig, Session
from halo.session_state import SessionState, load_session
from halo.units import WordState
from tiny import tiny_llama


def test_round_trip_keeps_everything_and_moves_logits_to_the_cpu():
    own = SessionState(3, 1.5, [7, 8], [(4, 1, 2)], {"note": "x"}, WordState(9, 2, 3), torch.arange(5.0))
    state = own.state_dict({"kv": "cache part"})
    assert state["cache"] == {"kv": "cache part"} and state["last_logits"].device.type == "cpu"
    assert state["session"]["diffs"] == [[4, 1, 2]] and state["session"]["word_state"] == [9, 2, 3]
    back = SessionState.from_state_dict(state, [7, 8], 5, torch.device("cpu"))
    assert back == SessionState(3, 1.5, [7, 8], [(4, 1, 2)], {"note": "x"}, WordState(9, 2, 3), back.last_logits)
    assert torch.equal(back.last_logits, torch.arange(5.0))


def test_no_word_state_and_no_logits_read_back_as_a_fresh_word():
    state = SessionState(0, 0.0, [1], [], {}).state_dict({})
    assert state["session"]["word_state"] is None and "last_logits" not in state
    back = SessionState.from_state_dict(state, [1], 5, torch.device("cpu"))
    assert back.word_state == WordState() and back.last_logits is None


def test_another_tokenizer_or_vocabulary_is_refused():
    state = SessionState(0, 0.0, [1, 2], [], {}, None, torch.zeros(5)).state_dict({})
    with pytest.raises(ValueError, match="different tokenizer"):
        SessionState.from_state_dict(state, [1, 3], 5, torch.device("cpu"))
    with pytest.raises(ValueError, match="shape"):
        SessionState.from_state_dict(state, [1, 2], 6, torch.device("cpu"))


def test_load_session_restores_and_names_a_malformed_state(tiny_pair, tmp_path, monkeypatch):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=40, sink_tokens=2, recent_tokens=8, chunk_size=8))
    session.feed("The quick brown fox jumps over the lazy dog.")
    path = session.save(tmp_path / "s.halo", extra={"k": 1})
    loaded = load_session(Session, path, tiny_llama(vocab=len(tok)), tok)
    assert isinstance(loaded, Session) and loaded.extra == {"k": 1}
    assert loaded.memory_text() == session.memory_text() and loaded.pinned_tokens == session.pinned_tokens

    def incomplete(self, state):
        raise KeyError("pinned_tokens")

    monkeypatch.setattr(Session, "load_state_dict", incomplete)
    with pytest.raises(ValueError, match="incomplete or malformed"):
        load_session(Session, path, model, tok)
