"""Repair in the loop: targets near the new holes, one batched pass, diffs applied to the mirror and the KV."""

import pytest
import torch

from halo import HaloConfig, Session
from halo.repair import SelfRepairer
from tiny import tiny_llama

TEXT = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat by the door " * 3


def repair_config(**kw):
    """Left-context repair with the gate open (every differing suggestion applies): the loop's mechanics."""
    base = dict(budget=40, sink_tokens=2, recent_tokens=6, chunk_size=4, repair="self", repair_threshold=255.0,
                repair_radius=6, repairs_per_step=3, repair_window=32, repair_margin=0.0, repair_rerank=None)
    base.update(kw)
    return HaloConfig(granularity="token", **base)


def test_targets_are_dim_alive_unprotected_and_nearest_the_holes(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, repair_config(repair=None))
    session.feed(TEXT[:200])
    cache, cfg = session.cache, session.config
    evictions = session.last_step.evictions
    assert evictions, "the last step must have culled something"
    targets = session.repair_targets()
    holes = torch.cat([e.positions for e in evictions])
    line = float(torch.cat([e.brightness for e in evictions]).max())
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


def test_default_repair_reranks_with_both_contexts_behind_the_gate(tiny_pair):
    model, tok = tiny_pair
    config = HaloConfig(repair="self", budget=40, sink_tokens=2, recent_tokens=6, chunk_size=4)
    rep = Session(model, tok, config).repairer
    assert (rep.rerank_top, rep.guidance, rep.min_margin) == (8, "none", 2.0)
    # the same loop with the gate open: re-ranked suggestions are applied and everything stays accounted for
    session = Session(model, tok, repair_config(repair_rerank=8))
    session.feed(TEXT)
    assert session.diffs and session.repairer.rerank_top == 8
    mem = session.memory()
    retained = [p for p, s in zip(mem.positions.tolist(), mem.sources) if s != "marker"]
    evicted = [e.position for e in session.journal.evicted]
    assert sorted(evicted + retained) == list(range(session.cache.seen))


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


def _slot(cache, position):
    return int((cache.positions[: cache.n_valid] == position).nonzero())


def _run_on_cached(model, cache, slots, token_id, position):
    """Logits [V] and per-layer (K, V) [Hkv, D] of one token run after the cache's K/V of `slots` (in order)."""
    from transformers import DynamicCache
    reference = DynamicCache(config=model.config)
    for layer in range(model.config.num_hidden_layers):
        reference.update(cache.kv[layer, 0, None, :, slots].clone(), cache.kv[layer, 1, None, :, slots].clone(), layer)
    with torch.no_grad():
        out = model(torch.tensor([[token_id]]), position_ids=torch.tensor([[position]]), past_key_values=reference)
    return out.logits[0, -1], [(layer.keys[0, :, -1], layer.values[0, :, -1]) for layer in reference.layers]


