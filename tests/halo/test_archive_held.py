"""Held reads (HaloConfig.recall_held_reads): a token some rows hold and others lack is a recall candidate by the
mass its held copies draw, over the same bar as the archive, against what they usually draw."""

import pytest
import torch

from tiny import tiny_llama
from halo import HaloConfig
from halo.archive import FIELDS
from halo.archive_mass import bars, pool_heads, retained_rows
from halo.backend import REFERENCE
from recall_session import QUESTION, TEXT, check_accounting, one_ring_archive, recalling, ring_forward

N_PAST, SCALING = 9, 0.5


def _held():
    """The 9 retained slots' fields: serials 100-108, of which 104 is held by every row (serial -1: no candidate)."""
    s = torch.arange(100, 100 + N_PAST)
    return {"serials": torch.where(s == 104, -1, s), "positions": s - 80, "token_ids": s - 90,
            "sources": torch.zeros_like(s), "units": torch.full_like(s, -1)}


def _plain_ratio(seed):
    """float32 [N_PAST]: each retained slot's mass over the bar, pooled per KV head group, from retained_rows."""
    query, key = ring_forward(seed)
    _, per_head = retained_rows(query, key, SCALING, N_PAST)
    floor = bars(per_head.mean(0))
    return pool_heads(per_head * (floor / bars(per_head))[:, None], "group", 2) / floor


def _held_scores(archive, usual, seed):
    archive.score(1, *ring_forward(seed), SCALING, N_PAST, "group", REFERENCE, held=_held(), held_usual=usual)
    taken = archive.take_scores()
    mine = taken["serials"] >= 100
    return {int(s): float(r) for s, r in zip(taken["serials"][mine], (taken["mass"] / taken["floor"])[mine])}


@pytest.mark.parametrize("history", [1, 3])
def test_a_held_slot_scores_its_ratio_less_its_usual_and_nothing_before_history_forwards(history):
    archive = one_ring_archive(0.5, history)
    usual = (torch.zeros(N_PAST), torch.zeros(N_PAST))
    seen = []
    for seed in range(5):
        got, ratio = _held_scores(archive, usual, seed), _plain_ratio(seed)
        assert 104 not in got and len(got) == N_PAST - 1  # a token every row holds is no candidate
        if len(seen) < history:
            want = torch.zeros(N_PAST)
        else:
            want = (ratio - 0.5 * torch.stack(seen).mean(0)).clamp(min=0)
        for slot, serial in enumerate(range(100, 100 + N_PAST)):
            if serial != 104:
                assert got[serial] == pytest.approx(float(want[slot]), rel=1e-5, abs=1e-6)
        seen.append(ratio)
    torch.testing.assert_close(usual[0], torch.stack(seen).mean(0))
    assert usual[1].tolist() == [5.0] * N_PAST


def test_archived_entries_score_as_without_held_slots_and_an_empty_archive_still_scores_them():
    with_held, alone = one_ring_archive(1.0, 1), one_ring_archive(1.0, 1)
    usual = (torch.zeros(N_PAST), torch.zeros(N_PAST))
    for seed in range(3):
        with_held.score(1, *ring_forward(seed), SCALING, N_PAST, "group", REFERENCE, held=_held(), held_usual=usual)
        alone.score(1, *ring_forward(seed), SCALING, N_PAST, "group", REFERENCE)
        a, b = with_held.take_scores(), alone.take_scores()
        archived = a["serials"] < 100
        for name in FIELDS:
            assert torch.equal(a[name][archived], b[name])
        torch.testing.assert_close(a["mass"][archived], b["mass"])
    empty = one_ring_archive(1.0, 0, filled=False)
    assert len(_held_scores(empty, (torch.zeros(N_PAST), torch.ones(N_PAST)), 0)) == N_PAST - 1


def test_held_reads_are_on_per_kv_head_and_off_per_layer_unless_set():
    assert recalling_config("head").held_reads and not recalling_config("layer").held_reads
    assert recalling_config("layer", recall_held_reads=True).held_reads
    assert not recalling_config("head", recall_held_reads=False).held_reads


def recalling_config(granularity, **changes):
    return HaloConfig(budget=40, sink_tokens=2, recent_tokens=6, recall=True, recall_tokens=6,
                      granularity=granularity, **changes)


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_held_reads_keep_the_accounting_and_older_files_load_without_their_fields(tiny_tok, granularity):
    model = tiny_llama(layers=3, vocab=len(tiny_tok))
    session = recalling(model, tiny_tok, granularity=granularity, recall_held_reads=True)
    for _ in range(3):
        session.feed(TEXT, "user")
        check_accounting(session)
    state = session.cache.state_dict()
    assert {"read_usual", "read_scored", "read_owner"} <= set(state["slots"])
    scored = state["slots"]["read_scored"]
    assert float(scored.max()) > 0  # the retrieval rows' slots have a history
    older = {**state, "slots": {k: v for k, v in state["slots"].items() if not k.startswith("read_")}}
    other = recalling(model, tiny_tok, granularity=granularity, recall_held_reads=True)
    other.cache.load_state_dict(older)
    n = other.cache.n_valid
    assert float(other.cache.slot_field("read_scored")[:, :n].abs().sum()) == 0
    assert bool((other.cache.slot_field("read_owner")[:, :n] == -1).all())
    other.feed(QUESTION, "user")
    check_accounting(other)


def test_without_held_reads_the_cache_keeps_no_read_fields(tiny_tok):
    session = recalling(tiny_llama(layers=3, vocab=len(tiny_tok)), tiny_tok, granularity="head",
                        recall_held_reads=False)
    session.feed(TEXT, "user")
    assert not any(name.startswith("read_") for name in session.cache.state_dict()["slots"])
    check_accounting(session)
