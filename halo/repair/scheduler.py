"""Repair scheduling: which tokens to repair after a cull, the passes in flight, and the KV patches pending.

After a stream forward's cull, `RepairScheduler.after_cull` picks the targets near the new holes and runs one
batched repair pass over their windows: at once (its diffs reach the mirror now), or, with overlap, launched
(on CUDA on a side stream) and collected by `collect` at the boundary after the next step. Accepted diffs change
the text mirror at once; their K/V are recomputed later, by rows that ride along with the next forward
(`patch_slots`), so the scheduler keeps the positions whose K/V are pending.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from ..forward import Eviction
from .contract import RepairBatch
from .windows import build_windows

Diff = tuple[int, int, int]


@dataclass(eq=False)  # identity: jobs hold tensors
class RepairJob:
    """A repair pass in flight: its batch, the suggestions it will hold, the event that fences them."""

    batch: RepairBatch
    suggestions: object  # Suggestions
    done: object  # torch.cuda.Event, or None when computed synchronously
    step: int  # cache.steps when launched


def repair_targets(cache, evictions: list[Eviction], *, threshold: float, radius: int, limit: int) -> torch.Tensor:
    """int64 [k] slots to repair after `evictions`: dim but alive, nearest the new holes first.

    A target is a retained text token (not a marker, not protected) whose brightness is below `threshold` and
    above the cull line (the brightest token evicted), within `radius` positions of an evicted token; at most
    `limit`, nearest first, ties by position. Slots are those of `cache.token_view()`.
    """
    view = cache.token_view()
    n = view.n_valid
    holes = torch.cat([e.positions for e in evictions]) if evictions else torch.empty(0, dtype=torch.int64)
    if holes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=cache.device)
    cull_line = torch.cat([e.brightness for e in evictions]).max()
    positions, brightness = view.positions[:n], view.brightness[:n]
    eligible = (brightness < threshold) & (brightness > cull_line) & ~view.protected[:n]
    eligible &= view.sources[:n] != cache.config.source_code("marker")
    distance = (positions[:, None] - holes[None, :]).abs().min(dim=1).values
    eligible &= distance <= radius
    key = torch.where(eligible, distance, torch.iinfo(torch.int64).max)
    order = torch.sort(positions, stable=True).indices
    ranked = order[torch.sort(key[order], stable=True).indices]
    return ranked[: min(limit, int(eligible.sum()))]


class RepairScheduler:
    """Repair passes and pending KV patches of one session.

    Args:
        repairer: the backend (`Repairer`), or None when repair is off (diffs may still be applied by hand).
        config: the session's HaloConfig (targeting: repair_threshold, repair_radius, repairs_per_step,
            repair_window; repair_overlap).
        vocab_size: the host vocabulary size (new token ids must be below it).

    Attributes:
        pending: positions whose mirror token changed and whose K/V the next forward must recompute (in order).
        in_flight: repair passes launched and not collected yet.
        seconds: time spent choosing targets, building windows, repairing and collecting.
    """

    def __init__(self, repairer, config, vocab_size: int):
        self.repairer = repairer
        self.config = config
        self.vocab_size = vocab_size
        self.pending: list[int] = []
        self.in_flight: list[RepairJob] = []
        self.seconds = 0.0
        self._side_stream = None
        self._reset_count = None  # the cache reset they belong to

    def overlaps(self, device: torch.device) -> bool:
        """Whether repair runs one step behind decoding (HaloConfig.repair_overlap; None means on CUDA)."""
        overlap = self.config.repair_overlap
        return device.type == "cuda" if overlap is None else overlap

    def forget_if_reset(self, cache) -> None:
        """Drop pending patches and jobs of an earlier conversation (the cache was reset since)."""
        if self._reset_count != cache.reset_count:
            self.pending, self.in_flight, self._reset_count = [], [], cache.reset_count

    # ------------------------------------------------------------------ patches
    def patch_slots(self, cache) -> torch.Tensor | None:
        """int64 [k] slots (of `cache.token_view()`) of the pending patches still retained (the others are
        dropped), or None."""
        self.forget_if_reset(cache)
        if not self.pending:
            return None
        slot_of = cache.token_view().slot_of_position()
        self.pending = [p for p in self.pending if p in slot_of]
        if not self.pending:
            return None
        return torch.tensor([slot_of[p] for p in self.pending], dtype=torch.int64, device=cache.device)

    def patches_done(self) -> None:
        """The forward that carried the pending patches has committed: nothing is pending any more."""
        self.pending = []

    # ------------------------------------------------------------------- diffs
    def accept(self, cache, diffs: list[Diff], *, strict: bool) -> list[Diff]:
        """Validate `diffs`, apply them to the mirror and journal, and queue their K/V patches.

        strict: raise ValueError on the first bad diff (nothing applied); otherwise skip the diffs that no
        longer fit (target evicted or changed since the repair began). Returns the diffs applied.
        """
        if not diffs:
            return []
        self.forget_if_reset(cache)
        view = cache.token_view()
        n = view.n_valid
        slot_of = view.slot_of_position()
        current, sources = view.token_ids[:n].tolist(), view.sources[:n].tolist()
        marker = cache.config.source_code("marker")
        slots, applied = [], []
        for index, diff in enumerate(diffs):
            try:
                if len(diff) != 3:
                    raise ValueError(f"diff {index}: expected (position, old_token_id, new_token_id), got {diff!r}")
                position, old, new = (int(v) for v in diff)
                slot = slot_of.get(position)
                if slot is None or sources[slot] == marker:
                    raise ValueError(f"diff {index}: position {position} is not a retained text token")
                if current[slot] != old:
                    raise ValueError(f"diff {index}: position {position} holds token {current[slot]}, not {old}")
                if not 0 <= new < self.vocab_size:
                    raise ValueError(f"diff {index}: new token id {new} out of range [0, {self.vocab_size})")
                if any(position == p for p, _, _ in applied):
                    raise ValueError(f"diff {index}: position {position} appears twice")
            except ValueError:
                if strict:
                    raise
                continue
            slots.append(slot)
            applied.append((position, old, new))
        if applied:
            cache.replace_tokens(torch.tensor(slots, device=cache.device),
                                 torch.tensor([d[2] for d in applied], dtype=torch.int64))
            self.pending.extend(p for p, _, _ in applied if p not in self.pending)
        return applied

    # ------------------------------------------------------------------- passes
    def targets(self, cache, evictions: list[Eviction]) -> torch.Tensor:
        """int64 [k] slots to repair after `evictions`, with the config's targeting (see `repair_targets`)."""
        cfg = self.config
        return repair_targets(cache, evictions, threshold=cfg.repair_threshold, radius=cfg.repair_radius,
                              limit=cfg.repairs_per_step)

    def after_cull(self, cache, evictions: list[Eviction]) -> list[Diff]:
        """Re-predict the targets near `evictions` in one batched pass; returns the diffs applied now.

        Without overlap the diffs reach the mirror at once. With overlap the pass is launched (on CUDA on a side
        stream, after the windows are built on the main stream) and `collect` applies its diffs later.
        """
        t0 = time.perf_counter()
        cfg = self.config
        applied: list[Diff] = []
        targets = self.targets(cache, evictions)
        if targets.numel():
            view = cache.token_view()
            windows = build_windows(view.token_ids, view.positions, view.brightness, view.n_valid, targets,
                                    cfg.repair_window)
            batch = RepairBatch.from_windows(windows, validate=False)  # targets are retained slots
            if self.overlaps(cache.device):
                self.in_flight.append(self.launch(batch, cache))
            else:
                with torch.inference_mode():
                    diffs = self.repairer.repair_batch(batch)
                applied = self.accept(cache, diffs, strict=True)
        self.seconds += time.perf_counter() - t0
        return applied

    def launch(self, batch: RepairBatch, cache) -> RepairJob:
        """Start `suggest` for `batch` (the caller adds the job to `in_flight`): on CUDA on the side stream, fenced
        by an event; elsewhere right now."""
        device = cache.device
        if device.type != "cuda":
            with torch.inference_mode():
                return RepairJob(batch, self.repairer.suggest(batch), None, cache.steps)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=device)
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            suggestions = self.repairer.suggest(batch)
        for tensor in (*batch.__dict__.values(), *suggestions.__dict__.values()):
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                tensor.record_stream(side)
        done = torch.cuda.Event()
        done.record(side)
        return RepairJob(batch, suggestions, done, cache.steps)

    def collect(self, cache, *, wait: bool) -> list[Diff]:
        """Apply the diffs of finished jobs (launched before the current step; `wait`: all), stale ones dropped."""
        self.forget_if_reset(cache)
        if not self.in_flight:
            return []
        t0 = time.perf_counter()
        applied: list[Diff] = []
        for job in [job for job in self.in_flight if wait or job.step < cache.steps]:
            if job.done is not None:
                torch.cuda.current_stream(cache.device).wait_event(job.done)
            applied += self.accept(cache, self.repairer.diffs(job.batch, job.suggestions), strict=False)
            self.in_flight.remove(job)
        self.seconds += time.perf_counter() - t0
        return applied
