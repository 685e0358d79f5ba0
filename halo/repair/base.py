"""The `Repairer` interface shared by every repair backend: contract in, diffs out, brightness guidance, gate.

A backend implements `suggest(batch) -> Suggestions` with exactly one batched model forward and no sampling;
`Repairer` turns suggestions into the contract's diffs. Guidance (shared semantics):

* `guidance="hard"`: real window positions with brightness below `repair_threshold` (other than the target)
  are masked too, so dim, possibly corrupted context cannot steer the prediction.
* `guidance="soft"`: those positions' input embeddings are scaled by brightness / 255 instead.
* `guidance="none"`: every real window position is read as it is.

Gate: a suggestion becomes a diff only when it differs from the current token and its margin (backend score of
the suggestion minus that of the current token) is at least `min_margin`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import REPAIR_GUIDANCE as GUIDANCE_MODES
from .contract import Diff, RepairBatch, validate_contract_dicts


@dataclass(frozen=True)
class Suggestions:
    """One suggestion per window, on the backend's device (`Repairer.diffs` makes the one host transfer).

    Attributes:
        token_ids: int64 [K] host id of the suggestion; -1 where the backend has none; equal to the original
            id where the backend considers the current token right.
        margin: float32 [K] score(suggestion) - score(current token); +inf where the current token has no score.
    """

    token_ids: torch.Tensor
    margin: torch.Tensor


class Repairer(ABC):
    """Base class of the repair backends (`MaskedLMRepairer`, `SelfRepairer`)."""

    def __init__(self, *, guidance: str = "hard", repair_threshold: float = 64.0, min_margin: float = 0.0):
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance must be one of {GUIDANCE_MODES}, got {guidance!r}")
        self.guidance = guidance
        self.repair_threshold = float(repair_threshold)
        self.min_margin = float(min_margin)

    @property
    @abstractmethod
    def host_vocab_size(self) -> int:
        """Size of the host vocabulary (valid ids are 0 .. host_vocab_size - 1)."""

    @abstractmethod
    def suggest(self, batch: RepairBatch) -> Suggestions:
        """Top-1 suggestion for every window's target, from one batched forward pass."""

    def repair(self, diffuser_input_list: Sequence[dict]) -> list[Diff]:
        """The Step 3d contract: validate every dict, run one batched pass, return the diffs.

        Returns:
            `(global_cull_position, original_token_id_at_mask, new_token_id)` for each window whose suggestion
            differs from its current token and passes the gate, in input order.

        Raises:
            ValueError: a bad dict (naming its window index); nothing runs in that case.
        """
        batch = validate_contract_dicts(diffuser_input_list, vocab_size=self.host_vocab_size)
        return self.repair_batch(batch)

    def repair_batch(self, batch: RepairBatch) -> list[Diff]:
        """Diffs for an already padded batch (the fast path from `build_windows`, no dicts)."""
        if batch.size == 0:
            return []
        return self.diffs(batch, self.suggest(batch))

    def diffs(self, batch: RepairBatch, s: Suggestions) -> list[Diff]:
        """The gated diffs of `suggest`'s output for `batch` (the one host transfer of the repair)."""
        new = s.token_ids.detach().cpu()
        margin = s.margin.detach().cpu()
        orig = batch.original_ids.detach().cpu()
        pos = batch.global_positions.detach().cpu()
        keep = (new >= 0) & (new != orig) & (margin >= self.min_margin)
        return [(int(pos[i]), int(orig[i]), int(new[i])) for i in keep.nonzero().flatten().tolist()]

    def dim_context(self, batch: RepairBatch) -> torch.Tensor:
        """bool [K, W]: real, non-target positions with brightness below `repair_threshold` (none without
        guidance)."""
        if self.guidance == "none":
            return torch.zeros_like(batch.attention_mask)
        dim = batch.attention_mask & (batch.brightness < self.repair_threshold)
        dim[torch.arange(batch.size, device=dim.device), batch.target_local] = False
        return dim

    def soft_scale(self, batch: RepairBatch) -> torch.Tensor:
        """float32 [K, W]: embedding scale for soft guidance (brightness / 255 on dim context, else 1)."""
        scale = (batch.brightness / 255.0).clamp(0.0, 1.0)
        return torch.where(self.dim_context(batch), scale, torch.ones_like(scale))
