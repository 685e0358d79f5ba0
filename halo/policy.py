"""Cull policies: what score decides who dies when the cache is over budget.

A policy is a small dataclass. The cache calls `attach` once (to add any per-slot state it needs, which the
cache then moves through compaction), `observe` after every forward (with this forward's attention mass already
in `cache.mass` / `cache.last_mass`), and `scores` when it must cull: lower scores die first, ties by position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from .cull import unit_means
from .cull_ops import cull_scores_layers, run_means_layers
from .key_novelty import key_novelty


def restart_refilled(cache, owner_field: str, *fields: str) -> None:
    """Zero the policy fields `fields` in every retained slot whose token changed since `owner_field` last
    recorded it (compaction moved another token in, or a marker or recalled row was written there), then record
    the slots' current tokens (by serial) in `owner_field`."""
    n = cache.n_valid
    owner, serials = cache.slot_field(owner_field)[..., :n], cache.serials[..., :n]
    fresh = owner != serials
    for name in fields:
        cache.slot_field(name)[..., :n].masked_fill_(fresh, 0)
    owner.copy_(serials)


def add_slot_fields(cache, fields) -> None:
    """Add each (name, dtype, fill) of `fields` as a slot field of `cache` unless it is there already (a policy's
    `scores` attaches lazily: a second attach keeps the fields and what they hold)."""
    for name, dtype, fill in fields:
        try:
            cache.slot_field(name)
        except KeyError:
            cache.add_slot_field(name, dtype, fill)


@dataclass
class CullPolicy(ABC):
    """Base policy: subclasses override `scores` and, when they keep state, `attach` and `observe`."""

    name = "base"
    # False for policies that never read attention (e.g. position-only ones): the cache then skips the
    # attention-mass capture and the brightness update, so their per-step cost is measured fairly.
    needs_attention = True
    # False for the published baselines, which cull single tokens: the session then gives their text no word
    # units (HaloConfig.word_units applies to policies that keep words whole).
    keeps_words = True

    def attach(self, cache) -> None:
        """Register per-slot state on the cache (called once)."""

    def observe(self, cache, n_past: int, t_rows: int) -> None:
        """Update per-slot state after a forward of t_rows rows over n_past retained slots."""

    @abstractmethod
    def scores(self, cache) -> torch.Tensor:
        """float32 [cache.n_valid] cull score per slot (lower dies first); [L, n_valid], one row per layer, for a
        per-layer memory (`cache.per_layer`, whose per-slot fields are [L, C]; per-head memory: [L * Hkv, n_valid])."""


