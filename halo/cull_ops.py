"""The cull of a per-layer or per-head memory through compiled operators on CPU: every row in one call.

* `cull_scores_layers`: `torch.ops.halo.cull_scores_rows` (csrc/cull_scores.cpp), the twin of
  `halo.layer_cull.cull_scores_layers`;
* `select_word_victims_layers`: `torch.ops.halo.word_victims_rows` (csrc/word_victims.cpp), the twin of
  `halo.layer_cull.select_word_victims_layers`;
* `run_means_layers`: `torch.ops.halo.run_means_rows` (csrc/run_means.cpp), the twin of
  `halo.layer_cull.run_means_layers` (units scored by their mean).

Same signatures and results as the references (whose docstrings state the rules). On CPU, with `halo._C` built,
each is one operator call (each row one pass over its position order); elsewhere (CUDA, no extension, another
dtype) the reference runs. The references spend a CPU step in a dozen small tensor ops over [rows, n] each,
which is what the operators remove (per-head memory culls 90 rows a step on SmolLM2).
"""

from __future__ import annotations

import functools

import torch

from . import layer_cull as reference
from .extension import load_operators


@functools.lru_cache(maxsize=None)
def operator_available() -> bool:
    """True when `halo._C` registers `torch.ops.halo.word_victims_rows`, `cull_scores_rows` and `run_means_rows` (a
    stale build may lack them)."""
    return load_operators({  # static output shapes: FakeTensor / opcheck need no data
        "word_victims_rows": lambda scores, order, brightness, protected_, units, need, threshold: (
            scores.new_empty(scores.shape, dtype=torch.int64), need.new_empty(need.shape)),
        "cull_scores_rows": lambda brightness, order, counts, dark_bias, radius: torch.empty_like(brightness),
        "run_means_rows": lambda scores, order, units, pooled: torch.empty_like(scores),
    })


def _takes(values: torch.Tensor) -> bool:
    return values.device.type == "cpu" and values.dtype == torch.float32 and values.shape[1] > 0 and operator_available()


def cull_scores_layers(brightness: torch.Tensor, positions: torch.Tensor, counts: torch.Tensor, dark_bias: float,
                       radius: int, order: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [rows, n]: `halo.layer_cull.cull_scores_layers` (same arguments), one operator call on CPU."""
    if dark_bias == 0.0 or radius == 0 or brightness.shape[1] <= 1 or not _takes(brightness):
        return reference.cull_scores_layers(brightness, positions, counts, dark_bias, radius, order)
    order = reference.position_order_layers(positions) if order is None else order
    return torch.ops.halo.cull_scores_rows(brightness, order, counts.to(device="cpu", dtype=torch.int64),
                                           float(dark_bias), int(radius))


def run_means_layers(scores: torch.Tensor, order: torch.Tensor, units: torch.Tensor, pooled: torch.Tensor
                     ) -> torch.Tensor:
    """float32 [rows, n]: `halo.layer_cull.run_means_layers` (same arguments), one operator call on CPU."""
    if not _takes(scores):
        return reference.run_means_layers(scores, order, units, pooled)
    return torch.ops.halo.run_means_rows(scores, order, units, pooled)


def select_word_victims_layers(scores: torch.Tensor, order: torch.Tensor, brightness: torch.Tensor,
                               protected: torch.Tensor, units: torch.Tensor, need: torch.Tensor,
                               threshold: float | None) -> torch.Tensor | None:
    """int64 [rows, m] victims per row (padded with -1), or None when some row must cut protected units; see
    `halo.layer_cull.select_word_victims_layers` for the arguments (float32 scores and brightness [rows, n],
    int64 order and units [rows, n], bool protected [rows, n], int64 need [rows])."""
    if not _takes(scores):
        return reference.select_word_victims_layers(scores, order, brightness, protected, units, need, threshold)
    need = need.to(device="cpu", dtype=torch.int64)
    victims, freed = torch.ops.halo.word_victims_rows(scores, order, brightness.float(), protected, units, need,
                                                      None if threshold is None else float(threshold))
    if bool((freed < need).any()):
        return None
    return victims[:, : int(freed.max())]
