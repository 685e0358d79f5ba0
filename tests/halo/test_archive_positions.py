"""Recall with memory positions (HaloConfig(rope_positions="memory", recall=True)): archived keys are kept at
position 0 and scored at the rank each would take if it came back now, not at the rank it had when it died."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from tiny import tiny_llama
from halo import HaloConfig, Session, SourcePolicy, default_sources
from halo.archive import RecallArchive
from halo.archive_mass import archive_ratio
from halo.memory_positions import gapped_ranks, rope_inv_freq, rotate_keys_

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]

TEXT = ("the quick brown fox jumps over the lazy dog and keeps running far away into the night while "
        "seven small owls count 48213 stars above the quiet river bank. ")
LOG = "2026-11-22 worker 3 processed batch 7 ok\n" * 3


def scoring_session(model, tok, **changes):
    """Per-layer (or, with `granularity="head"`, per-head) memory positions with layer 0 the only retrieval layer
    (its keys depend only on the token and its RoPE position, so a fresh run can rebuild them) and a threshold
    nothing reaches: every user and tool forward scores the archive, nothing comes back."""
    sources = {**default_sources(), "user": SourcePolicy(initial=128.0, decay=1.0, priority=320.0)}
    config = HaloConfig(**{"budget": 40, "sink_tokens": 2, "recent_tokens": 6, "chunk_size": 4, "sources": sources,
                           "granularity": "layer", "rope_positions": "memory", "recall": True,
                           "recall_layers": (0.0,), "recall_threshold": 1e9, "recall_tokens": 6,
                           "recall_context": 2, "recall_grace": 8, **changes})
    return Session(model, tok, config)


def present_ranks(held: torch.Tensor, archived: torch.Tensor, gap: int) -> torch.Tensor:
    """int64 [A]: where a re-rank now would put the first held position at or after each archived one (one past
    the newest when none)."""
    remembered = torch.unique(held)
    ranks = gapped_ranks(remembered, remembered, gap)
    return torch.cat([ranks, ranks[-1:] + 1])[torch.searchsorted(remembered, archived)]


def spy_on_scoring(cache) -> list[dict]:
    """Record every archive scoring of `cache`: the keys and arguments `archive_ratio` got, its result, the archived
    entries and, computed here from the slots, each entry's present rank (`ranks`: the gapped rank of the first
    distinct position some layer holds at or after it, one past the newest when none) and the `rope` of the first
    held token at or after it (`frame`, likewise: the rank in the frame of the keys as they stand, which differs
    between re-ranks).
    Per KV head layer 0 has a ring per head, scored in head order (`ring`: the KV head whose key it holds)."""
    calls, real = [], cache.backend.archive_ratio
    rings = len(cache.archive.layers)

    def spy(query, keys, valid, scaling, lse, weight, scale, heads):
        mass = real(query, keys, valid, scaling, lse, weight, scale, heads)
        n, width, ring = cache.n_valid, keys.shape[1], len(calls) % rings
        held = torch.arange(n, device=cache.device)[None, :] < cache.layer_counts[:, None]
        positions, rope = cache.positions[:, :n][held], cache.slot_field("rope")[:, :n][held]
        fields = {name: cache.archive.fields[name][ring, :width].clone()
                  for name in ("positions", "token_ids", "serials")}
        later = positions[None, :] >= fields["positions"][:, None]  # [width, held]
        frame = torch.where(later, rope[None, :], rope.max() + 1).amin(1)
        calls.append({"ring": ring, "keys": keys.float().clone(),
                      "args": (query.clone(), valid.clone(), scaling, lse.clone(), weight.clone(), scale.clone(), heads),
                      "mass": mass.clone(), **fields,
                      "ranks": present_ranks(positions, fields["positions"], cache.config.rope_gap), "frame": frame})
        return mass

    cache.backend = dataclasses.replace(cache.backend, archive_ratio=spy)
    return calls


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rerank", ["every_forward", "lazy"])
@pytest.mark.parametrize("rotation", ["copy", "afresh"])
@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_archived_keys_are_scored_at_their_present_ranks(tiny_tok, device, rerank, rotation, granularity, monkeypatch):
    """After culls moved the ranks, each archived key that is scored equals the layer-0 key a fresh run computes for
    its token at its present rank, and so does its score (fails when archived keys keep the rotation they died
    with). Re-ranked every forward that rank is the `searchsorted` of its position among the held ones; between
    re-ranks (RERANK_SLACK) the rank in the frame of the held keys and the rows, which continue them. On the CPU
    the archive keeps a rotated copy ("copy"); "afresh" drops it to run the CUDA path, every key rotated anew."""
    if rerank == "every_forward":
        monkeypatch.setattr("halo.memory_positions.RERANK_SLACK", -1)
    model = tiny_llama(layers=2, vocab=len(tiny_tok)).to(device)
    session = scoring_session(model, tiny_tok, granularity=granularity)
    copied = session.cache.archive.bytes_per_token
    if rotation == "afresh":
        session.cache.archive._turned = None
    calls = spy_on_scoring(session.cache)
    for _ in range(3):
        session.feed(TEXT, "user")
        session.feed(LOG, "tool")
    assert session.stats()["archived"] > 0 and session.stats()["recalled"] == 0 and len(calls) > 10
    first_rank = {}
    moved = 0
    for call in calls:
        for serial, rank in zip(call["serials"].tolist(), call["ranks"].tolist()):
            moved += (call["ring"], serial) in first_rank and first_rank[(call["ring"], serial)] != rank
            first_rank.setdefault((call["ring"], serial), rank)
    assert moved > 0  # ranks moved after archiving: a key left at its old rotation would be off
    lazy = sum(not torch.equal(call["frame"], call["ranks"]) for call in calls)
    assert lazy > 0 if rerank == "lazy" else lazy == 0
    for call in calls[-8:]:
        valid = call["args"][1]
        fresh = DynamicCache()
        with torch.no_grad():
            model(input_ids=call["token_ids"][valid][None], position_ids=call["frame"][valid][None],
                  past_key_values=fresh, use_cache=True)
        want = fresh.layers[0].keys[0]  # [Hkv, a, D]; per head the ring's head alone
        want = want if granularity == "layer" else want[call["ring"]:call["ring"] + 1]
        torch.testing.assert_close(call["keys"][:, valid], want, atol=2e-3, rtol=2e-3)  # fp16 storage
        keys = torch.zeros_like(call["keys"])
        keys[:, valid] = want
        torch.testing.assert_close(call["mass"], archive_ratio(call["args"][0], keys, *call["args"][1:]),
                                   atol=1e-4, rtol=1e-3)
    heads, dim = session.cache.num_kv_heads, session.cache.head_dim  # the CPU keeps a rotated copy, CUDA none
    rings = 1 if granularity == "layer" else heads
    assert copied == (2 if device == "cpu" else 1) * heads * dim * 2 + (8 * 5 + 8) * rings


def test_archived_rope_between_re_ranks_stays_in_the_frame_of_the_keys(tiny_tok):
    """Between re-ranks (holes under RERANK_SLACK) a position maps to the `rope` of the first remembered token at
    or after it, one past the newest key after all of them; a held position to its own. (Holes count as one
    position each here, `rope_gap=0`, so that any rope above the rank of the newest is a hole left open.)"""
    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    session = scoring_session(model, tiny_tok, rope_gap=0)
    session.feed(TEXT * 2, "user")
    cache, n = session.cache, session.cache.n_valid
    held = torch.arange(n)[None, :] < cache.layer_counts[:, None]
    positions, rope = cache.positions[:, :n][held], cache.slot_field("rope")[:, :n][held]
    assert torch.equal(cache.archived_rope(positions), rope)
    order = torch.argsort(positions)
    gaps = [(int(a), int(b), int(r)) for a, b, r in zip(positions[order][:-1], positions[order][1:],
                                                       rope[order][1:]) if b > a + 1]
    assert gaps and int(rope.max()) > len(torch.unique(positions)) - 1  # holes the keys have not closed yet
    for before, after, want in gaps:
        assert int(cache.archived_rope(torch.tensor([before + 1, after - 1])).unique()) == want
    assert int(cache.archived_rope(torch.tensor([int(positions.max()) + 5]))) == int(rope.max()) + 1


def test_a_saved_memory_archive_scores_the_same_after_loading(tiny_tok, tmp_path):
    model = tiny_llama(layers=2, vocab=len(tiny_tok))
    original = scoring_session(model, tiny_tok)
    for text, source in ((TEXT, "user"), (LOG, "tool"), (TEXT, "user")):
        original.feed(text, source)
    state = original.cache.archive.state_dict()
    assert state["derotated"] is True and state["keys"].shape[2] > 0
    restored = Session.load(original.save(tmp_path / "s.halo"), model, tiny_tok)
    assert torch.equal(restored.cache.archive.keys, original.cache.archive.keys)
    calls = [spy_on_scoring(session.cache) for session in (original, restored)]
    for session in (original, restored):
        session.feed(LOG + TEXT, "user")
    assert len(calls[0]) == len(calls[1]) > 0
    for a, b in zip(*calls):
        assert torch.equal(a["keys"], b["keys"])
        torch.testing.assert_close(a["mass"], b["mass"])


def test_memory_archive_stores_keys_at_position_0_and_refuses_other_states():
    torch.manual_seed(0)
    model = tiny_llama(layers=2)
    inv_freq = rope_inv_freq(model, 16)
    memory = RecallArchive((1,), 8, num_kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"),
                           inv_freq=inv_freq)
    text = RecallArchive((1,), 8, num_kv_heads=2, head_dim=16, dtype=torch.float32, device=torch.device("cpu"))
    keys, rope = torch.randn(2, 3, 16), torch.tensor([5, 17, 40])
    serials = torch.arange(3)
    values = {"serials": serials, "positions": serials + 90, "token_ids": serials, "sources": serials * 0,
              "units": serials * 0 - 1}
    with pytest.raises(ValueError, match="rope"):
        memory.add(1, keys, values)
    memory.add(1, keys, values, rope)
    text.add(1, keys, values)
    assert torch.equal(text.keys[0, :, :3], keys.half())  # text positions: stored as they come
    stored = memory.keys[0, :, :3].float()
    rotate_keys_(stored, rope, inv_freq)  # back to where they came from
    torch.testing.assert_close(stored, keys, atol=2e-3, rtol=2e-3)
    state = memory.state_dict()
    with pytest.raises(ValueError, match="position 0"):
        memory.check_state({k: v for k, v in state.items() if k != "derotated"}, next_serial=3, seen=93)
    with pytest.raises(ValueError, match="text positions"):
        text.check_state(state, next_serial=3, seen=93)
    assert "derotated" not in text.state_dict()
