"""Property tests for repair KV patches that ride along with the next forward.

Random sequences of feeds (plain ids, log lines with elision markers, generation), repair diffs applied now or
deferred on random retained text positions, direct evictions of random unprotected slots and flushes must keep:
the budget, exact accounting (every fed position retained or journaled as evicted, exactly once), the mirror
(each retained token is the last diff's new token at its position, or the fed one), the journal's "replaced"
entries (the diffs' old tokens, chained), no pending patch after a flush, and, above all, every slot patched by a
flush (or by a feed that carried the patches) holds exactly the K/V of the model run on the cache's own K/V of
the slots before its position.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

from halo import HaloConfig, Session
from halo.units import tokenize_lines
from tiny import TINY_VOCAB, tiny_llama

WORDS = ["fox", "dog", "the", "quick", "lazy", "error", "ok", "42", "."]
RTOL, ATOL = 1e-4, 2e-5

ids_list = st.lists(st.integers(2, TINY_VOCAB - 1), min_size=1, max_size=10)
feed = st.tuples(st.just("feed"), ids_list)
log = st.tuples(st.just("log"), st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=3), min_size=1,
                                         max_size=3))
generate = st.tuples(st.just("generate"), st.integers(0, 3))
diff = st.tuples(st.just("diff"), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, TINY_VOCAB - 1)),
                                           min_size=1, max_size=4), st.booleans())
evict = st.tuples(st.just("evict"), st.lists(st.integers(0, 10_000), min_size=1, max_size=3))
flush = st.tuples(st.just("flush"))
ride = st.tuples(st.just("ride"), diff.map(lambda d: d[1]), ids_list)  # deferred diffs, then a feed carries them
op = st.one_of(feed, log, generate, diff, diff, ride, ride, evict, flush)
SETTINGS = dict(deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking takes minutes on 2 CPU cores


@pytest.fixture(scope="module")
def pair(tiny_tok):
    # Tiny tensors: one intra-op thread is faster, and immune to the spin-wait slowdowns of a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tiny_llama(vocab=len(tiny_tok)), tiny_tok
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ oracles
def _reference(model, kvs):
    """A DynamicCache holding the given per-layer (K [Hkv, n, D], V [Hkv, n, D])."""
    reference = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(kvs):
        if k.shape[1]:
            reference.update(k[None].clone(), v[None].clone(), layer)
    return reference


def _run(model, kvs, token_ids, positions):
    """(logits of the last token [V], per-layer (K, V) [Hkv, D] of the last token) run after `kvs`."""
    reference = _reference(model, kvs)
    with torch.no_grad():
        out = model(torch.tensor([token_ids]), position_ids=torch.tensor([positions]), past_key_values=reference,
                    use_cache=True)
    return out.logits[0, -1], [(layer.keys[0, :, -1], layer.values[0, :, -1]) for layer in reference.layers]


def _cache_kvs(cache, slots):
    idx = torch.tensor(slots, dtype=torch.int64)
    return [(cache.kv[layer, 0][:, idx], cache.kv[layer, 1][:, idx]) for layer in range(cache.num_layers)]


def _slot_of(cache) -> dict[int, int]:
    """position -> slot of the retained text tokens (text positions are unique; markers are left out)."""
    marker = cache.config.source_code("marker")
    n = cache.n_valid
    return {p: i for i, (p, s) in enumerate(zip(cache.positions[:n].tolist(), cache.sources[:n].tolist()))
            if s != marker}


def assert_patched_exactly(model, cache, patched_positions):
    """Every patched slot's K/V equal the model run on the cache's K/V of all retained slots before it."""
    n = cache.n_valid
    positions = cache.positions[:n].tolist()
    slot_of = _slot_of(cache)
    for p in patched_positions:
        slot = slot_of[p]
        prefix = [i for i, q in enumerate(positions) if q < p]
        _, kv = _run(model, _cache_kvs(cache, prefix), [int(cache.token_ids[slot])], [p])
        for layer, (k, v) in enumerate(kv):
            torch.testing.assert_close(cache.kv[layer, 0, :, slot], k, rtol=RTOL, atol=ATOL)
            torch.testing.assert_close(cache.kv[layer, 1, :, slot], v, rtol=RTOL, atol=ATOL)


def _pending(session) -> dict[int, int]:
    """position -> slot of the pending patches still retained (the scheduler drops the others)."""
    slots = session.repairs.patch_slots(session.cache)
    return {} if slots is None else dict(zip(session.repairs.pending, slots.tolist()))


# ------------------------------------------------------------------ driver
class Driver:
    """Runs ops on a Session and checks the invariants after each."""

    def __init__(self, model, tok, config):
        self.model, self.tok = model, tok
        self.session = Session(model, tok, config)
        self.cache = self.session.cache
        self.original: dict[int, int] = {}  # position -> token id as fed
        self.fed: list[int] = []
        self.flushes = 0
        self.patched_total = 0
        self.folded_checked = 0
        self.logits_checked = 0

    # ---- ops
    def feed_ids(self, ids):
        start = self.cache.seen
        folded = self._snapshot_for_fold()
        self.session.feed_ids(torch.tensor(ids, dtype=torch.int64))
        self._record(start, ids)
        self._check_folded(folded, ids, start)

    def feed_log(self, lines):
        text = "".join(" ".join(line) + "\n" for line in lines)
        ids, _ = tokenize_lines(self.tok, text, add_special_tokens=self.cache.seen == 0)
        start = self.cache.seen
        folded = self._snapshot_for_fold()
        self.session.feed(text, source="log")
        self._record(start, ids)
        self._check_folded(folded, ids, start)

    def generate(self, count):
        start = self.cache.seen
        folded = self._snapshot_for_fold()
        out: list[int] = []
        self.session.generate(count, on_token=out.append)
        self._record(start, out)
        self._check_folded(folded, out, start)

    def diff(self, picks, defer):
        cache, session = self.cache, self.session
        slot_of = _slot_of(cache)
        candidates = sorted(slot_of)
        if not candidates:
            return
        diffs, used = [], set()
        for index, new in picks:
            position = candidates[index % len(candidates)]
            if position in used:
                continue
            used.add(position)
            diffs.append((position, int(cache.token_ids[slot_of[position]]), new))
        before = len(session.diffs)
        pending_before = set(_pending(session))
        assert session.apply_diffs(diffs, defer=defer) == len(diffs)
        assert session.diffs[before:before + len(diffs)] == diffs
        if defer:
            assert set(_pending(session)) == pending_before | {p for p, _, _ in diffs}
        else:
            # apply_diffs(defer=False) flushes: every pending patch (older ones too) is now in the KV
            # (the flush also takes the diffs of repair jobs still in flight)
            assert session.repairs.pending == [] and session.repairs.in_flight == []
            retained = _slot_of(cache)
            patched = pending_before | used | {p for p, _, _ in session.diffs[before + len(diffs):] if p in retained}
            self.flushes += 1
            self.patched_total += len(patched)
            assert_patched_exactly(self.model, cache, sorted(patched))

    def evict(self, picks):
        cache = self.cache
        n = cache.n_valid
        marker = self.session.config.source_code("marker")
        free = (~cache.protected_mask()) & (cache.units[:n] < 0) & (cache.sources[:n] != marker)
        candidates = free.nonzero().flatten().tolist()
        if not candidates:
            return
        victims = sorted({candidates[i % len(candidates)] for i in picks})
        cache.evict(torch.tensor(victims, dtype=torch.int64))

    def flush(self):
        session, cache = self.session, self.cache
        pending = set(_pending(session))
        before = len(session.diffs)
        patched = session.flush_repairs()
        retained = _slot_of(cache)
        # the flush also takes the diffs of repair jobs still in flight
        expected = pending | {p for p, _, _ in session.diffs[before:] if p in retained}
        assert patched == len(expected)
        assert session.repairs.pending == [] and session.repairs.in_flight == []
        assert session.flush_repairs() == 0, "a second flush has nothing left to do"
        self.flushes += 1
        self.patched_total += patched
        assert_patched_exactly(self.model, cache, sorted(expected))

    # ---- folded patches: the feed that carries them
    def _snapshot_for_fold(self):
        """What the next step's patch rows will see: the K/V and positions now, the pending patches' tokens."""
        session, cache = self.session, self.cache
        if any(job.step < cache.steps for job in session.repairs.in_flight):
            return None  # a due job's diffs would join the patches at the step's start
        pending = dict(_pending(session))
        if not pending:
            return None
        n = cache.n_valid
        return {
            "kv": cache.kv[:, :, :, :n].clone(),
            "positions": cache.positions[:n].tolist(),
            "tokens": {p: int(cache.token_ids[s]) for p, s in pending.items()},
            "diffs": len(session.diffs),
            "steps": cache.steps,
        }

    def _check_folded(self, snap, ids, start):
        """The first step of a feed or generate carried the pending patches: check their K/V (and the logits)."""
        session, cache = self.session, self.cache
        if snap is None or not ids:
            return
        steps = cache.steps - snap["steps"]
        assert steps >= 1
        if steps > 1 and len(session.diffs) != snap["diffs"]:
            return  # a later step of this op may have patched the same slots again
        slot_after = _slot_of(cache)
        patched = snap["tokens"]
        if len(session.diffs) == snap["diffs"]:
            assert not _pending(session), "the step must have taken every pending patch"
        if not all(p in slot_after for p in patched):
            return  # a patched slot was culled after the step: its K/V are gone
        kv0, positions0 = snap["kv"], snap["positions"]

        def kvs_of(old_slots):
            """Per-layer K/V the forward's rows saw for these (pre-step) slots."""
            out = []
            for layer in range(cache.num_layers):
                ks, vs = [], []
                for s in old_slots:
                    p = positions0[s]
                    if p in patched:  # patched in this forward: its new K/V
                        ks.append(cache.kv[layer, 0, :, slot_after[p]])
                        vs.append(cache.kv[layer, 1, :, slot_after[p]])
                    else:  # untouched by the forward (possibly culled after it)
                        ks.append(kv0[layer, 0, :, s])
                        vs.append(kv0[layer, 1, :, s])
                empty = kv0.new_zeros(kv0.shape[2], 0, kv0.shape[4])
                out.append((torch.stack(ks, 1) if ks else empty, torch.stack(vs, 1) if vs else empty))
            return out

        for p, token in patched.items():
            prefix = [s for s, q in enumerate(positions0) if q < p]
            _, kv = _run(self.model, kvs_of(prefix), [token], [p])
            for layer, (k, v) in enumerate(kv):
                torch.testing.assert_close(cache.kv[layer, 0, :, slot_after[p]], k, rtol=RTOL, atol=ATOL)
                torch.testing.assert_close(cache.kv[layer, 1, :, slot_after[p]], v, rtol=RTOL, atol=ATOL)
        self.folded_checked += 1
        if steps == 1:
            # the new tokens read the patched K/V: their last logits equal the model run on the patched cache
            first = ids[: session.config.chunk_size]
            logits, _ = _run(self.model, kvs_of(list(range(len(positions0)))), list(first),
                             list(range(start, start + len(first))))
            torch.testing.assert_close(session.last_logits, logits, rtol=RTOL, atol=1e-4)
            self.logits_checked += 1

    # ---- invariants
    def _record(self, start, ids):
        assert self.cache.seen == start + len(ids)
        for offset, token in enumerate(ids):
            self.original[start + offset] = int(token)
            self.fed.append(start + offset)

    def check(self):
        session, cache, config = self.session, self.cache, self.session.config
        assert cache.n_valid <= config.budget
        assert not cache.in_forward and not session.markers.pending_runs
        mem = session.memory()
        text = [(p, t) for p, t, s in zip(mem.positions.tolist(), mem.token_ids.tolist(), mem.sources) if s != "marker"]
        retained = [p for p, _ in text]
        evicted = session.journal.evicted
        # exact accounting: each fed position is retained or journaled as evicted, exactly once
        assert sorted(retained + [e.position for e in evicted]) == sorted(self.fed)
        # the replaced entries are the diffs' old tokens, in order, and each diff's old token is the token the
        # position held before it (the fed one or the previous diff's new one)
        replaced = [e for e in session.journal.entries if e.kind == "replaced"]
        assert [(e.position, e.token_id) for e in replaced] == [(p, old) for p, old, _ in session.diffs]
        current = dict(self.original)
        for p, old, new in session.diffs:
            assert current[p] == old
            current[p] = new
        # the mirror: last diff per position (or the fed token); evicted entries name the token they held
        assert all(t == current[p] for p, t in text)
        assert all(e.token_id == current[e.position] for e in evicted)
        # pending patches point at retained text slots holding a diffed token
        pending = _pending(session)
        slot_of = _slot_of(cache)
        diffed = {p for p, _, _ in session.diffs}
        assert all(slot_of.get(p) == s and p in diffed for p, s in pending.items())
        for b in cache.brightness[: cache.n_valid].tolist():
            assert math.isfinite(b) and 0.0 <= b <= 255.0
        stats = session.stats()
        assert stats["repairs"] == len(session.diffs) and stats["evicted"] == len(evicted)
        assert stats["retained"] == cache.n_valid and stats["tokens_fed"] == len(self.fed)

    def run(self, ops):
        self.feed_ids([5, 9, 17, 33, 65, 129, 200, 7])
        self.check()
        for o in ops:
            kind = o[0]
            if kind == "feed":
                self.feed_ids(o[1])
            elif kind == "log":
                self.feed_log(o[1])
            elif kind == "generate":
                self.generate(o[1])
            elif kind == "diff":
                self.diff(o[1], o[2])
            elif kind == "ride":
                self.diff(o[1], True)
                self.check()
                self.feed_ids(o[2])
            elif kind == "evict":
                self.evict(o[1])
            else:
                self.flush()
            self.check()
        self.flush()
        self.check()


