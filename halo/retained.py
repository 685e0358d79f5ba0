"""RetainedReader: what a token-level HaloCache holds, read through its public slot fields (positions, sources,
serials, ...) and `n_valid`, and the text mirror's repair edits. Per-layer memory (halo.layered_cache) overrides
every method."""

from __future__ import annotations

import torch

from .forward import visible_before
from .slots import SLOT_FIELDS
from .token_view import TokenView


class RetainedReader:
    """Readers of the retained slots `0 .. n_valid - 1` of a cache with one slot order for every layer."""

    archive = None
    """The recall archive (halo.archive.RecallArchive): only per-layer memory recalls, so None here."""

    def recalled_mask(self, serials: torch.Tensor) -> torch.Tensor:
        """bool [k]: which of these serials were born by recall (none without recall)."""
        return torch.zeros_like(serials, dtype=torch.bool)

    def retained_visibility(self, horizon: torch.Tensor, own_slots: torch.Tensor | None = None) -> torch.Tensor:
        """bool [R, n_valid]: row r may see retained slot j when the slot's position is below horizon[r]; with
        `own_slots` (int64 [R], patch rows) row r also sees slot own_slots[r]."""
        visible = visible_before(self.positions[: self.n_valid], horizon)
        if own_slots is not None:
            visible[torch.arange(horizon.numel(), device=visible.device), own_slots] = True
        return visible

    def remembered_count(self) -> int:
        """Tokens the memory holds (markers included): the retained slots."""
        return self.n_valid

    def count_source(self, code: int) -> int:
        """Retained tokens of source `code`."""
        return int((self.sources[: self.n_valid] == code).sum())

    def token_view(self) -> TokenView:
        """The retained slots as a TokenView (view slot = cache slot; tensors are the cache's own buffers)."""
        return TokenView(self.positions, self.token_ids, self.brightness, self.sources, self.serials,
                         self.protected_mask(), self.n_valid)

    def replace_tokens(self, slots: torch.Tensor, new_ids: torch.Tensor) -> None:
        """Write repaired token ids into the mirror at retained `slots` (int64 [k]); the old ones go to the journal
        as "replaced". Their K/V are stale until a forward recomputes them (patch rows)."""
        self.journal.record(self.positions[slots], self.token_ids[slots], self.sources[slots], self.brightness[slots],
                            self.steps, kind="replaced")
        self.token_ids[slots] = new_ids.to(self.device)

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
