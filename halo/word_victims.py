"""Victims of a per-layer or per-head cull through the compiled operator `torch.ops.halo.word_victims_rows`.

Same signature and result as `halo.layer_cull.select_word_victims_layers` (the reference, whose docstring states
the rules). On CPU, with `halo._C` built, every row's victims come from one operator call (csrc/word_victims.cpp:
each row one pass over its position order and one sort of its units); elsewhere (CUDA, no extension, another
dtype) the reference runs. The reference spends a CPU step in a dozen small tensor ops over [rows, n], which is
what the operator removes (per-head memory culls 90 rows a step on SmolLM2).
"""

from __future__ import annotations

import functools

import torch

from . import layer_cull as reference


@functools.lru_cache(maxsize=None)
def operator_available() -> bool:
    """True when `halo._C` imports and registers `torch.ops.halo.word_victims_rows` (a stale build lacks it)."""
    try:
        import halo._C  # noqa: F401  (loading the library registers the operators)
    except ImportError:
        return False
    if not hasattr(torch.ops.halo, "word_victims_rows"):
        return False
    # static output shapes ([rows, n] padded with -1, and [rows]): FakeTensor / opcheck need no data
    torch.library.register_fake("halo::word_victims_rows")(
        lambda scores, order, brightness, protected_, units, need, threshold: (
            scores.new_empty(scores.shape, dtype=torch.int64), need.new_empty(need.shape)))
    return True


def _takes(scores: torch.Tensor) -> bool:
    return scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.shape[1] > 0 and operator_available()


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
