"""Files written by release 0.1.0 (session format 1) still load and continue exactly as they would have.

The fixture was written by `fixtures/make_session_v1.py` with that release; the JSON beside it holds what the
session held when saved, and what it generated and held after one more turn.
"""

import json
from pathlib import Path

import pytest
import torch

from halo import Session
from halo.persist import read_file
from tiny import tiny_llama

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def saved():
    return json.loads((FIXTURES / "session_v1.json").read_text())


def _memory(session) -> dict:
    snap = session.memory()
    return {"positions": snap.positions.tolist(), "token_ids": snap.token_ids.tolist(),
            "brightness": snap.brightness.tolist(), "sources": snap.sources, "units": snap.units.tolist()}


def test_the_fixture_is_format_1():
    meta, _ = read_file(FIXTURES / "session_v1.halo")
    assert meta["version"] == 1


def test_format_1_restores_memory_journal_diffs_and_counters(tiny_tok, saved):
    session = Session.load(FIXTURES / "session_v1.halo", tiny_llama(vocab=len(tiny_tok)), tiny_tok)
    assert _memory(session) == saved["memory"]
    assert [[e.position, e.token_id, e.source, e.brightness, e.step, e.kind] for e in session.journal] == saved["journal"]
    assert [list(d) for d in session.diffs] == saved["diffs"]
    stats = {k: v for k, v in session.stats().items() if not k.endswith("seconds")}
    assert stats.pop("remembered") == stats["retained"]  # a key added since; one token set, as that release kept
    assert (stats.pop("recalled"), stats.pop("archived")) == (0, 0)  # added with recall, which that release lacked
    assert stats == saved["stats"]
    assert session.extra == {"note": "format 1 fixture"}


def test_format_1_continues_exactly_like_the_release_that_wrote_it(tiny_tok, saved):
    session = Session.load(FIXTURES / "session_v1.halo", tiny_llama(vocab=len(tiny_tok)), tiny_tok)
    session.feed("Again: what is the pass key?", source="user")
    assert session.generate(8, stop_on_eos=False) == saved["continued_text"]
    memory = _memory(session)
    brightness, expected = memory.pop("brightness"), dict(saved["continued_memory"])
    torch.testing.assert_close(torch.tensor(brightness), torch.tensor(expected.pop("brightness")), rtol=0, atol=1e-4)
    assert memory == expected


def test_format_2_round_trip_of_a_format_1_session(tiny_tok, saved, tmp_path):
    model = tiny_llama(vocab=len(tiny_tok))
    Session.load(FIXTURES / "session_v1.halo", model, tiny_tok).save(tmp_path / "again.halo")
    assert read_file(tmp_path / "again.halo")[0]["version"] == 2
    assert _memory(Session.load(tmp_path / "again.halo", model, tiny_tok)) == saved["memory"]
