"""Halo's cull order ranked by each token's mean attention income since it was born, instead of its brightness.

Why (measured on SmolLM2-135M; see README, "What limits perplexity under budget"): a cull that knows the attention
the full cache will pay each token later in the text (an oracle; benchmarks/future_oracle.py simulates it) loses almost nothing
at 1/4 of the embedded text, so what separates Halo from that bound is how well the past predicts the future. The
leaky brightness sum clamps at 255, so a token that drew a burst of attention (the brackets of a grammar block
while the model read it) stays at the ceiling for hundreds of rows after the model stopped reading it, while
newlines and full stops that every later row keeps reading a little fall behind. The mean income per row it has
seen ranks tokens by how steadily they are read, whatever their age. It is an opt-in (`halo eval` row
`halo-mean`, `Session(policy=MeanIncomePolicy())`): DESIGN.md's cull reads the leaky brightness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .policy import HaloPolicy, add_slot_fields, restart_refilled

INCOME_SCALE = 128.0
"""Brightness units of a mean income of 1.0 (uniform attention), the `initial` of conversation text, so the source
priorities and the dark bias keep their meaning in the same units."""
PRIOR_BUDGET_FRACTION = 8
"""The default prior weighs budget / 8 rows."""


@dataclass
class MeanIncomePolicy(HaloPolicy):
    """Halo's cull (dark bias, source priority, whole words and lines, the same protected set) on the mean income.

    Score of slot j, lower dies first: HaloPolicy's score with `b[j]` replaced by

        m[j] = INCOME_SCALE * (attention mass j received since birth) / (rows that saw j + prior_rows)
               + brightness_weight * b[j]

    with the mass normalised like brightness income (uniform attention reads 1.0 per row; per layer, each
    layer's own; per KV head, its own query heads'; one set for all layers, the mean over layers). `prior_rows`
    are rows of zero income counted before the first, so a newborn is not ranked on one row of attention (it is
    protected by the recent window meanwhile). Brightness itself is updated as always (the HTML view, repair and
    `cull_threshold` read it); the per-source `decay` does not enter this score.

    Attributes:
        prior_rows: weight, in rows, of the zero prior; None (default): the cache's budget / 8 (tuned on
            development essays: the best fixed prior was larger at a budget of 1/4 of the text than at 1/8).
        dark_bias: 0 (no bias toward dark regions), not the config's: measured better with the mean income.
        word_pooling: "mean": a word scores as the mean of its tokens' scores, like a line (measured better).
        brightness_weight: w >= 0, the share of the leaky brightness added to the mean income (0: the mean alone).
            The brightness remembers recent attention, which the mean since birth dilutes.
        content_weight: p >= 0: each forward's mass counts `(1 - s) ** p` times, `s` the share of that forward's
            mass (per layer, or per KV head) the attention sinks drew (the slots at positions below the config's
            `sink_tokens`); 0 (default): every forward counts alike. A row that rests its attention on the sinks
            spreads the little left over the rest almost evenly; its income says little about what the model
            reads. Decoding feeds one row per forward, so there it weighs each row.
    """

    name = "halo-mean"
    dark_bias: float | None = 0.0
    word_pooling: str = "mean"
    prior_rows: float | None = None
    brightness_weight: float = 0.0
    content_weight: float = 0.0
    income_field: str = "mean_income"

    def __post_init__(self):
        super().__post_init__()
        if self.prior_rows is not None and not 0.0 < float(self.prior_rows) < float("inf"):
            raise ValueError(f"prior_rows must be None or a finite value > 0, got {self.prior_rows!r}")
        for name in ("brightness_weight", "content_weight"):
            if not 0.0 <= float(getattr(self, name)) < float("inf"):
                raise ValueError(f"{name} must be a finite value >= 0, got {getattr(self, name)!r}")

    def attach(self, cache) -> None:
        super().attach(cache)
        name = self.income_field
        add_slot_fields(cache, ((name, torch.float32, 0.0), (name + "_rows", torch.float32, 0.0),
                                (name + "_serial", torch.int64, -1)))

    def _claim(self, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(income, rows) of the retained slots, restarted from zero in slots whose token changed since they were
        last claimed (compaction moved another token in, or a marker or recalled row was written there)."""
        restart_refilled(cache, self.income_field + "_serial", self.income_field, self.income_field + "_rows")
        return cache.slot_field(self.income_field), cache.slot_field(self.income_field + "_rows")

    def observe(self, cache, n_past: int, t_rows: int) -> None:
        """Add this forward's mass and the rows that saw each slot (T for old slots, T - s for new slot s)."""
        super().observe(cache, n_past, t_rows)
        n = cache.n_valid
        income, rows = self._claim(cache)
        slot = torch.arange(n, device=cache.device)
        to_end = (cache.layer_counts[:, None] - slot) if cache.per_layer else (n - slot)
        seen = to_end.clamp_(0, t_rows).to(torch.float32)
        mass = cache.mass[..., :n] if cache.per_layer else cache.mass[:n] / cache.num_layers
        if self.content_weight:
            mass = mass * content_share(mass, cache.positions[..., :n], cache.config.sink_tokens) ** self.content_weight
        income[..., :n] += mass * (seen > 0)
        rows[..., :n] += seen

    def score_basis(self, cache) -> torch.Tensor:
        income, rows = self._claim(cache)  # a marker or recalled row may sit in a slot no stream forward has seen
        prior = cache.config.budget / PRIOR_BUDGET_FRACTION if self.prior_rows is None else self.prior_rows
        mean = income * (INCOME_SCALE / (rows + prior))
        return mean + self.brightness_weight * cache.brightness if self.brightness_weight else mean


def content_share(mass: torch.Tensor, positions: torch.Tensor, sink_tokens: int) -> torch.Tensor:
    """float32 [..., 1]: the share of a forward's attention mass (float32 [..., n], one row per layer or KV head,
    or [n]) that went to slots whose position (int64, the same shape) is at or past `sink_tokens`; 1 where the
    forward paid no mass."""
    total = mass.sum(-1, keepdim=True)
    sinks = torch.where(positions < sink_tokens, mass, torch.zeros_like(mass)).sum(-1, keepdim=True)
    return torch.where(total > 0, 1.0 - sinks / total.clamp(min=torch.finfo(mass.dtype).tiny), torch.ones_like(total))
