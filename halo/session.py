"""Session: a conversation of unbounded length on a fixed-budget HaloCache.

Text goes in with `feed(text, source)`, replies come out of `generate`, and after every forward the cache is
back at its budget: brightness updated, the dimmest tokens culled (log/tool lines whole, their runs replaced by
one elision marker), the survivors compacted in place, the dead written to the journal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .cache import HaloCache
from .config import HaloConfig
from .policy import CullPolicy
from .units import plan_markers, tokenize_lines

_SETTLE_ROUNDS = 64


@dataclass
class MemorySnapshot:
    """The retained tokens sorted by position (ties by birth). Tensors are on the CPU.

    Attributes:
        positions: int64 [n] absolute positions; token_ids: int64 [n]; brightness: float32 [n];
        sources: source name per token; units: int64 [n] line-unit id (-1 for plain tokens).
    """

    positions: torch.Tensor
    token_ids: torch.Tensor
    brightness: torch.Tensor
    sources: list[str]
    units: torch.Tensor

    def __len__(self) -> int:
        return int(self.positions.numel())


class Session:
    """One conversation with a model under a fixed KV budget.

    Args:
        model: a transformers causal LM (Llama family); it is switched to the `halo` attention function.
        tokenizer: its tokenizer.
        config: HaloConfig (default HaloConfig()).
        policy: cull policy (default HaloPolicy).
        repairer: a `halo.repair.Repairer` to use instead of the one `config.repair` names.
    """

    def __init__(self, model, tokenizer, config: HaloConfig | None = None, *, policy: CullPolicy | None = None,
                 repairer=None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or HaloConfig()
        self.cache = HaloCache(model, self.config, policy=policy)
        self.cache.closes_in_attention = False  # _forward closes it, so an interrupted forward can be dropped
        self.device = self.cache.device
        self.vocab_size = int(model.config.vocab_size)
        self.diffs: list[tuple[int, int, int]] = []
        self.model_seconds = 0.0
        self.repair_seconds = 0.0
        self._repairer = repairer
        self.pinned_tokens = 0
        self._last_logits: torch.Tensor | None = None
        self._patches: dict[int, int] = {}  # position -> slot whose K/V the next forward recomputes
        self._patch_layout = 0  # cache.layout_version the slots of _patches refer to
        self._conversation = self.cache.conversation  # cache.conversation they belong to
        self._in_flight: list[_RepairJob] = []
        self._side_stream = None
        self._marker_ids = tokenizer(self.config.marker_text, add_special_tokens=False)["input_ids"]
        if not self._marker_ids:
            raise ValueError(f"marker_text {self.config.marker_text!r} tokenises to nothing")

    # ------------------------------------------------------------- reading
    @property
    def journal(self):
        """The journal of evicted tokens (list-like of JournalEntry)."""
        return self.cache.journal

    def memory(self) -> MemorySnapshot:
        """The retained tokens in position order."""
        snap = self.cache.snapshot()
        names = self.config.source_names
        return MemorySnapshot(snap["positions"], snap["token_ids"], snap["brightness"],
                              [names[c] for c in snap["sources"].tolist()], snap["units"])

    def memory_text(self) -> str:
        """The remembered text, in position order, elision markers included."""
        ids = [t for t in self.cache.snapshot()["token_ids"].tolist() if t >= 0]
        return self.tokenizer.decode(ids)

    def stats(self) -> dict:
        """Counters and timings of the session so far."""
        snap_sources = self.cache.sources[: self.cache.n_valid]
        return {
            "tokens_fed": self.cache.seen,
            "retained": self.cache.n_valid,
            "budget": self.config.budget,
            "evicted": len(self.cache.journal.evicted),
            "markers": int((snap_sources == self.config.source_code("marker")).sum()),
            "repairs": len(self.diffs),
            "steps": self.cache.steps,
            "halo_seconds": self.cache.halo_seconds,
            "model_seconds": self.model_seconds,
            "repair_seconds": self.repair_seconds,
        }

    # ------------------------------------------------------------- feeding
    def feed(self, text: str, source: str = "user") -> int:
        """Stream `text` into the cache as `source`; returns the number of tokens fed.

        Log and tool text (HaloConfig.unit_sources) is split into line units. Raises ValueError (state
        untouched) on empty text, an unknown source, or pinned text that would not fit the budget.
        """
        if not isinstance(text, str):
            raise TypeError(f"feed() takes text as str, got {type(text).__name__}")
        if not text:
            raise ValueError("feed() got empty text")
        self.config.source_code(source)
        first = self.cache.seen == 0
        if source in self.config.unit_sources:
            ids, lines = tokenize_lines(self.tokenizer, text, add_special_tokens=first)
        else:
            ids, lines = self.tokenizer(text, add_special_tokens=first)["input_ids"], None
        if not ids:
            raise ValueError(f"feed() text {text[:40]!r} tokenises to nothing")
        token_ids = torch.tensor(ids, dtype=torch.int64)
        units = None
        if lines is not None:
            fresh = self.cache.new_unit_ids(max(lines) + 1)
            units = fresh[torch.tensor(lines)]
        return self._feed(token_ids, source, units)

    def feed_ids(self, token_ids: torch.Tensor, source: str = "user") -> int:
        """Stream already-tokenised ids (int64 [T] on the CPU or the model's device) as `source`."""
        if not isinstance(token_ids, torch.Tensor):
            raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
        if token_ids.dim() != 1 or token_ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D tensor, got shape {tuple(token_ids.shape)}")
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token_ids must be int64 (or int32), got {token_ids.dtype}")
        if token_ids.device.type not in ("cpu", self.device.type):
            raise ValueError(f"token_ids are on device {token_ids.device}; the model is on {self.device}")
        low, high = int(token_ids.min()), int(token_ids.max())
        if low < 0 or high >= self.vocab_size:
            raise ValueError(f"token id out of range [0, {self.vocab_size}): got min {low}, max {high}")
        self.config.source_code(source)
        return self._feed(token_ids.to(torch.int64), source, None)

    def _feed(self, token_ids: torch.Tensor, source: str, units: torch.Tensor | None) -> int:
        total = int(token_ids.numel())
        if self.config.sources[source].pinned:
            protected = self.pinned_tokens + total + self.config.sink_tokens + self.config.recent_tokens
            if protected > self.config.budget:
                raise ValueError(
                    f"budget ({self.config.budget}) is below the protected set this would make: {self.pinned_tokens} "
                    f"pinned + {total} new pinned '{source}' tokens + {self.config.sink_tokens} sinks + "
                    f"{self.config.recent_tokens} recent"
                )
            self.pinned_tokens += total
        chunk = self.config.chunk_size
        for start in range(0, total, chunk):
            part_units = None if units is None else units[start:start + chunk]
            self._step(token_ids[start:start + chunk], source, part_units)
        return total

    def _step(self, token_ids: torch.Tensor, source: str, units=None) -> torch.Tensor:
        """One forward of up to chunk_size new tokens; returns the logits [V] of the last one.

        Pending repair patches ride along as extra rows of this forward (their K/V are recomputed in place).
        """
        cache = self.cache
        self._collect_repairs(wait=False)
        ids = token_ids.to(self.device)
        t_rows = ids.numel()
        positions = torch.arange(cache.seen, cache.seen + t_rows, device=self.device)
        patches = self._patch_slots()
        cache.stage(ids, source, units, patch_slots=patches)
        keep = 1
        if patches is not None:
            ids = torch.cat([ids, cache.token_ids[patches]])
            positions = torch.cat([positions, cache.positions[patches]])
            keep = torch.tensor([t_rows - 1], device=self.device)
        self._last_logits = self._forward(ids, positions, keep)[0, -1]
        self._patches = {}  # recomputed by that forward (an interrupted one leaves them pending)
        self._settle()
        if cache.step_evicted and (self._repairer is not None or self.config.repair):
            self._repair_holes()
        return self._last_logits

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, logits_to_keep=1) -> torch.Tensor:
        cache = self.cache
        halo_before = cache.halo_seconds
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                out = self.model(input_ids=ids[None], position_ids=positions[None], past_key_values=cache,
                                 use_cache=True, logits_to_keep=logits_to_keep)
        except BaseException:
            cache.abort_forward()  # e.g. KeyboardInterrupt mid-forward: the step never happened
            raise
        cache.finish_forward()
        self.model_seconds += time.perf_counter() - t0 - (cache.halo_seconds - halo_before)
        return out.logits

    # ------------------------------------------------------------- markers
    def _settle(self) -> None:
        """After a forward: replace culled line runs by markers, cull again, until at budget."""
        cache = self.cache
        if not cache.culled_units and cache.n_valid <= self.config.budget:
            return
        marker = self.config.source_code("marker")
        cache.protect_markers_from = cache.next_serial
        try:
            for _ in range(_SETTLE_ROUNDS):
                if cache.culled_units:
                    culled, cache.culled_units = cache.culled_units, []
                    snap = cache.snapshot()
                    evict, place = plan_markers(snap["positions"].tolist(), snap["sources"].tolist(),
                                                snap["units"].tolist(), culled, marker)
                    cache.evict_units(evict)
                    if place:
                        try:
                            self._place_markers(place)
                        except BaseException:  # the runs stay to be marked (unit -1: no marker of their own)
                            cache.culled_units = [(-1, start, end) for start, end in place] + cache.culled_units
                            raise
                if cache.n_valid <= self.config.budget and not cache.culled_units:
                    return
                cache.cull()
            raise RuntimeError("elision markers did not settle within the budget; raise the budget or lower chunk_size")
        finally:
            cache.protect_markers_from = None

    def _place_markers(self, runs: list[tuple[int, int]]) -> None:
        """Compute and insert one marker per run, each at its run's first position, seeing only what precedes it."""
        cache = self.cache
        m = len(self._marker_ids)
        n = cache.n_valid
        t_rows = m * len(runs)
        ids = torch.tensor(self._marker_ids * len(runs), dtype=torch.int64, device=self.device)
        offsets = torch.arange(m, device=self.device)
        positions = torch.cat([start + offsets.clamp(max=end - start) for start, end in runs])
        starts = torch.tensor([start for start, _ in runs], device=self.device).repeat_interleave(m)
        visible = torch.zeros(t_rows, n + t_rows, dtype=torch.bool, device=self.device)
        visible[:, :n] = cache.positions[:n][None, :] < starts[:, None]
        block = torch.tril(torch.ones(m, m, dtype=torch.bool, device=self.device))
        visible[:, n:] = torch.block_diag(*[block] * len(runs))
        units = cache.new_unit_ids(len(runs)).repeat_interleave(m)
        cache.stage(ids, "marker", units, positions=positions, visible=visible)
        self._forward(ids, positions)

    # ------------------------------------------------------------- repair
    @property
    def repairer(self):
        """The repair backend (built on first use from `config.repair`), or None when repair is off."""
        if self._repairer is None and self.config.repair:
            from .repair import MaskedLMRepairer, SelfRepairer

            common = {"repair_threshold": self.config.repair_threshold}
            if self.config.repair == "self":
                self._repairer = SelfRepairer(self.model, self.tokenizer, **common)
            else:
                self._repairer = MaskedLMRepairer(self.config.repair, host_tokenizer=self.tokenizer,
                                                  device=self.device, **common)
        return self._repairer

    def repair_targets(self) -> torch.Tensor:
        """int64 [k] slots to repair after this step's culls: dim but alive, nearest the new holes first.

        A target is a retained text token (not a marker, not protected) whose brightness is below
        `repair_threshold` and above the cull line (the brightest token culled this step), within
        `repair_radius` positions of a token culled this step; at most `repairs_per_step`, nearest first,
        ties by position.
        """
        cache, cfg = self.cache, self.config
        n = cache.n_valid
        holes = torch.cat([p for p, _ in cache.step_evicted])
        cull_line = torch.cat([b for _, b in cache.step_evicted]).max()
        positions = cache.positions[:n]
        brightness = cache.brightness[:n]
        eligible = (brightness < cfg.repair_threshold) & (brightness > cull_line) & ~cache.protected_mask()
        eligible &= cache.sources[:n] != cfg.source_code("marker")
        distance = (positions[:, None] - holes[None, :]).abs().min(dim=1).values
        eligible &= distance <= cfg.repair_radius
        key = torch.where(eligible, distance, torch.iinfo(torch.int64).max)
        order = torch.sort(positions, stable=True).indices
        ranked = order[torch.sort(key[order], stable=True).indices]
        count = min(cfg.repairs_per_step, int(eligible.sum()))
        return ranked[:count]

    @property
    def repair_overlap(self) -> bool:
        """Whether repair runs one step behind decoding (HaloConfig.repair_overlap; None means on CUDA)."""
        overlap = self.config.repair_overlap
        return self.device.type == "cuda" if overlap is None else overlap

    def _repair_holes(self) -> None:
        """Re-predict the targets near this step's holes in one batched pass.

        Without overlap the diffs reach the mirror at once and their K/V ride along with the next forward.
        With overlap the pass is launched (on CUDA on a side stream, after the windows are built on the main
        stream) and collected at the boundary after the next step.
        """
        from .repair import RepairBatch, build_windows

        t0 = time.perf_counter()
        targets = self.repair_targets()
        if targets.numel():
            cache = self.cache
            windows = build_windows(cache.token_ids, cache.positions, cache.brightness, cache.n_valid, targets,
                                    self.config.repair_window)
            batch = RepairBatch.from_windows(windows, validate=False)  # targets are retained slots
            if self.repair_overlap:
                self._in_flight.append(self._launch(batch))
            else:
                with torch.inference_mode():
                    diffs = self.repairer.repair_batch(batch)
                self._accept_diffs(diffs, strict=True)
        self.repair_seconds += time.perf_counter() - t0

    def _launch(self, batch) -> "_RepairJob":
        """Start `suggest` for `batch`: on CUDA on the side stream, fenced by events; elsewhere right now."""
        step = self.cache.steps
        if self.device.type != "cuda":
            with torch.inference_mode():
                return _RepairJob(batch, self.repairer.suggest(batch), None, step)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=self.device)
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode():
            suggestions = self.repairer.suggest(batch)
        for tensor in (*batch.__dict__.values(), *suggestions.__dict__.values()):
            if isinstance(tensor, torch.Tensor) and tensor.is_cuda:
                tensor.record_stream(side)
        done = torch.cuda.Event()
        done.record(side)
        return _RepairJob(batch, suggestions, done, step)

    def _collect_repairs(self, wait: bool) -> None:
        """Turn finished repair jobs into diffs (stale ones dropped); `wait` also takes the youngest."""
        self._forget_other_conversation()
        if not self._in_flight:
            return
        t0 = time.perf_counter()
        for job in [job for job in self._in_flight if wait or job.step < self.cache.steps]:
            if job.done is not None:
                torch.cuda.current_stream(self.device).wait_event(job.done)
            self._accept_diffs(self.repairer.diffs(job.batch, job.suggestions), strict=False)
            self._in_flight.remove(job)
        self.repair_seconds += time.perf_counter() - t0

    def flush_repairs(self) -> int:
        """Finish every repair now: collect the jobs in flight and recompute pending K/V in one service forward.

        Returns the number of slots patched. `save` calls this; call it before reading the cache's K/V
        between steps when repair is on.
        """
        self._collect_repairs(wait=True)
        patches = self._patch_slots()
        if patches is None:
            return 0
        self.cache.stage(patches[:0], self.config.source_names[0], patch_slots=patches)
        self._forward(self.cache.token_ids[patches], self.cache.positions[patches])
        self._patches = {}
        return patches.numel()

    def _pending_patches(self) -> dict[int, int]:
        """position -> slot of the pending patches, re-found by position if the cache was compacted since."""
        cache = self.cache
        self._forget_other_conversation()
        if self._patches and self._patch_layout != cache.layout_version:
            slot_of = self._slot_of_position()
            self._patches = {p: slot_of[p] for p in self._patches if p in slot_of}
        self._patch_layout = cache.layout_version
        return self._patches

    def _forget_other_conversation(self) -> None:
        """Drop pending patches and repair jobs of an earlier conversation (the cache was reset since)."""
        if self._conversation != self.cache.conversation:
            self._patches, self._in_flight, self._conversation = {}, [], self.cache.conversation

    def _patch_slots(self) -> torch.Tensor | None:
        """int64 [k] slots of the pending patches, for the next forward to recompute, or None."""
        pending = self._pending_patches()
        if not pending:
            return None
        return torch.tensor(list(pending.values()), dtype=torch.int64, device=self.device)

    def _slot_of_position(self) -> dict[int, int]:
        """position -> slot of every retained token (one host read of the positions)."""
        return {p: i for i, p in enumerate(self.cache.positions[: self.cache.n_valid].tolist())}

    def apply_diffs(self, diffs: list[tuple[int, int, int]], *, defer: bool = False) -> int:
        """Apply repair diffs `(position, old_token_id, new_token_id)` to the mirror and the KV cache.

        The mirror changes at once. Each new token's K/V are recomputed at its original position against the
        retained tokens before it (earlier patches included) and written into the token's slot in place;
        brightness, source and unit stay. With `defer=False` that happens now, in one service forward; with
        `defer=True` the patches ride along as extra rows of the next forward (`feed`/`generate`), which
        costs far less than a forward of their own; `flush_repairs()` forces them. The old token goes to the
        journal as a "replaced" entry and the diff to `Session.diffs`. Validates every diff first (retained
        position, matching old token, id in range, no duplicates) and applies nothing on error. Returns the
        number applied.
        """
        applied = self._accept_diffs(diffs, strict=True)
        if applied and not defer:
            self.flush_repairs()
        return applied

    def _accept_diffs(self, diffs: list[tuple[int, int, int]], strict: bool) -> int:
        """Validate `diffs` and apply them to the mirror and journal; their slots join the pending patches.

        strict: raise ValueError on the first bad diff (nothing applied); otherwise skip the diffs that no
        longer fit (target evicted or changed since the repair began). Returns the number accepted.
        """
        if not diffs:
            return 0
        cache = self.cache
        n = cache.n_valid
        slot_of = self._slot_of_position()
        current = cache.token_ids[:n].tolist()
        sources = cache.sources[:n].tolist()
        marker = self.config.source_code("marker")
        slots, new_ids, positions, olds = [], [], [], []
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
                if position in positions:
                    raise ValueError(f"diff {index}: position {position} appears twice")
            except ValueError:
                if strict:
                    raise
                continue
            slots.append(slot)
            new_ids.append(new)
            positions.append(position)
            olds.append(old)
        if not slots:
            return 0
        slot_t = torch.tensor(slots, device=self.device)
        pos = torch.tensor(positions, dtype=torch.int64, device=self.device)
        cache.journal.record(pos, cache.token_ids[slot_t], cache.sources[slot_t], cache.brightness[slot_t],
                             cache.steps, kind="replaced")
        cache.token_ids[slot_t] = torch.tensor(new_ids, dtype=torch.int64, device=self.device)
        self._pending_patches().update(zip(positions, slots))
        self.diffs.extend(zip(positions, olds, new_ids))
        return len(slots)

    # ----------------------------------------------------------- generating
    def generate(self, max_new_tokens: int = 64, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_on_eos: bool = True,
                 source: str = "assistant", on_token=None) -> str:
        """Continue the conversation; returns the generated text (greedy unless temperature > 0).

        Args:
            max_new_tokens: most tokens to generate (>= 0).
            temperature, top_k, top_p: sampling controls; temperature 0 is greedy.
            seed: seeds the sampler for reproducible sampling.
            stop_on_eos: stop at the tokenizer's or model's end-of-sequence token (not fed to the cache).
            source: source name of the generated tokens.
            on_token: optional callback receiving each new token id as it is produced (for streaming).
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
            raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")
        self.config.source_code(source)
        if self._last_logits is None:
            raise ValueError("generate() needs context: feed() some text first")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        eos = self._eos_ids() if stop_on_eos else set()
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = _sample(self._last_logits, temperature, top_k, top_p, generator)
            token_id = int(token)
            if token_id in eos:
                break
            out.append(token_id)
            if on_token is not None:
                on_token(token_id)
            self._step(token.view(1), source)
        return self.tokenizer.decode(out)

    def _eos_ids(self) -> set[int]:
        ids = set()
        for value in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids


    # ------------------------------------------------------ persistence and views
    def save(self, path, *, extra: dict | None = None):
        """Write the compacted memory to one file, atomically (see halo.persist); repairs are flushed first."""
        from .persist import save_session

        return save_session(self, path, extra=extra)

    @classmethod
    def load(cls, path, model, tokenizer, **kwargs) -> "Session":
        """A session restored from `save`; ValueError on a damaged file or a different model (see halo.persist)."""
        from .persist import load_session

        return load_session(path, model, tokenizer, **kwargs)

    def render_html(self, path, **kwargs):
        """Write a self-contained HTML page of the memory coloured by brightness, and the journal (halo.render)."""
        from .render import write_html

        return write_html(self, path, **kwargs)


@dataclass(eq=False)  # identity: jobs hold tensors
class _RepairJob:
    """A repair pass in flight: its batch, the suggestions it will hold, the event that fences them."""

    batch: object  # RepairBatch
    suggestions: object  # Suggestions
    done: object  # torch.cuda.Event, or None when computed synchronously
    step: int  # cache.steps when launched


def _sample(logits: torch.Tensor, temperature: float, top_k, top_p, generator) -> torch.Tensor:
    """int64 scalar tensor: the next token from logits [V]."""
    if temperature == 0:
        return torch.argmax(logits)
    scores = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_scores, -1) > top_p
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator)[0]