@pytest.mark.parametrize("ranks", [(5,), (3, 9)])
def test_patches_ride_along_with_the_next_forward_exactly(tiny_pair, ranks):
    """A patched slot's K/V equal the model run on the retained tokens before it (earlier patches included),
    and the next token's logits equal the model run on the patched cache."""
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(granularity="token", budget=300, sink_tokens=2, recent_tokens=4, chunk_size=16))
    session.feed("the quick brown fox jumps over the lazy dog and keeps running")
    snap = session.memory()
    ids, positions = snap.token_ids.tolist(), snap.positions.tolist()
    repaired = list(ids)
    diffs = []
    for rank in ranks:
        repaired[rank] = (ids[rank] + 7) % len(tok)
        diffs.append((positions[rank], ids[rank], repaired[rank]))
    assert session.apply_diffs(diffs, defer=True) == len(ranks)
    assert session.diffs == diffs and session.memory().token_ids.tolist() == repaired  # mirror at once
    forwards = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: forwards.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        session.feed_ids(torch.tensor([11]))
    finally:
        hook.remove()
    assert forwards == [1 + len(ranks)], "the patches must ride in the decode forward, not a forward of their own"
    cache = session.cache
    order = [_slot(cache, p) for p in positions]
    logits, _ = _run_on_cached(model, cache, order, 11, len(ids))
    torch.testing.assert_close(session.last_logits, logits, rtol=1e-4, atol=1e-4)
    for rank in ranks:
        _, kv = _run_on_cached(model, cache, order[:rank], repaired[rank], positions[rank])
        for layer, (k, v) in enumerate(kv):
            torch.testing.assert_close(cache.kv[layer, 0, :, order[rank]], k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(cache.kv[layer, 1, :, order[rank]], v, rtol=1e-5, atol=1e-5)
    assert session.repairs.pending == []


def test_folded_patch_equals_a_separate_patch_forward(tiny_pair):
    """Same K/V, brightness, culls and logits whether a patch rides along or runs on its own first."""
    model, tok = tiny_pair
    config = HaloConfig(granularity="token", budget=20, sink_tokens=2, recent_tokens=4, chunk_size=4)
    text = "the quick brown fox jumps over the lazy dog and keeps running far away into the night"
    folded, separate = Session(model, tok, config), Session(model, tok, config)
    for s in (folded, separate):
        s.feed(text)
    snap = folded.memory()
    diff = [(int(snap.positions[6]), int(snap.token_ids[6]), 5)]
    folded.apply_diffs(diff, defer=True)
    separate.apply_diffs(diff)
    for s in (folded, separate):
        s.feed(" and on")
    a, b = folded.cache, separate.cache
    assert a.n_valid == b.n_valid and torch.equal(a.positions, b.positions) and torch.equal(a.token_ids, b.token_ids)
    torch.testing.assert_close(a.kv[:, :, :, : a.n_valid], b.kv[:, :, :, : b.n_valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.brightness[: a.n_valid], b.brightness[: b.n_valid], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(folded.last_logits, separate.last_logits, rtol=1e-4, atol=1e-4)
    assert [e.position for e in folded.journal.evicted] == [e.position for e in separate.journal.evicted]


def test_pending_patches_follow_their_slots_through_a_compaction(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(granularity="token", budget=300, sink_tokens=2, recent_tokens=4, chunk_size=16))
    session.feed("one two three four five six seven eight nine ten")
    cache = session.cache
    n = cache.n_valid
    last_position, old = int(cache.positions[n - 1]), int(cache.token_ids[n - 1])
    session.apply_diffs([(last_position, old, 9)], defer=True)
    cache.evict(torch.tensor([0]))  # fill-from-tail moves the patched slot into slot 0
    assert int(cache.positions[0]) == last_position
    session.flush_repairs()
    assert int(cache.token_ids[0]) == 9
    prefix = [_slot(cache, p) for p in sorted(cache.positions[: cache.n_valid].tolist())[:-1]]
    _, kv = _run_on_cached(model, cache, prefix, 9, last_position)
    for layer, (k, v) in enumerate(kv):
        torch.testing.assert_close(cache.kv[layer, 0, :, 0], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.kv[layer, 1, :, 0], v, rtol=1e-5, atol=1e-5)


def test_overlap_applies_each_steps_diffs_one_step_later(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, repair_config(repair_overlap=True))
    assert session.repair_overlap
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    launched = 0
    for start in range(0, len(ids), 4):
        before = len(session.diffs)
        steps = session.cache.steps
        due = [job for job in session.repairs.in_flight if job.step < steps]  # overlapped the previous step
        session.feed_ids(torch.tensor(ids[start:start + 4]))
        assert not any(job in session.repairs.in_flight for job in due), "due jobs are collected at the step boundary"
        assert all(job.step >= session.cache.steps - 1 for job in session.repairs.in_flight)
        launched += any(job.step == session.cache.steps for job in session.repairs.in_flight)
        if not due:
            assert len(session.diffs) == before, "no diff may appear before its job is due"
    assert launched, "the tiny model's repairs must have launched jobs"
    assert session.diffs, "collected jobs must have produced diffs"
    session.flush_repairs()
    assert session.repairs.in_flight == [] and session.repairs.pending == []
    cache = session.cache
    assert cache.n_valid <= session.config.budget
    current = dict(zip(cache.positions[: cache.n_valid].tolist(), cache.token_ids[: cache.n_valid].tolist()))
    final = {p: new for p, _, new in session.diffs}
    assert all(current[p] == new for p, new in final.items() if p in current)


def test_overlap_drops_diffs_whose_target_died_meanwhile(tiny_pair):
    from halo.repair import RepairBatch, build_windows
    model, tok = tiny_pair
    session = Session(model, tok, repair_config(repair_overlap=True, repair_threshold=64.0))
    session.feed(TEXT[:120])
    session.flush_repairs()
    cache = session.cache
    targets = torch.arange(3, 8)
    batch = RepairBatch.from_windows(build_windows(cache.token_ids, cache.positions, cache.brightness, cache.n_valid,
                                                   targets, 32))
    session.repairer.min_margin = float("-inf")  # every differing suggestion becomes a diff
    session.repairs.in_flight.append(session.repairs.launch(batch, session.cache))
    suggested = session.repairer.diffs(batch, session.repairs.in_flight[0].suggestions)
    assert suggested, "the tiny model must disagree with some of five tokens"
    doomed = suggested[0][0]
    cache.evict(torch.tensor([_slot(cache, doomed)]))
    before = len(session.diffs)
    session.flush_repairs()
    applied = session.diffs[before:]
    assert [d[0] for d in applied] == [d[0] for d in suggested[1:]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="side-stream overlap needs a CUDA device")
def test_overlap_on_cuda_launches_without_a_host_sync(tiny_tok):
    """On CUDA the repair pass is queued on the side stream without blocking the host, and still lands."""
    tok = tiny_tok
    model = tiny_llama(vocab=len(tok)).cuda()
    session = Session(model, tok, repair_config())
    assert session.repair_overlap
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"])
    session.feed_ids(ids[:60])
    cache = session.cache
    targets = torch.arange(3, 7, device="cuda")
    from halo.repair import RepairBatch, build_windows
    batch = RepairBatch.from_windows(build_windows(cache.token_ids, cache.positions, cache.brightness, cache.n_valid,
                                                   targets, 32), validate=False)
    torch.cuda.set_sync_debug_mode("error")
    try:
        job = session.repairs.launch(batch, session.cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert job.done is not None and job.suggestions.token_ids.is_cuda
    session.repairs.in_flight.append(job)
    for start in range(60, ids.numel(), 4):
        session.feed_ids(ids[start:start + 4])
    session.flush_repairs()
    assert session.diffs and session.cache.n_valid <= session.config.budget


def test_a_forward_interrupted_midway_changes_nothing_and_keeps_patches_pending(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(granularity="token", budget=300, sink_tokens=2, recent_tokens=4, chunk_size=16))
    session.feed("the quick brown fox jumps over the lazy dog and keeps running")
    cache = session.cache
    snap = session.memory()
    position, old = int(snap.positions[5]), int(snap.token_ids[5])
    session.apply_diffs([(position, old, 9)], defer=True)
    before = (cache.n_valid, cache.seen, cache.steps, cache.positions.clone(), cache.token_ids.clone())

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    hook = model.model.layers[0].register_forward_hook(interrupt)  # before the last layer closes the forward
    try:
        with pytest.raises(KeyboardInterrupt):
            session.feed_ids(torch.tensor([11]))
    finally:
        hook.remove()
    assert (cache.n_valid, cache.seen, cache.steps) == before[:3]
    assert torch.equal(cache.positions[: cache.n_valid], before[3][: cache.n_valid])
    assert torch.equal(cache.token_ids[: cache.n_valid], before[4][: cache.n_valid])
    assert session.repairs.pending == [position]
    assert session.repairs.patch_slots(cache).tolist() == [_slot(cache, position)]
    session.feed_ids(torch.tensor([11]))  # the patch rides along now
    order = [_slot(cache, p) for p in snap.positions.tolist()]
    _, kv = _run_on_cached(model, cache, order[:5], 9, position)
    for layer, (k, v) in enumerate(kv):
        torch.testing.assert_close(cache.kv[layer, 0, :, order[5]], k, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.kv[layer, 1, :, order[5]], v, rtol=1e-5, atol=1e-5)
    assert cache.seen == before[1] + 1
