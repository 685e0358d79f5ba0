"""Session: a conversation of unbounded length on a fixed-budget HaloCache.

Text goes in with `feed(text, source)`, replies come out of `generate`, and after every forward the cache is
back at its budget: brightness updated, the dimmest tokens culled (log/tool lines whole, their runs replaced by
one elision marker), the survivors compacted in place, the dead written to the journal. The session conducts;
the parts do the work: the cache (`halo.cache`), the markers (`halo.markers`), repair scheduling
(`halo.repair.scheduler`), sampling (`halo.sampling`) and persistence (`halo.persist`).
"""

from __future__ import annotations

import time

import torch

from . import persist
from .cache import HaloCache
from .config import HaloConfig
from .forward import ForwardSpec, StepResult, stream_spec
from .inputs import check_pinned_fits, check_token_ids
from .markers import ElisionMarkers
from .memory import MemorySnapshot
from .policy import CullPolicy
from .repair import load_repairer
from .repair.scheduler import RepairScheduler
from .sampling import check_sampling, eos_ids, sample
from .units import WordState, WordTracker, tokenize_lines


class Session:
    """One conversation with a model under a fixed KV budget.

    Args:
        model: a transformers causal LM (Llama family); it is switched to the `halo` attention function.
        tokenizer: its tokenizer.
        config: HaloConfig (default HaloConfig()).
        policy: cull policy (default HaloPolicy).
        repairer: a `halo.repair.Repairer` to use instead of the one `config.repair` names.

    Attributes:
        cache, markers (ElisionMarkers), repairs (RepairScheduler), diffs (applied repairs), journal.
    """

    def __init__(self, model, tokenizer, config: HaloConfig | None = None, *, policy: CullPolicy | None = None,
                 repairer=None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or HaloConfig()
        self.cache = HaloCache(model, self.config, policy=policy)
        self.device = self.cache.device
        self.vocab_size = int(model.config.vocab_size)
        self.markers = ElisionMarkers(tokenizer, self.config.marker_text, self.config.source_code("marker"))
        if repairer is None and self.config.repair:  # load now: a bad repair model fails before anything is fed
            repairer = load_repairer(self.config.repair, model, tokenizer, device=self.device,
                                     repair_threshold=self.config.repair_threshold)
        self.repairs = RepairScheduler(repairer, self.config, self.vocab_size)
        self.diffs: list[tuple[int, int, int]] = []
        self.model_seconds = 0.0
        self.pinned_tokens = 0
        self.extra: dict = {}
        self.last_step: StepResult | None = None  # the last stream step, its markers' settle included
        keeps_words = self.config.word_units and self.cache.policy.keeps_words
        self.words = WordTracker(tokenizer, self.vocab_size) if keeps_words else None  # word units, or None
        self._last_logits: torch.Tensor | None = None

    # ------------------------------------------------------------- reading
    @property
    def journal(self):
        """The journal of evicted and replaced tokens (list-like of JournalEntry)."""
        return self.cache.journal

    @property
    def last_logits(self) -> torch.Tensor | None:
        """float [V] logits of the last fed or generated token (what `generate` samples from next), or None."""
        return self._last_logits

    def memory(self) -> MemorySnapshot:
        """The retained tokens in position order."""
        return MemorySnapshot.of(self.cache)

    def memory_text(self) -> str:
        """The remembered text, in position order, elision markers included."""
        return self.tokenizer.decode([t for t in self.cache.snapshot()["token_ids"].tolist() if t >= 0])

    def stats(self) -> dict:
        """Counters and timings of the session so far (O(1) per call, amortised)."""
        cache = self.cache
        return {
            "tokens_fed": cache.seen,
            "retained": cache.n_valid,
            "budget": self.config.budget,
            "evicted": cache.journal.count("evicted"),
            "markers": int((cache.sources[: cache.n_valid] == self.markers.source_code).sum()),
            "repairs": len(self.diffs),
            "steps": cache.steps,
            "halo_seconds": cache.halo_seconds,
            "model_seconds": self.model_seconds,
            "repair_seconds": self.repairs.seconds,
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
        check_pinned_fits(self.config, self.pinned_tokens, source, len(ids))
        units = None if lines is None else self.cache.new_unit_ids(max(lines) + 1)[torch.tensor(lines)]
        return self._feed(torch.tensor(ids, dtype=torch.int64), source, units)

    def feed_ids(self, token_ids: torch.Tensor, source: str = "user") -> int:
        """Stream already-tokenised ids (int64 [T] on the CPU or the model's device) as `source`."""
        check_token_ids(token_ids, self.vocab_size, self.device)
        self.config.source_code(source)
        check_pinned_fits(self.config, self.pinned_tokens, source, token_ids.numel())
        return self._feed(token_ids.to(torch.int64), source, None)

    def _feed(self, token_ids: torch.Tensor, source: str, units: torch.Tensor | None) -> int:
        total = int(token_ids.numel())
        if self.config.sources[source].pinned:
            self.pinned_tokens += total
        chunk = self.config.chunk_size
        for start in range(0, total, chunk):
            self.step(token_ids[start:start + chunk], source, None if units is None else units[start:start + chunk])
        if units is not None and self.words is not None:
            self.words.state = WordState()  # a line unit ends any word
        return total

    def step(self, token_ids: torch.Tensor, source: str = "user", units: torch.Tensor | None = None) -> torch.Tensor:
        """One stream forward of up to chunk_size new tokens (int64 [T]); returns the logits [V] of the last one.

        Pending repair patches ride along as extra rows; after the forward the cache is culled to budget, culled
        line runs are marked, and, with repair on, the tokens near the new holes are repaired. Without `units`,
        text of a source that is not split into lines is split into words (HaloConfig.word_units).
        """
        cache, word_before = self.cache, self.words and self.words.state
        if units is None and self.words is not None and source not in self.config.unit_sources:
            units = self.words.units(token_ids, cache.new_unit_ids)
        self.diffs += self.repairs.collect(cache, wait=False)
        spec = stream_spec(cache, token_ids, source, units, self.repairs.patch_slots(cache))
        keep = 1 if spec.patch_slots is None else torch.tensor([spec.new_rows - 1], device=self.device)
        try:
            logits, result = self._run(spec, keep)
        except BaseException:  # the step never happened: the stream is still in the word it was in
            if self.words is not None:
                self.words.state = word_before
            raise
        self._last_logits = logits[0, -1]
        self.repairs.patches_done()
        result.extend(self.markers.settle(cache, result.culled_runs, self._run))
        self.last_step = result
        if result.evictions and self.repairs.repairer is not None:
            self.diffs += self.repairs.after_cull(cache, result.evictions)
        return self._last_logits

    def _run(self, spec: ForwardSpec, logits_to_keep=1) -> tuple[torch.Tensor, StepResult]:
        """Run the model over `spec` through the cache; returns (logits, StepResult)."""
        halo_before = self.cache.halo_seconds
        t0 = time.perf_counter()

        def forward():
            with torch.inference_mode():
                return self.model(input_ids=spec.input_ids[None], position_ids=spec.position_ids[None],
                                  past_key_values=self.cache, use_cache=True, logits_to_keep=logits_to_keep).logits

        out = self.cache.run(spec, forward)
        self.model_seconds += time.perf_counter() - t0 - (self.cache.halo_seconds - halo_before)
        return out

    # ------------------------------------------------------------- repair
    @property
    def repairer(self):
        """The repair backend (`config.repair`'s, loaded when the session starts, or the one given), or None."""
        return self.repairs.repairer

    @property
    def repair_overlap(self) -> bool:
        """Whether repair runs one step behind decoding (HaloConfig.repair_overlap; None means on CUDA)."""
        return self.repairs.overlaps(self.device)

    def repair_targets(self, evictions=None) -> torch.Tensor:
        """int64 [k] slots to repair after `evictions` (default: the last step's; see repair_targets)."""
        if evictions is None:
            evictions = self.last_step.evictions if self.last_step is not None else []
        return self.repairs.targets(self.cache, evictions)

    def flush_repairs(self) -> int:
        """Finish every repair now: collect the jobs in flight and recompute pending K/V in one service forward.

        Returns the number of slots patched. `save` calls this; call it before reading the cache's K/V
        between steps when repair is on.
        """
        self.diffs += self.repairs.collect(self.cache, wait=True)
        patches = self.repairs.patch_slots(self.cache)
        if patches is None:
            return 0
        self._run(stream_spec(self.cache, patches[:0], self.config.source_names[0], patch_slots=patches))
        self.repairs.patches_done()
        return patches.numel()

    def apply_diffs(self, diffs: list[tuple[int, int, int]], *, defer: bool = False) -> int:
        """Apply repair diffs `(position, old_token_id, new_token_id)` to the mirror and the KV cache.

        The mirror changes at once (old tokens go to the journal as "replaced", diffs to `diffs`). Each new
        token's K/V are recomputed at its position against the retained tokens before it and written into its
        slot: now, in one service forward, or with `defer=True` as extra rows of the next forward (cheaper;
        `flush_repairs()` forces them). Every diff is validated first (retained position, matching old token,
        id in range, no duplicates); on error nothing is applied. Returns the number applied.
        """
        applied = self.repairs.accept(self.cache, diffs, strict=True)
        self.diffs += applied
        if applied and not defer:
            self.flush_repairs()
        return len(applied)

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
        check_sampling(temperature, top_k, top_p)
        self.config.source_code(source)
        if self._last_logits is None:
            raise ValueError("generate() needs context: feed() some text first")
        generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
        eos = eos_ids(self.tokenizer, self.model) if stop_on_eos else set()
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = sample(self._last_logits, temperature, top_k, top_p, generator)
            token_id = int(token)
            if token_id in eos:
                break
            out.append(token_id)
            if on_token is not None:
                on_token(token_id)
            self.step(token.view(1), source)
        return self.tokenizer.decode(out)

    # ------------------------------------------------------ persistence and views
    def state_dict(self) -> dict:
        """Everything needed to continue: the cache (journal included), the session's counters and diffs."""
        if self.markers.pending_runs:
            raise RuntimeError("cannot save while culled lines wait for their elision marker; feed or generate first")
        self.flush_repairs()  # the saved K/V must match the mirror
        state = {"cache": self.cache.state_dict(),
                 "session": {"pinned_tokens": self.pinned_tokens, "model_seconds": self.model_seconds,
                             "marker_ids": list(self.markers.token_ids), "diffs": [list(map(int, d)) for d in self.diffs],
                             "extra": dict(self.extra),
                             "word_state": list(vars(self.words.state).values()) if self.words else None}}
        if self._last_logits is not None:
            state["last_logits"] = self._last_logits.detach().to("cpu").contiguous()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output into this fresh session; ValueError naming the first mismatch."""
        own = state["session"]
        if list(self.markers.token_ids) != list(own["marker_ids"]):
            raise ValueError("saved session belongs to a different tokenizer: the elision marker tokenises to "
                             f"{own['marker_ids']} in the file but {self.markers.token_ids} now")
        logits = state.get("last_logits")
        if logits is not None and tuple(logits.shape) != (self.vocab_size,):
            raise ValueError(f"saved last logits have shape {tuple(logits.shape)}, expected ({self.vocab_size},)")
        self.cache.load_state_dict(state["cache"])
        self.pinned_tokens = int(own["pinned_tokens"])
        self.model_seconds = float(own["model_seconds"])
        self.diffs = [tuple(int(x) for x in d) for d in own["diffs"]]
        self.extra = dict(own.get("extra") or {})
        if self.words is not None:  # files of format 1 have no word state
            self.words.state = WordState(*(own.get("word_state") or ()))
        self._last_logits = None if logits is None else logits.to(self.device)

    def save(self, path, *, extra: dict | None = None):
        """Write the compacted memory to one file, atomically (see halo.persist); repairs are flushed first.

        extra: optional JSON-able dict stored alongside (e.g. a chat front end's history); it becomes
        `session.extra` here and in the loaded session.
        """
        if extra is not None:
            self.extra = dict(extra)
        return persist.save(path, self.state_dict(), model=self.model, config=self.config)

    @classmethod
    def load(cls, path, model, tokenizer, *, policy: CullPolicy | None = None, check_name: bool = True) -> "Session":
        """A session restored from `save`; it continues exactly where the saved one stopped.

        Raises FileNotFoundError (no file) or ValueError (a damaged file, another model or tokenizer, another
        policy). `check_name=False` accepts a model whose name_or_path changed.
        """
        config, state = persist.load(path, model, check_name=check_name)
        session = cls(model, tokenizer, config, policy=policy)
        try:
            session.load_state_dict(state)
        except (KeyError, TypeError) as err:
            raise ValueError(f"{path}: session state is incomplete or malformed ({type(err).__name__}: {err})") from None
        return session

    def render_html(self, path, **kwargs):
        """Write a self-contained HTML page of the memory coloured by brightness, and the journal (halo.render)."""
        from .render import write_html

        return write_html(self, path, **kwargs)
