"""MemorySnapshot: what a session remembers, in position order, as CPU tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MemorySnapshot:
    """The retained tokens sorted by position (ties by birth). Tensors are on the CPU.

    Attributes:
        positions: int64 [n] absolute positions; token_ids: int64 [n]; brightness: float32 [n];
        sources: source name per token; units: int64 [n] unit id (-1 for plain tokens);
        layers: int64 [n] how many layers hold the token (every layer, unless granularity is "layer"; brightness
        is then the mean over those layers); with granularity "head", how many (layer, KV head) pairs hold it;
        recalled: bool [n] tokens brought back by recall (HaloConfig.recall).
    """

    positions: torch.Tensor
    token_ids: torch.Tensor
    brightness: torch.Tensor
    sources: list[str]
    units: torch.Tensor
    layers: torch.Tensor
    recalled: torch.Tensor

    def __len__(self) -> int:
        return int(self.positions.numel())

    @classmethod
    def of(cls, cache) -> "MemorySnapshot":
        """The retained tokens of `cache` (a HaloCache)."""
        snap = cache.snapshot()
        names = cache.config.source_names
        return cls(snap["positions"], snap["token_ids"], snap["brightness"],
                   [names[c] for c in snap["sources"].tolist()], snap["units"], snap["layers"],
                   cache.recalled_mask(snap["serials"]))
