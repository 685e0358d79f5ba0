"""SlotStore: the preallocated buffers of a HaloCache, and their state.

One K/V buffer `kv` of shape [L, 2, Hkv, C, D] (`layer_kv[l]`: layer l's key and value views [Hkv, C, D]) and
named per-slot fields of shape [C], all on one device: `positions` (int64 absolute position), `token_ids`
(int64, -1 unknown), `sources` (int64 source code), `units` (int64 unit id, -1 for plain tokens), `serials`
(int64 birth order), `brightness` (float32), the step fields `mass` and `last_mass` (float32, this forward's
attention mass), and any field a policy adds. Retained slots are `0 .. n - 1` of every buffer; compaction moves
every field with its slot. The buffers are replaced only to grow (one forward larger than the headroom).

With `groups=L` (per-layer memory, halo.layered_cache) every per-slot field is [L, C] instead: row l describes
the slots of layer l, which keeps its own tokens in its own slot order; `n` then means the slots used by the
fullest layer (the rest of a row past that layer's own count is free). Per-head memory (halo.head_cache) passes
`groups=L * Hkv`, a row per KV head of every layer.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

SLOT_FIELDS = ("positions", "token_ids", "sources", "units", "serials", "brightness")
"""The fields that make up the memory (saved with it)."""
STEP_FIELDS = ("mass", "last_mass")
"""This forward's attention mass (all rows, and the last row), summed over layers: not saved."""
_FLOAT_FIELDS = ("brightness", *STEP_FIELDS)
_FILLS = {"token_ids": -1, "units": -1}


class SlotStore:
    """K/V and per-slot buffers of `capacity` slots.

    Args:
        num_layers, num_kv_heads, head_dim: K/V shape; dtype: K/V dtype; device: where everything lives.
        capacity: C, slots per buffer.
        groups: None (fields [C], one slot order for every layer) or L (fields [L, C], one per layer).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int, groups: int | None = None):
        self.kv_shape = (num_layers, 2, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.lead = () if groups is None else (int(groups),)  # leading shape of every per-slot field
        self.extra: dict[str, tuple[torch.dtype, object]] = {}  # fields added by policies: dtype, fill
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        """Fresh buffers of `capacity` slots (plain tensors even under inference_mode)."""
        layers, two, heads, dim = self.kv_shape
        with torch.inference_mode(False):
            self.kv = torch.zeros(layers, two, heads, capacity, dim, dtype=self.dtype, device=self.device)
            self.fields = {name: torch.full((*self.lead, capacity), _FILLS.get(name, 0),
                                            dtype=torch.float32 if name in _FLOAT_FIELDS else torch.int64,
                                            device=self.device) for name in (*SLOT_FIELDS, *STEP_FIELDS)}
            for name, (dtype, fill) in self.extra.items():
                self.fields[name] = torch.full((*self.lead, capacity), fill, dtype=dtype, device=self.device)
        # (keys, values) views [Hkv, C, D] of each layer, made once: a decode step indexes them on every layer
        self.layer_kv = [(self.kv[layer, 0], self.kv[layer, 1]) for layer in range(layers)]

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    def clear_extra(self) -> None:
        """Refill the fields added by policies with their fill value (a reset cache restarts serials at 0, so a
        policy's state keyed by serial would otherwise carry over)."""
        for name, (_, fill) in self.extra.items():
            self.fields[name].fill_(fill)

    def add_field(self, name: str, dtype: torch.dtype, fill=0) -> None:
        """Add a per-slot field [C] ([L, C] with groups) filled with `fill`, that moves with its slots."""
        if name in self.fields:
            raise ValueError(f"slot field {name!r} already exists")
        self.extra[name] = (dtype, fill)
        self.fields[name] = torch.full((*self.lead, self.capacity), fill, dtype=dtype, device=self.device)

    def grow(self, needed: int, n: int) -> None:
        """Reallocate to `needed` slots, keeping the first `n`."""
        old_fields, old_kv = self.fields, self.kv
        log.info("HaloCache: growing from %d to %d slots for one oversized forward", self.capacity, needed)
        self._allocate(needed)
        with torch.inference_mode(False):
            self.kv[:, :, :, :n] = old_kv[:, :, :, :n]
            for name, tensor in old_fields.items():
                self.fields[name][..., :n] = tensor[..., :n]

    def state_dict(self, n: int) -> dict:
        """CPU copies of the first `n` slots: `kv` [L, 2, Hkv, n, D] and `slots` {field: [n] or [L, n]} (no step
        fields)."""
        return {"kv": self.kv[:, :, :, :n].detach().to("cpu").contiguous(),
                "slots": {name: t[..., :n].detach().to("cpu").contiguous() for name, t in self.fields.items()
                          if name not in STEP_FIELDS}}

    def check_state(self, state: dict, n: int) -> None:
        """ValueError naming the first way `state` does not fit these buffers with `n` slots."""
        expected = {name: t for name, t in self.fields.items() if name not in STEP_FIELDS}
        if set(state["slots"]) != set(expected):
            raise ValueError(f"saved per-slot fields {sorted(state['slots'])} differ from {sorted(expected)}")
        layers, two, heads, dim = self.kv_shape
        shape = (layers, two, heads, n, dim)
        if tuple(state["kv"].shape) != shape:
            raise ValueError(f"saved K/V have shape {tuple(state['kv'].shape)}, expected {shape}")
        if state["kv"].dtype != self.dtype:
            raise ValueError(f"saved K/V are {state['kv'].dtype}; the cache holds {self.dtype}")
        for name, tensor in state["slots"].items():
            if tuple(tensor.shape) != (*self.lead, n):
                raise ValueError(f"saved slot field {name!r} has shape {tuple(tensor.shape)}, expected "
                                 f"{(*self.lead, n)}")
            if tensor.dtype != expected[name].dtype:
                raise ValueError(f"saved slot field {name!r} is {tensor.dtype}, expected {expected[name].dtype}")

    def load_state_dict(self, state: dict, n: int) -> None:
        """Copy a checked `state_dict(n)` into the first `n` slots (growing when needed)."""
        if n > self.capacity:
            self.grow(n, 0)
        self.kv[:, :, :, :n] = state["kv"].to(self.device)
        for name, tensor in state["slots"].items():
            self.fields[name][..., :n] = tensor.to(self.device)
