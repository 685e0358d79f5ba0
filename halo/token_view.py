"""TokenView: the remembered tokens as one list of slots, whatever the cache keeps per layer.

Repair works on tokens: it picks dim tokens near fresh holes, builds windows of remembered text around them and
replaces token ids. A token-level HaloCache's view is its own retained slots (view slot = cache slot); a
per-layer memory (halo.layered_cache) lists each remembered token once (held by at least one layer), with its
brightness averaged over the layers that hold it. Views are read-only and valid until the cache changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenView:
    """Remembered tokens, index = view slot; device tensors of shape [n_valid] (or longer, like a cache's [C]
    buffers: only the first n_valid entries count).

    Attributes:
        positions: int64 absolute positions; token_ids: int64; brightness: float32; sources: int64 source codes;
        serials: int64 birth serials (a token's identity); protected: bool (sinks, recent window, pinned);
        n_valid: the number of tokens.
    """

    positions: torch.Tensor
    token_ids: torch.Tensor
    brightness: torch.Tensor
    sources: torch.Tensor
    serials: torch.Tensor
    protected: torch.Tensor
    n_valid: int

    def slot_of_position(self) -> dict[int, int]:
        """position -> view slot of every remembered token (one host read)."""
        return {p: i for i, p in enumerate(self.positions[: self.n_valid].tolist())}
