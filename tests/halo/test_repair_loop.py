"""Repair in the loop: targets near the new holes, one batched pass, diffs applied to the mirror and the KV."""

import pytest
import torch

from halo import HaloConfig, Session
from halo.repair import SelfRepairer
from tiny import tiny_llama

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door " * 3


def repair_config(**kw):
    base = dict(budget=40, sink_tokens=2, recent_tokens=6, chunk_size=4, repair="self", repair_threshold=255.0,
                repair_radius=6, repairs_per_step=3, repair_window=32)
    base.update(kw)
    return HaloConfig(**base)


def test_targets_are_dim_alive_unprotected_and_nearest_the_holes(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, repair_config(repair=None))
    session.feed(TEXT[:200])
    cache, cfg = session.cache, session.config
    assert cache.step_evicted, "the last step must have culled something"
    targets = session.repair_targets()
    holes = torch.cat([p for p, _ in cache.step_evicted])
    line = float(torch.cat([b for _, b in cache.step_evicted]).max())
    protected = cache.protected_mask()
    distances = []
    for slot in targets.tolist():
        assert not protected[slot] and line < float(cache.brightness[slot]) < cfg.repair_threshold
        distance = int((cache.positions[slot] - holes).abs().min())
        assert distance <= cfg.repair_radius
        distances.append(distance)
    assert distances == sorted(distances) and len(targets) <= cfg.repairs_per_step


def test_self_repair_applies_diffs_to_mirror_kv_and_journal(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, repair_config())
    assert isinstance(session.repairer, SelfRepairer)
    fed = []
    for start in range(0, len(TEXT), 60):
        first = session.cache.seen
        session.feed(TEXT[start:start + 60])
        fed += list(range(first, session.cache.seen))
    assert session.diffs, "a random model disagrees with the text often: some diffs must be applied"
    replaced = [e for e in session.journal.entries if e.kind == "replaced"]
    assert [(e.position, e.token_id) for e in replaced] == [(p, old) for p, old, _ in session.diffs]
    mem = session.memory()
    current = dict(zip(mem.positions.tolist(), mem.token_ids.tolist()))
    final = {}
    for position, _, new in session.diffs:
        final[position] = new
    for position, new in final.items():
        if position in current:  # a repaired token may have been culled later
            assert current[position] == new
    evicted = [e.position for e in session.journal.evicted]
    retained = [p for p, s in zip(mem.positions.tolist(), mem.sources) if s != "marker"]
    assert sorted(evicted + retained) == sorted(fed)
    assert session.cache.n_valid <= session.config.budget
    assert session.stats()["repairs"] == len(session.diffs) and session.stats()["repair_seconds"] > 0


def test_repair_off_by_default_makes_no_diffs(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, repair_config(repair=None))
    session.feed(TEXT)
    assert session.diffs == [] and session.repairer is None


@pytest.mark.real_model
def test_embedded_model_self_repair_on_real_text():
    from halo import load_model
    from halo.text import embedded_text
    model, tok = load_model()
    session = Session(model, tok, repair_config(budget=64, recent_tokens=16, chunk_size=16, repair_window=48))
    text = embedded_text(max_chars=700)
    session.feed(text)
    stats = session.stats()
    assert stats["retained"] <= 96 and stats["evicted"] > 0 and stats["repairs"] > 0
    mem = session.memory()
    evicted = [e.position for e in session.journal.evicted]
    retained = [p for p, s in zip(mem.positions.tolist(), mem.sources) if s != "marker"]
    assert sorted(evicted + retained) == list(range(session.cache.seen))
    assert all(0 <= b <= 255 for b in mem.brightness.tolist())
