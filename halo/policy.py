"""Cull policies: what score decides who dies when the cache is over budget.

A policy is a small dataclass. The cache calls `attach` once (to add any per-slot state it needs, which the
cache then moves through compaction), `observe` after every forward (with this forward's attention mass already
in `cache.mass` / `cache.last_mass`), and `scores` when it must cull: lower scores die first, ties by position.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


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
        """float32 [cache.n_valid]: cull score per slot (lower dies first)."""


@dataclass
class HaloPolicy(CullPolicy):
    """Halo Weave: brightness (attention-fed, source-aware, decaying) biased toward dark regions.

    Score: `b[j] + dark_bias * mean(b of the +-dark_radius position-order neighbours)` (see `halo.cull`), with
    `dark_bias` and `dark_radius` from the cache's HaloConfig. Units (log/tool lines) are scored by the cache
    as a whole, with the max brightness of their tokens.
    """

    name = "halo"

    def scores(self, cache) -> torch.Tensor:
        cfg = cache.config
        return cache.backend.cull_scores(cache.brightness, cache.positions, cache.n_valid, cfg.dark_bias, cfg.dark_radius)