@settings(max_examples=25, **SETTINGS)
@given(budget=st.integers(24, 48), sinks=st.integers(0, 3), recent=st.integers(1, 6), chunk=st.integers(1, 8),
       ops=st.lists(op, min_size=1, max_size=10))
def test_manual_patches_keep_the_invariants_and_are_exact(pair, budget, sinks, recent, chunk, ops):
    model, tok = pair
    config = HaloConfig(granularity="token", budget=budget, sink_tokens=sinks, recent_tokens=recent, chunk_size=chunk)
    Driver(model, tok, config).run(ops)


@settings(max_examples=15, **SETTINGS)
@given(budget=st.integers(24, 40), chunk=st.integers(1, 6), overlap=st.booleans(),
       rerank=st.sampled_from([None, 3]), ops=st.lists(op, min_size=1, max_size=8))
def test_self_repair_with_manual_patches_keeps_the_invariants(pair, budget, chunk, overlap, rerank, ops):
    """Automatic self-repair (now, or one step behind) interleaved with manual diffs, evictions and flushes."""
    model, tok = pair
    config = HaloConfig(granularity="token", budget=budget, sink_tokens=2, recent_tokens=4, chunk_size=chunk, repair="self",
                        repair_threshold=255.0, repair_radius=6, repairs_per_step=3, repair_window=24,
                        repair_overlap=overlap, repair_margin=0.0, repair_rerank=rerank)
    Driver(model, tok, config).run(ops)