@dataclass
class HaloPolicy(CullPolicy):
    """Halo Weave: brightness (attention-fed, source-aware, decaying) biased toward dark regions, shifted by the
    priority of each token's source, with log and tool lines scored by the mean over their tokens.

    Score of slot j, lower dies first:

        score[j] = b[j] + dark_bias * mean(b of the +-dark_radius position-order neighbours) + priority[source j]

    where `b` is the score basis (`score_basis`: the brightness) times `exp(key_weight * novelty)` of the slot's
    key when the config's `key_weight` is above 0 (halo.key_novelty; default 3)
    (`halo.cull.cull_scores` for the first two terms, `dark_bias` and `dark_radius` from the cache's HaloConfig,
    `priority` from its `SourcePolicy`). Then every token of a line unit (a source in `unit_sources`) takes the
    mean score of its line (`line_pooling="mean"`, `halo.cull.unit_means`); word units keep the best-scoring-token
    rule of `halo.cull.select_unit_victims` (or, with `word_pooling="mean"`, score as their mean too).

    Why: brightness says what the model attends to, but during a flood of tool or log output nothing attends to
    the conversation, so a fact the user stated fades with the chatter around it and, once everything is dark,
    the oldest text dies first. The priority is the prior that the conversation matters more than what a tool
    printed, and what the user said (facts, instructions) more than the assistant's replies, in the same units
    as brightness: a log line outlives user text only by scoring `priority difference` higher. Mean pooling
    stops long lines from living on their single brightest token (with the best token, the longer the line, the
    likelier one of its tokens is bright). Brightness and its update rule are unchanged; only the order of dying
    is. Both steps run on top of `cache.backend.cull_scores`, so the Triton and reference backends stay twins.

    Attributes:
        line_pooling: "mean" (default) or "max" (a line scores as its best-scoring token, like a word).
        word_pooling: "max" (default: a word scores as its best-scoring token) or "mean" (as the mean of its tokens).
        dark_bias: weight of the neighbourhood mean; None (default) reads the cache's `HaloConfig.dark_bias`.
    """

    name = "halo"
    line_pooling: str = "mean"
    word_pooling: str = "max"
    dark_bias: float | None = None
    _priority: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _is_line: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)
    _reuse_novelty: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("line_pooling", "word_pooling"):
            if getattr(self, name) not in ("mean", "max"):
                raise ValueError(f"{name} must be 'mean' or 'max', got {getattr(self, name)!r}")
        if self.dark_bias is not None and not 0.0 <= float(self.dark_bias) < float("inf"):
            raise ValueError(f"dark_bias must be None or a finite value >= 0, got {self.dark_bias!r}")

    def attach(self, cache) -> None:
        """Read the per-source priorities and the line sources of the cache's config (a policy serves one cache)."""
        cfg = cache.config
        self._priority = torch.tensor(cfg.source_priorities(), dtype=torch.float32, device=cache.device)
        # by source code: True for the line sources (a lookup, where isin would sort)
        self._is_line = torch.zeros(len(self._priority), dtype=torch.bool, device=cache.device)
        self._is_line[torch.tensor(cfg.line_source_codes(), dtype=torch.int64, device=cache.device)] = True
        if cfg.key_weight and cfg.key_refresh > 1:  # each slot's novelty at the last refresh, and whose it is
            add_slot_fields(cache, (("key_novelty", torch.float32, 0.0), ("key_novelty_serial", torch.int64, -1)))

    def observe(self, cache, n_past: int, t_rows: int) -> None:
        """With HaloConfig.key_refresh > 1: the cull after a forward that crossed no multiple of it (in fed rows)
        may reuse the last refresh's key novelty."""
        every, seen = cache.config.key_refresh, cache.seen
        self._reuse_novelty = every > 1 and (seen - t_rows) // every == seen // every

    def scores(self, cache) -> torch.Tensor:
        cfg, n = cache.config, cache.n_valid
        if self._priority is None:
            self.attach(cache)
        sources, basis = cache.sources[..., :n], self.score_basis(cache)
        if cfg.key_weight and n:
            basis = basis.clone()
            basis[..., :n] *= torch.exp(cfg.key_weight * self._key_novelty(cache, n))
        dark_bias = cfg.dark_bias if self.dark_bias is None else self.dark_bias
        if basis.dim() == 2:  # per-layer memory: [L, C] fields
            scores = cull_scores_layers(basis[:, :n], cache.positions[:, :n], cache.layer_counts,
                                        dark_bias, cfg.dark_radius, cache.position_order())
        else:
            scores = cache.backend.cull_scores(basis, cache.positions, n, dark_bias, cfg.dark_radius)
        scores = scores + self._priority[sources]
        units = cache.units[..., :n]
        if self.word_pooling == "mean":  # every unit by its mean (a line too, unless line_pooling says max)
            pooled = units >= 0
            if self.line_pooling == "max":
                pooled &= ~self._is_line[sources]
        elif self.line_pooling == "mean":
            pooled = self._is_line[sources]
            if not (scores.is_cuda or bool(pooled.any())):  # on the CPU the check costs less than pooling nothing
                return scores
        else:
            return scores
        if scores.dim() == 2:  # a cache's own rows: its units are runs in position order, no sort needed
            return run_means_layers(scores, cache.position_order(), units, pooled)
        return unit_means(scores, units, pooled)

    def _key_novelty(self, cache, n: int) -> torch.Tensor:
        """float32 novelty of the n retained slots (halo.key_novelty), afresh or, right after a forward that crossed
        no multiple of HaloConfig.key_refresh fed rows, as kept at the last refresh (0 in slots written since)."""
        cfg, reuse, self._reuse_novelty = cache.config, self._reuse_novelty, False  # a second cull: afresh
        counts = cache.layer_counts if cache.per_layer else None
        if cfg.key_refresh == 1:
            return key_novelty(cache.kv, n, counts, cfg.granularity == "head")
        restart_refilled(cache, "key_novelty_serial", "key_novelty")
        kept = cache.slot_field("key_novelty")[..., :n]
        if not reuse:
            kept.copy_(key_novelty(cache.kv, n, counts, cfg.granularity == "head"))
        return kept

    def score_basis(self, cache) -> torch.Tensor:
        """float32 [C] ([rows, C] per layer or head): the per-slot value the score biases and shifts (brightness)."""
        return cache.brightness
