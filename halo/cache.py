"""HaloCache: a fixed-budget transformers Cache whose tokens live and die by brightness.

Storage is preallocated: one buffer `kv` of shape [L, 2, Hkv, C, D] (C = budget + chunk_size slots) and
per-slot tensors of shape [C] on the same device: `positions` (int64 absolute position), `token_ids` (int64),
`sources` (int64 source code, see HaloConfig.source_code), `units` (int64 line-unit id, -1 for plain tokens),
`serials` (int64 birth order, breaks position ties between marker tokens) and `brightness` (float32).
Retained slots are always `0 .. n_valid - 1`; a forward writes its T new tokens to slots `n_valid ..` and,
after the last layer, brightness is updated, the cache is culled back to the budget and compacted in place.

Positions keep counting (RoPE uses the true positions): `get_seq_length()` is the number of positions used so
far, not the number retained. The cache holds one conversation: batch size 1.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from . import capture, ops
from .config import HaloConfig
from .cull import select_victims
from .journal import Journal
from .policy import CullPolicy, HaloPolicy

log = logging.getLogger(__name__)

SLOT_FIELDS = ("positions", "token_ids", "sources", "units", "serials", "brightness")
# This forward's attention mass (all rows, and the last row), summed over layers; moved with the slots so
# policies may read it after a cull.
STEP_FIELDS = ("mass", "last_mass")


class HaloLayer(CacheLayerMixin):
    """One layer's view of the shared HaloCache buffers."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, cache: "HaloCache", layer_idx: int):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        """Buffers are preallocated by the cache."""

    @property
    def keys(self):
        return self.cache.kv[self.layer_idx, 0, None, :, : self.cache.n_valid]

    @keys.setter
    def keys(self, value):
        if value is not None:
            raise AttributeError("HaloCache buffers are fixed; write through update()")

    @property
    def values(self):
        return self.cache.kv[self.layer_idx, 1, None, :, : self.cache.n_valid]

    @values.setter
    def values(self, value):
        if value is not None:
            raise AttributeError("HaloCache buffers are fixed; write through update()")

    def update(self, key_states, value_states, *args, **kwargs):
        return self.cache.layer_update(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.n_valid + query_length, self.cache.seen - self.cache.n_valid

    def get_seq_length(self) -> int:
        return self.cache.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.layer_idx == 0:
            self.cache.reset()

    def reorder_cache(self, beam_idx) -> None:
        raise ValueError("HaloCache holds one conversation; beam search is not supported")


@dataclass
class _Forward:
    """Bookkeeping of the forward in flight."""

    n_past: int
    t_rows: int
    service: bool  # marker / KV-patch forwards: no brightness update, no cull, positions given
    patch_slots: torch.Tensor | None = None  # int64 [k] slots whose K/V the last k rows recompute in place
    layers_captured: int = 0
    t_start: float = 0.0
    brightness_done: bool = False  # the fused kernel applied the update with the last layer's mass


class HaloCache(Cache):
    """Fixed-budget KV cache with brightness, cull, compaction and a journal.

    Args:
        model: a transformers causal LM; passing it sizes the buffers and switches on the attention capture.
        config: HaloConfig (default: HaloConfig()).
        policy: cull policy (default: HaloPolicy, brightness with the dark-region bias).
        num_layers, num_kv_heads, head_dim, dtype, device: buffer shape when no model is given.
    """

    def __init__(self, model=None, config: HaloConfig | None = None, *, policy: CullPolicy | None = None,
                 num_layers=None, num_kv_heads=None, head_dim=None, dtype=None, device=None):
        self.config = config or HaloConfig()
        self.config.validate()
        if model is not None:
            mc = model.config
            num_layers = num_layers or mc.num_hidden_layers
            num_kv_heads = num_kv_heads or getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
            head_dim = head_dim or getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
            param = next(model.parameters())
            dtype = dtype or param.dtype
            device = device or param.device
            capture.enable_capture(model)
        if None in (num_layers, num_kv_heads, head_dim):
            raise ValueError("HaloCache needs a model, or num_layers, num_kv_heads and head_dim")
        self.num_layers, self.num_kv_heads, self.head_dim = int(num_layers), int(num_kv_heads), int(head_dim)
        self.dtype = dtype or torch.float32
        self.device = torch.device(device or "cpu")
        super().__init__(layers=[HaloLayer(self, i) for i in range(self.num_layers)])
        self.policy = policy or HaloPolicy()
        # True: the last layer's attention closes each forward (plain `model.generate` needs the cache up to date
        # when the model returns). A driver that calls finish_forward itself once the model returns (Session)
        # sets False, so that an exception anywhere in the forward can drop it with abort_forward.
        self.closes_in_attention = True
        self.default_source = "user"
        self.journal = Journal(self.config.source_names, skip_source=self.config.source_code("marker"))
        self._extra_fields: list[str] = []
        self._allocate(self.config.budget + self.config.chunk_size)
        self.reset()
        self.policy.attach(self)

    # ----------------------------------------------------------------- storage
    def _allocate(self, capacity: int) -> None:
        with torch.inference_mode(False):  # plain tensors even when a forward under inference_mode grows them
            self._allocate_buffers(capacity)

    def _allocate_buffers(self, capacity: int) -> None:
        dev = self.device
        self.capacity = capacity
        self.kv = torch.zeros(self.num_layers, 2, self.num_kv_heads, capacity, self.head_dim, dtype=self.dtype, device=dev)
        self.positions = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.token_ids = torch.full((capacity,), -1, dtype=torch.int64, device=dev)
        self.sources = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.units = torch.full((capacity,), -1, dtype=torch.int64, device=dev)
        self.serials = torch.zeros(capacity, dtype=torch.int64, device=dev)
        self.brightness = torch.zeros(capacity, dtype=torch.float32, device=dev)
        self.mass = torch.zeros(capacity, dtype=torch.float32, device=dev)
        self.last_mass = torch.zeros(capacity, dtype=torch.float32, device=dev)
        policies = list(self.config.sources.values())
        self.initial_table = torch.tensor([p.initial for p in policies], dtype=torch.float32, device=dev)
        self.decay_table = torch.tensor([0.0 if p.pinned else p.decay for p in policies], dtype=torch.float32, device=dev)
        self.pinned_table = torch.tensor([p.pinned for p in policies], dtype=torch.bool, device=dev)

    def add_slot_field(self, name: str, dtype: torch.dtype, fill=0) -> torch.Tensor:
        """Add a per-slot tensor [C] that compaction moves with the slots (for policies that keep state)."""
        if hasattr(self, name):
            raise ValueError(f"slot field {name!r} already exists")
        tensor = torch.full((self.capacity,), fill, dtype=dtype, device=self.device)
        setattr(self, name, tensor)
        self._extra_fields.append(name)
        return tensor

    @property
    def slot_tensors(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in (*SLOT_FIELDS, *STEP_FIELDS, *self._extra_fields)]

    def _grow(self, needed: int) -> None:
        """Reallocate for a single forward larger than the headroom (e.g. a long prompt given to generate)."""
        names = (*SLOT_FIELDS, *self._extra_fields)
        old = {name: getattr(self, name) for name in names}
        old_kv, n = self.kv, self.n_valid
        log.info("HaloCache: growing from %d to %d slots for one oversized forward", self.capacity, needed)
        self._allocate(needed)
        with torch.inference_mode(False):
            self.kv[:, :, :, :n] = old_kv[:, :, :, :n]
            for name, tensor in old.items():
                fresh = torch.zeros(needed, dtype=tensor.dtype, device=tensor.device)
                fresh[:n] = tensor[:n]
                setattr(self, name, fresh)

    def reset(self) -> None:
        """Forget everything (journal included); buffers are kept."""
        self.n_valid = 0
        self.seen = 0
        self.layout_version = 0  # bumped whenever slots move (compaction), so holders of slot indices can tell
        self.conversation = getattr(self, "conversation", -1) + 1  # bumped by every reset
        self.steps = 0
        self.next_serial = 0
        self.next_unit = 0
        self.unit_slots = 0
        self.halo_seconds = 0.0
        self.culled_units: list[tuple[int, int, int]] = []
        self.step_evicted: list[tuple[torch.Tensor, torch.Tensor]] = []  # (positions, brightness) this step
        self.protect_markers_from = None
        self._forward: _Forward | None = None
        self._staged = None
        self.journal.clear()

    # ------------------------------------------------------------ the forward
    def stage(self, token_ids: torch.Tensor, source: str, units: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, visible: torch.Tensor | None = None,
              patch_slots: torch.Tensor | None = None) -> None:
        """Describe the next forward's tokens (Session does this; plain `generate` relies on defaults).

        Args:
            token_ids: int64 [T] ids about to be fed.
            source: source name of these tokens.
            units: int64 [T] line-unit ids (-1 for plain tokens), or None.
            positions: int64 [T] explicit positions (service forwards: markers, KV patches); None continues
                the stream at `seen`. A forward with explicit positions neither updates brightness nor culls.
            visible: bool [T, n_valid + T], which slots each row may attend to (service forwards).
            patch_slots: int64 [k] distinct retained slots whose K/V this forward recomputes (repair KV patches).
                The forward then has T + k rows: the T new tokens first, then one row per patch slot carrying
                the slot's token (already in `token_ids`) at the slot's position. A patch row attends to the
                retained slots before its position and to its own slot; its K/V are written into that slot in
                place before the layer's attention, so the new rows (and later patches) see the patched K/V.
                Patch rows add no slots, earn no brightness and are left out of the attention mass.
        """
        code = self.config.source_code(source)
        if patch_slots is not None and visible is not None:
            raise ValueError("stage(): patch_slots and visible cannot be combined")
        self._staged = (token_ids, code, units, positions, visible, patch_slots)

    def owns(self, layer_idx: int, key: torch.Tensor) -> bool:
        f = self._forward
        return f is not None and key.data_ptr() == self.kv[layer_idx, 0].data_ptr() and key.shape[-2] == f.n_past + f.t_rows

    def _begin_forward(self, key_states: torch.Tensor) -> None:
        if self._forward is not None:  # a forward that never reached its last layer
            self.finish_forward()
        b, hkv, t_rows, d = key_states.shape
        if b != 1:
            raise ValueError(f"HaloCache holds one conversation (batch size 1); got batch size {b}")
        if hkv != self.num_kv_heads or d != self.head_dim:
            raise ValueError(f"key states of shape {tuple(key_states.shape)} do not match the cache's "
                             f"{self.num_kv_heads} KV heads of dim {self.head_dim}")
        if key_states.dtype != self.dtype or key_states.device != self.device:
            raise ValueError(f"key states are {key_states.dtype} on {key_states.device}; the cache holds "
                             f"{self.dtype} on {self.device}")
        staged = self._staged or (None, self.config.source_code(self.default_source), None, None, None, None)
        token_ids, code, units, positions, visible, patch_slots = staged
        self._staged = None
        n = self.n_valid
        k = 0 if patch_slots is None else patch_slots.numel()
        t_rows -= k
        if t_rows < 0:
            raise ValueError(f"a forward of {t_rows + k} rows cannot carry {k} KV patches")
        hooked = capture.take_input_ids()
        if token_ids is None and hooked is not None and hooked.shape == (1, t_rows):
            token_ids = hooked[0]
        if n + t_rows > self.capacity:
            self._grow(n + t_rows)
        new = slice(n, n + t_rows)
        service = positions is not None
        if positions is None:
            positions = torch.arange(self.seen, self.seen + t_rows, device=self.device)
        self.positions[new] = positions.to(self.device)
        self.token_ids[new] = token_ids.to(self.device) if token_ids is not None else -1
        self.sources[new] = code
        self.units[new] = units.to(self.device) if units is not None else -1
        self.serials[new] = torch.arange(self.next_serial, self.next_serial + t_rows, device=self.device)
        self.brightness[new] = self.initial_table[code]
        self.mass[: n + t_rows].zero_()
        self.last_mass[: n + t_rows].zero_()
        if k:
            visible = self._patch_visibility(n, t_rows, patch_slots)
            service = service or t_rows == 0
        self._visible = visible
        self._forward = _Forward(n, t_rows, service, patch_slots if k else None, t_start=time.perf_counter())
        if not service:
            self.step_evicted = []
        self._new_unit_tokens = t_rows if (units is not None) else 0

    def _patch_visibility(self, n_past: int, t_rows: int, patch_slots: torch.Tensor) -> torch.Tensor:
        """bool [T + k, n_past + T]: new rows causal as usual; patch rows see earlier positions and their own slot."""
        k = patch_slots.numel()
        visible = torch.zeros(t_rows + k, n_past + t_rows, dtype=torch.bool, device=self.device)
        visible[:t_rows] = self._causal_visibility(n_past, t_rows)
        patch_positions = self.positions[patch_slots]
        visible[t_rows:, :n_past] = self.positions[:n_past][None, :] < patch_positions[:, None]
        visible[torch.arange(t_rows, t_rows + k, device=self.device), patch_slots] = True
        return visible

    def layer_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write this forward's K/V for one layer into the buffers; return the visible [1, Hkv, n+T, D] views."""
        if layer_idx == 0:
            self._begin_forward(key_states)
        f = self._forward
        k = 0 if f is None or f.patch_slots is None else f.patch_slots.numel()
        if f is None or key_states.shape[-2] != f.t_rows + k:
            raise RuntimeError(f"HaloCache: layer {layer_idx} updated outside a forward that began at layer 0")
        end = f.n_past + f.t_rows
        self.kv[layer_idx, 0, :, f.n_past:end] = key_states[0, :, : f.t_rows]
        self.kv[layer_idx, 1, :, f.n_past:end] = value_states[0, :, : f.t_rows]
        if k:
            self.kv[layer_idx, 0].index_copy_(1, f.patch_slots, key_states[0, :, f.t_rows:])
            self.kv[layer_idx, 1].index_copy_(1, f.patch_slots, value_states[0, :, f.t_rows:])
        capture.set_active(self, layer_idx)
        return self.kv[layer_idx, 0, None, :, :end], self.kv[layer_idx, 1, None, :, :end]

    def attention_mask(self) -> torch.Tensor | None:
        """The mask this forward's attention uses, in slot space: None (plain causal) or bool [1, 1, T, n+T]."""
        f = self._forward
        if self._visible is not None:
            return self._visible[None, None]
        if f.n_past == 0 or f.t_rows == 1:
            return None  # SDPA's is_causal (prefill from empty) or no mask (one row sees everything)
        return self._causal_visibility(f.n_past, f.t_rows)[None, None]

    def _causal_visibility(self, n_past: int, t_rows: int) -> torch.Tensor:
        """bool [T, n_past + T]: new row t sees every retained slot and the new rows up to itself."""
        cols = torch.arange(n_past + t_rows, device=self.device)
        return cols[None, :] <= n_past + torch.arange(t_rows, device=self.device)[:, None]

    def capture_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Accumulate one layer's attention mass; after the last layer, close the forward."""
        f = self._forward
        if not f.service and self.policy.needs_attention:
            t0 = time.perf_counter()
            if f.patch_slots is not None:
                query = query[:, : f.t_rows]  # patch rows earn nothing
            if layer_idx == self.num_layers - 1 and ops.use_kernels(self):
                f.layers_captured += 1
                n = f.n_past + f.t_rows
                ops.attention_column_mass_and_update(self, query, key, scaling, f.n_past, self.mass,
                                                     self.brightness, self.decay_table[self.sources[:n]],
                                                     self.config.alpha, f.layers_captured, self.last_mass)
                f.brightness_done = True
            else:
                ops.attention_column_mass(self, query, key, scaling, f.n_past, self.mass, self.last_mass)
                f.layers_captured += 1
            self.halo_seconds += time.perf_counter() - t0
        if layer_idx == self.num_layers - 1:
            capture.clear_active()
            if self.closes_in_attention:
                self.finish_forward()

    def abort_forward(self) -> None:
        """Drop the forward in flight without committing it: its new slots stay free, nothing is culled.

        Patch rows may have overwritten some layers of their slots' K/V; their owner recomputes them.
        """
        self._forward = None
        self._staged = None
        capture.clear_active()

    def finish_forward(self) -> None:
        """Close the forward in flight (idempotent): brightness update, then cull to budget and compact."""
        f = self._forward
        if f is None:
            return
        self._forward = None
        t0 = time.perf_counter()
        self.n_valid = f.n_past + f.t_rows
        self.next_serial += f.t_rows
        self.unit_slots += self._new_unit_tokens
        if f.service:
            self.halo_seconds += time.perf_counter() - t0
            return
        self.seen += f.t_rows
        self.steps += 1
        if f.layers_captured and not f.brightness_done:
            decay = self.decay_table[self.sources[: self.n_valid]]
            ops.update_brightness(self, self.brightness, self.mass, decay, f.n_past, f.t_rows,
                                  self.config.alpha, f.layers_captured)
        self.policy.observe(self, f.n_past, f.t_rows)
        self.cull()
        self.halo_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ cull
    def protected_mask(self) -> torch.Tensor:
        """bool [n_valid]: sinks, the recent window, pinned sources, and markers placed in the current settle."""
        n, cfg = self.n_valid, self.config
        pos = self.positions[:n]
        protected = (pos < cfg.sink_tokens) | (pos >= self.seen - cfg.recent_tokens) | self.pinned_table[self.sources[:n]]
        if self.protect_markers_from is not None:
            protected |= self.serials[:n] >= self.protect_markers_from
        return protected

    def cull(self) -> int:
        """Evict down to the budget (and, with cull_threshold, every unprotected token that dimmed to it).

        Plain tokens take the device path (fixed victim count, no host sync). When line units are retained the
        unit-aware host path runs: a unit scores as its brightest token and dies whole. Returns slots evicted.
        """
        need = self.n_valid - self.config.budget
        if need <= 0 and self.config.cull_threshold is None:
            return 0
        if self.unit_slots > 0 or self.config.cull_threshold is not None:
            return self._cull_host(max(need, 0))
        victims = ops.select_victims(self, self.policy.scores(self), self.positions, self.protected_mask(), self.n_valid, need)
        self.evict(victims)
        return need

    def _cull_host(self, need: int) -> int:
        n = self.n_valid
        scores = self.policy.scores(self).clone()
        protected = self.protected_mask()
        units = self.units[:n]
        in_unit = units >= 0
        brightness = self.brightness[:n].clone()
        if bool(in_unit.any()):
            ids, inverse = torch.unique(units[in_unit], return_inverse=True)
            best = torch.full((ids.numel(),), float("-inf"), device=self.device).scatter_reduce(0, inverse, scores[in_unit], "amax")
            brightest = torch.zeros(ids.numel(), device=self.device).scatter_reduce(0, inverse, brightness[in_unit], "amax")
            guarded = torch.zeros(ids.numel(), dtype=torch.bool, device=self.device).scatter_reduce(0, inverse, protected[in_unit], "amax")
            scores[in_unit] = best[inverse]
            brightness[in_unit] = brightest[inverse]
            protected[in_unit] = guarded[inverse]
        ranked = select_victims(scores, self.positions, protected, n, n)  # every slot, dying order first
        ranked_l, units_l = ranked.tolist(), units.tolist()
        protected_l, bright_l = protected.tolist(), brightness.tolist()
        members: dict[int, list[int]] = {}
        for slot, unit in enumerate(units_l):
            if unit >= 0:
                members.setdefault(unit, []).append(slot)
        threshold = self.config.cull_threshold
        chosen: list[int] = []
        taken: set[int] = set()
        for slot in ranked_l:
            if protected_l[slot]:
                break  # protected slots rank last
            neglected = threshold is not None and bright_l[slot] <= threshold
            if len(chosen) >= need and not neglected:
                if threshold is None:
                    break
                continue
            unit = units_l[slot]
            if unit < 0:
                chosen.append(slot)
            elif unit not in taken:
                taken.add(unit)
                chosen.extend(members[unit])
        if len(chosen) < need:
            raise RuntimeError(f"cannot cull {need} tokens: only {len(chosen)} are unprotected")
        if not chosen:
            return 0
        marker = self.config.source_code("marker")
        sources_l = self.sources[:n].tolist()
        positions_l = self.positions[:n].tolist()
        for unit in taken:
            slots = members[unit]
            if sources_l[slots[0]] != marker:
                pos = [positions_l[s] for s in slots]
                self.culled_units.append((unit, min(pos), max(pos)))
        self.unit_slots -= sum(len(members[u]) for u in taken)
        self.evict(torch.tensor(chosen, dtype=torch.int64, device=self.device))
        return len(chosen)

    def evict(self, victims: torch.Tensor) -> None:
        """Journal and compact away `victims` (int64 [k] distinct retained slots)."""
        k = victims.numel()
        if k == 0:
            return
        self.journal.record(self.positions[victims], self.token_ids[victims], self.sources[victims],
                            self.brightness[victims], self.steps)
        self.step_evicted.append((self.positions[victims].clone(), self.brightness[victims].clone()))
        self.layout_version += 1
        self.n_valid = ops.compact(self, self.kv, self.slot_tensors, victims, self.n_valid)

    def evict_units(self, unit_ids: list[int]) -> None:
        """Evict every retained slot of the given units (host path; used to merge elision markers)."""
        if not unit_ids:
            return
        wanted = torch.tensor(sorted(unit_ids), dtype=torch.int64, device=self.device)
        victims = torch.isin(self.units[: self.n_valid], wanted).nonzero().flatten()
        self.unit_slots -= victims.numel()
        self.evict(victims)

    def new_unit_ids(self, count: int) -> torch.Tensor:
        ids = torch.arange(self.next_unit, self.next_unit + count, dtype=torch.int64)
        self.next_unit += count
        return ids

    # -------------------------------------------------------------- reading
    def snapshot(self) -> dict[str, torch.Tensor]:
        """Retained slots sorted by position (ties by birth), as CPU tensors keyed like the slot fields."""
        n = self.n_valid
        serial_order = torch.sort(self.serials[:n]).indices
        order = serial_order[torch.sort(self.positions[:n][serial_order], stable=True).indices]
        return {name: getattr(self, name)[:n][order].cpu() for name in SLOT_FIELDS}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def __repr__(self) -> str:
        return (f"HaloCache(retained={self.n_valid}, budget={self.config.budget}, seen={self.seen}, "
                f"layers={self.num_layers}, evicted={len(self.journal)})")