def test_the_driver_exercises_folded_and_flushed_patches(pair):
    """The oracles above must actually run: a fixed sequence that folds patches into a feed and flushes some."""
    model, tok = pair
    driver = Driver(model, tok, HaloConfig(granularity="token", budget=24, sink_tokens=2, recent_tokens=3, chunk_size=4))
    driver.run([("feed", list(range(40, 60))), ("diff", [(1, 3), (4, 11)], True), ("feed", [7, 8]),
                ("evict", [0, 3]), ("diff", [(2, 5), (6, 13)], True), ("flush",),
                ("diff", [(3, 21)], False), ("generate", 2)])
    assert driver.folded_checked >= 1 and driver.logits_checked >= 1
    assert driver.flushes >= 2 and driver.patched_total >= 3


def _ride_along_session(model, tok, kernels: bool, fold: bool, monkeypatch):
    """A session whose repairs ride along a feed (fold) or are flushed first, on the kernel or reference path."""
    import halo_kernels

    rows = []
    with monkeypatch.context() as patch:
        if kernels:
            fused = halo_kernels.attention_column_mass_and_update
            patch.setattr(halo_kernels, "attention_column_mass_and_update",
                          lambda query, *a: rows.append(query.shape[1]) or fused(query, *a))
        config = HaloConfig(granularity="token", budget=20, sink_tokens=2, recent_tokens=3, chunk_size=4,
                            kernels="triton" if kernels else "reference")
        session = Session(model, tok, config)
        assert session.cache.backend.name == ("triton" if kernels else "reference")
        session.feed_ids(torch.arange(40, 64))
        snap = session.memory()
        diffs = [(int(snap.positions[i]), int(snap.token_ids[i]), 7 + i) for i in (3, 6, 9)]
        session.apply_diffs(diffs, defer=fold)
        rows.clear()
        session.feed_ids(torch.tensor([11, 12, 13]))
        session.generate(2)
    return session, rows


