"""RetainedReader: what a token-level HaloCache holds, read through its public slot fields (positions, sources,
serials, ...) and `n_valid`. Per-layer memory (halo.layered_cache) overrides every method."""

from __future__ import annotations

import torch

from .forward import visible_before
from .slots import SLOT_FIELDS


class RetainedReader:
    """Readers of the retained slots `0 .. n_valid - 1` of a cache with one slot order for every layer."""

    def retained_visibility(self, horizon: torch.Tensor) -> torch.Tensor:
        """bool [R, n_valid]: row r may see retained slot j when the slot's position is below horizon[r]."""
        return visible_before(self.positions[: self.n_valid], horizon)

    def count_source(self, code: int) -> int:
        """Retained tokens of source `code`."""
        return int((self.sources[: self.n_valid] == code).sum())

    def slot_of_position(self) -> dict[int, int]:
        """position -> slot of every retained token (one host read of the positions)."""
        return {p: i for i, p in enumerate(self.positions[: self.n_valid].tolist())}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Retained slots sorted by position (ties by birth), as CPU tensors keyed like the slot fields, and
        `layers` (int64, the layers holding each: all of them here)."""
        n = self.n_valid
        serial_order = torch.sort(self.serials[:n]).indices
        order = serial_order[torch.sort(self.positions[:n][serial_order], stable=True).indices]
        return {**{name: self.slot_field(name)[:n][order].cpu() for name in SLOT_FIELDS},
                "layers": torch.full((n,), self.num_layers, dtype=torch.int64)}
