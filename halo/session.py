"""Session: a conversation of unbounded length on a fixed-budget HaloCache.

Text goes in with `feed(text, source)`, replies come out of `generate`, and after every forward the cache is
back at its budget: brightness updated, the dimmest tokens culled (log/tool lines whole, their runs replaced by
one elision marker), the survivors compacted in place, the dead written to the journal. The session conducts;
the parts do the work: the cache, its forwards (`halo.model_runner`), the markers, repair scheduling, feeds
(`halo.feeding`), the decode loop (`halo.decoding`), counters (`halo.session_stats`) and saving (`halo.session_state`).
"""

from __future__ import annotations

import torch

from . import persist
from .cache import HaloCache
from .config import HaloConfig
from .decoding import check_generate, decode
from .feeding import Feed
from .forward import StepResult, stream_spec
from .markers import ElisionMarkers
from .memory import MemorySnapshot
from .model_runner import ModelRunner
from .policy import CullPolicy
from .recall import Recall
from .render import write_html
from .repair import load_repairer
from .repair.scheduler import RepairScheduler
from .sampling import eos_ids
from .session_state import SessionState, load_session
from .session_stats import session_stats
from .units import WordState, WordTracker, sentence_end_table, word_table


class Session:
    """One conversation with a model under a fixed KV budget.

    Args:
        model: a transformers causal LM (Llama family); it is switched to the `halo` attention function.
        tokenizer: its tokenizer.
        config: HaloConfig (default HaloConfig()).
        policy: cull policy (default HaloPolicy).
        repairer: a `halo.repair.Repairer` to use instead of the one `config.repair` names.

    Attributes:
        cache, runner (ModelRunner), markers (ElisionMarkers), repairs (RepairScheduler), recall (halo.recall.Recall,
        or None when HaloConfig.recall is off), diffs (applied repairs), journal.
    """

    def __init__(self, model, tokenizer, config: HaloConfig | None = None, *, policy: CullPolicy | None = None,
                 repairer=None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or HaloConfig()
        self.cache = HaloCache(model, self.config, policy=policy)
        self.runner = ModelRunner(model, self.cache)
        self.device = self.cache.device
        self.vocab_size = int(model.config.vocab_size)
        self.markers = ElisionMarkers(tokenizer, self.config.marker_text, self.config.source_code("marker"))
        if repairer is None and self.config.repair:  # load now: a bad repair model fails before anything is fed
            cfg = self.config
            repairer = load_repairer(cfg.repair, model, tokenizer, device=self.device,
                                     repair_threshold=cfg.repair_threshold, min_margin=cfg.repair_margin,
                                     guidance=cfg.repair_guidance, rerank_top=cfg.repair_rerank)
        self.repairs = RepairScheduler(repairer, self.config, self.vocab_size)
        self.recall = (Recall(self.config, sentence_end_table(tokenizer, self.vocab_size),
                              word_table(tokenizer, self.vocab_size)) if self.config.recall else None)
        self.diffs: list[tuple[int, int, int]] = []
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

    @property
    def model_seconds(self) -> float:
        """Seconds spent in the model's forwards so far (the cache's own step work left out)."""
        return self.runner.seconds

    @model_seconds.setter
    def model_seconds(self, seconds: float) -> None:
        self.runner.seconds = seconds

    def memory(self) -> MemorySnapshot:
        """The retained tokens in position order."""
        return MemorySnapshot.of(self.cache)

    def memory_text(self) -> str:
        """The remembered text, in position order, elision markers included."""
        return self.tokenizer.decode([t for t in self.cache.snapshot()["token_ids"].tolist() if t >= 0])

    def stats(self) -> dict:
        """Counters and timings of the session so far (halo.session_stats; O(1) per call, amortised)."""
        return session_stats(self.cache, marker_source=self.markers.source_code, repairs=len(self.diffs),
                             model_seconds=self.model_seconds, repair_seconds=self.repairs.seconds)

    # ------------------------------------------------------------- feeding
    def feed(self, text: str, source: str = "user") -> int:
        """Stream `text` into the cache as `source`; returns the number of tokens fed.

        Log and tool text (HaloConfig.unit_sources) is split into line units. Raises ValueError (state
        untouched) on empty text, an unknown source, or pinned text that would not fit the budget.
        """
        return self._feed(Feed.of_text(self.tokenizer, self.config, text, source, first=self.cache.seen == 0))

    def feed_ids(self, token_ids: torch.Tensor, source: str = "user") -> int:
        """Stream already-tokenised ids (int64 [T] on the CPU or the model's device) as `source`."""
        return self._feed(Feed.of_ids(token_ids, source, self.config, self.vocab_size, self.device))

    def _feed(self, feed: Feed) -> int:
        self.pinned_tokens = feed.pinned_tokens_after(self.config, self.pinned_tokens)
        for token_ids, units in feed.forwards(self.config.chunk_size, self.cache.new_unit_ids):
            self.step(token_ids, feed.source, units)
        if feed.lines is not None and self.words is not None:
            self.words.state = WordState()  # a line unit ends any word
        return len(feed)

    def step(self, token_ids: torch.Tensor, source: str = "user", units: torch.Tensor | None = None) -> torch.Tensor:
        """One stream forward of up to chunk_size new tokens (int64 [T]); returns the logits [V] of the last one.

        Pending repair patches ride along as extra rows; after the forward the cache is culled to budget, culled
        line runs are marked, with recall on the archived text the forward points at comes back (the logits
        returned then see it), and, with repair on, the tokens near the new holes are repaired. Without `units`,
        text of a source that is not split into lines is split into words (HaloConfig.word_units).
        """
        cache, word_before = self.cache, self.words and self.words.state
        if units is None and self.words is not None and source not in self.config.unit_sources:
            units = self.words.units(token_ids, cache.new_unit_ids)
        self.diffs += self.repairs.collect(cache, wait=False)
        spec = stream_spec(cache, token_ids, source, units, self.repairs.patch_slots(cache))
        try:
            self._last_logits, result = self.runner.stream(spec)
        except BaseException:  # the step never happened: the stream is still in the word it was in
            if self.words is not None:
                self.words.state = word_before
            raise
        self.repairs.patches_done()
        result.extend(self.markers.settle(cache, result.culled_runs, self.runner))
        if self.recall is not None:
            logits, recalled = self.recall.after_step(cache, self.runner, self.markers,
                                                      spec.position_ids[:spec.new_rows], spec.source)
            result.extend(recalled)
            if logits is not None:
                self._last_logits = logits
        self.last_step = result
        if result.evictions and self.repairs.repairer is not None:
            self.diffs += self.repairs.after_cull(cache, result.evictions)
        return self._last_logits

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
        return self.runner.flush_patches(self.repairs)

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
        check_generate(max_new_tokens, temperature, top_k, top_p)
        self.config.source_code(source)
        eos = eos_ids(self.tokenizer, self.model) if stop_on_eos else set()
        out = decode(self._last_logits, lambda token: self.step(token, source), max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, seed=seed, device=self.device, eos=eos, on_token=on_token)
        return self.tokenizer.decode(out)

    # ------------------------------------------------------ persistence and views
    def state_dict(self) -> dict:
        """Everything needed to continue: the cache (journal included), the session's counters and diffs."""
        if self.markers.pending_runs:
            raise RuntimeError("cannot save while culled lines wait for their elision marker; feed or generate first")
        self.flush_repairs()  # the saved K/V must match the mirror
        return SessionState.of(self).state_dict(self.cache.state_dict())

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output into this fresh session; ValueError naming the first mismatch."""
        own = SessionState.from_state_dict(state, self.markers.token_ids, self.vocab_size, self.device)
        self.cache.load_state_dict(state["cache"])
        self.pinned_tokens, self.model_seconds, self.diffs, self.extra = (own.pinned_tokens, own.model_seconds,
                                                                          own.diffs, own.extra)
        if self.words is not None:
            self.words.state = own.word_state
        self._last_logits = own.last_logits

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
        return load_session(cls, path, model, tokenizer, policy=policy, check_name=check_name)

    def render_html(self, path, **kwargs):
        """Write a self-contained HTML page of the memory coloured by brightness, and the journal (halo.render)."""
        return write_html(self, path, **kwargs)