def test_patch_rows_on_the_kernel_path_earn_nothing_and_match_the_reference(pair, monkeypatch):
    """`capture_layer` slices the patch rows off the query before the fused Triton column mass (interpreter on
    CPU): the kernel path equals the reference path, and folded patches equal patches flushed on their own."""
    import halo_kernels

    if not halo_kernels.available():
        pytest.skip("no Triton backend")
    model, tok = pair
    folded, rows = _ride_along_session(model, tok, True, True, monkeypatch)
    assert rows[:1] == [3], "the fused last-layer kernel must see the 3 new rows only, not the 3 patch rows"
    separate, _ = _ride_along_session(model, tok, True, False, monkeypatch)
    reference, _ = _ride_along_session(model, tok, False, True, monkeypatch)
    a = folded.cache
    order_a = torch.sort(a.positions[: a.n_valid]).indices
    for other in (separate, reference):
        b = other.cache
        order_b = torch.sort(b.positions[: b.n_valid]).indices
        assert a.n_valid == b.n_valid
        assert torch.equal(a.positions[: a.n_valid][order_a], b.positions[: b.n_valid][order_b])
        assert torch.equal(a.token_ids[: a.n_valid][order_a], b.token_ids[: b.n_valid][order_b])
        torch.testing.assert_close(a.kv[:, :, :, : a.n_valid][:, :, :, order_a],
                                   b.kv[:, :, :, : b.n_valid][:, :, :, order_b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.brightness[: a.n_valid][order_a], b.brightness[: b.n_valid][order_b],
                                   rtol=1e-4, atol=1e-3)
        assert [e.position for e in folded.journal.evicted] == [e.position for e in other.journal.evicted]


# ------------------------------------------------------------------ regressions (bugs found in review)
def test_save_load_keeps_replaced_journal_entries(pair, tmp_path):
    model, tok = pair
    session = Session(model, tok, HaloConfig(granularity="token", budget=20, sink_tokens=2, recent_tokens=4, chunk_size=4))
    session.feed_ids(torch.arange(3, 40))
    snap = session.memory()
    position, old = int(snap.positions[5]), int(snap.token_ids[5])
    session.apply_diffs([(position, old, 7)], defer=True)  # save flushes it
    loaded = Session.load(session.save(tmp_path / "s.halo"), model, tok)
    assert [e.kind for e in loaded.journal] == [e.kind for e in session.journal]
    retained = [p for p, s in zip(loaded.memory().positions.tolist(), loaded.memory().sources) if s != "marker"]
    assert sorted(retained + [e.position for e in loaded.journal.evicted]) == list(range(loaded.cache.seen))
    assert loaded.stats()["evicted"] == session.stats()["evicted"]


def test_an_interrupt_after_the_last_attention_drops_the_step_too(pair):
    model, tok = pair
    session = Session(model, tok, HaloConfig(granularity="token", budget=40, sink_tokens=2, recent_tokens=4, chunk_size=4))
    session.feed("the quick brown fox jumps over the lazy dog")
    session.feed("error one\nok two\nerror three\nok four\n", source="log")
    cache = session.cache
    snap = session.memory()
    position, old = int(snap.positions[5]), int(snap.token_ids[5])
    session.apply_diffs([(position, old, 9)], defer=True)
    before = (cache.seen, cache.steps, cache.n_valid)

    def interrupt(module, args, output):
        raise KeyboardInterrupt

    hook = model.lm_head.register_forward_hook(interrupt)  # Ctrl-C while the logits are computed
    try:
        with pytest.raises(KeyboardInterrupt):
            session.feed(" and the cat sat on the mat")
    finally:
        hook.remove()
    assert position in session.repairs.pending
    assert (cache.seen, cache.steps, cache.n_valid) == before, "the interrupted step was committed"
    assert not session.markers.pending_runs, "units were culled but no marker was placed (save() now refuses)"


def test_a_cache_reset_does_not_apply_stale_patches(pair):
    model, tok = pair
    config = HaloConfig(granularity="token", budget=64, sink_tokens=2, recent_tokens=4, chunk_size=16)
    session = Session(model, tok, config)
    session.feed_ids(torch.arange(40, 52))  # no cull yet: no slot has moved
    snap = session.memory()
    session.apply_diffs([(int(snap.positions[9]), int(snap.token_ids[9]), 7)], defer=True)
    session.cache.reset()  # start over on the same buffers
    session.feed_ids(torch.arange(60, 63))  # IndexError: the stale patch names slot 9 of a 3-slot forward
    session.feed_ids(torch.arange(63, 72))
    fresh = Session(model, tok, config)
    fresh.feed_ids(torch.arange(60, 63))
    fresh.feed_ids(torch.arange(63, 72))
    torch.testing.assert_close(session.cache.kv[:, :, :, :12], fresh.cache.kv[:, :, :, :12])


def test_an_interrupted_marker_forward_leaves_its_run_to_be_marked(pair):
    model, tok = pair
    session = Session(model, tok, HaloConfig(granularity="token", budget=40, sink_tokens=2, recent_tokens=4, chunk_size=4))
    session.feed("the quick brown fox jumps over the lazy dog")
    armed = [True]

    def interrupt(module, args, output):
        spec = session.cache.current_spec
        if armed[0] and spec is not None and not spec.streams:  # the first marker forward
            armed[0] = False
            raise KeyboardInterrupt

    hook = model.model.layers[0].register_forward_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            session.feed("error one\nok two\nerror three\nok four\n" * 3, source="log")
    finally:
        hook.remove()
    assert not armed[0], "a marker forward must have run"
    assert session.stats()["markers"] > 0 or session.markers.pending_runs, "a culled run has no marker, and none is due"
