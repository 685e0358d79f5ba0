"""Standard KV-eviction baselines as cull policies over the same HaloCache.

Every policy here runs on the same machinery as Halo Weave: the same budget, the same protected set (attention
sinks + recent window + pinned sources, from `HaloCache.protected_mask`), the same one-set-for-all-layers
eviction and compaction, the same accounting, log/tool lines culled whole. Only the score that ranks unprotected
slots differs (lower dies first, ties by position, oldest first), and, as published, they cull single tokens
of plain text (no word units), so differences in the evaluation are differences of rule alone.

`POLICIES` names them for the evaluator; `make_policy(name, seed=...)` builds one. `full` (no eviction) is not
a policy: it is the evaluator running with a budget at least the text length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .mean_income import MeanIncomePolicy
from .policy import CullPolicy, HaloPolicy, restart_refilled


@dataclass
class StreamingPolicy(CullPolicy):
    """StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks").

    Rule: keep the attention sinks (first tokens) and a window of the most recent tokens. Score = absolute
    position, so the oldest unprotected token dies first and the cache holds exactly the sinks plus the
    `budget - sinks` most recent tokens.
    """

    name = "streaming"
    keeps_words = False
    needs_attention = False

    def scores(self, cache) -> torch.Tensor:
        return cache.positions[..., : cache.n_valid].to(torch.float32)


@dataclass
class H2OPolicy(CullPolicy):
    """H2O, Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference").

    Rule: every token accumulates the attention it receives from every query row it has seen (here summed over
    layers and averaged over heads, `cache.mass`); keep the heavy hitters (largest accumulated score) plus the
    recent window. Score = accumulated attention.
    """

    name = "h2o"
    keeps_words = False
    field_name: str = "h2o_score"

    def attach(self, cache) -> None:
        cache.add_slot_field(self.field_name, torch.float32, 0.0)
        # serial of the token whose score the slot holds: slots filled by forwards we did not observe (markers)
        # or recycled by compaction are recognised and restarted from zero.
        cache.add_slot_field(self.field_name + "_serial", torch.int64, -1)

    def observe(self, cache, n_past: int, t_rows: int) -> None:
        n = cache.n_valid
        restart_refilled(cache, self.field_name + "_serial", self.field_name)
        cache.slot_field(self.field_name)[..., :n] += cache.mass[..., :n]

    def scores(self, cache) -> torch.Tensor:
        return cache.slot_field(self.field_name)[..., : cache.n_valid].clone()


@dataclass
class TOVAPolicy(CullPolicy):
    """TOVA, Token Omission Via Attention (Oren et al. 2024, "Transformers are Multi-State RNNs").

    Rule: evict the token that the current query attends to least, attention averaged over heads (here also
    summed over layers: one shared token set). Score = `cache.last_mass`, the last query row's mass.
    """

    name = "tova"
    keeps_words = False

    def scores(self, cache) -> torch.Tensor:
        return cache.last_mass[..., : cache.n_valid].clone()


@dataclass
class RandomPolicy(CullPolicy):
    """Random eviction (control): the same protected set, uniformly random scores from a seeded generator."""

    name = "random"
    keeps_words = False
    needs_attention = False
    seed: int = 0
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def attach(self, cache) -> None:
        self._generator = torch.Generator(device=cache.device).manual_seed(self.seed)

    def scores(self, cache) -> torch.Tensor:
        return torch.rand(cache.brightness[..., : cache.n_valid].shape, generator=self._generator, device=cache.device)


POLICIES = {
    "streaming": StreamingPolicy,
    "h2o": H2OPolicy,
    "tova": TOVAPolicy,
    "random": RandomPolicy,
    "halo": HaloPolicy,
    "halo-mean": MeanIncomePolicy,
}
"""Name -> policy class of every evicting policy (the evaluator adds `full`, no eviction)."""

ALL_POLICY_NAMES = ("full", *POLICIES)


def make_policy(name: str, *, seed: int = 0) -> CullPolicy:
    """A fresh policy by name (`random` is seeded with `seed`); ValueError for an unknown name or `full`."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; evicting policies: {', '.join(POLICIES)} (and 'full' in the evaluator)")
    cls = POLICIES[name]
    return cls(seed=seed) if cls is RandomPolicy else cls()
