"""HaloCache: a fixed-budget transformers Cache whose tokens live and die by brightness.

Storage is preallocated (halo.slots): K/V [L, 2, Hkv, C, D] (C = budget + chunk_size) and per-slot tensors [C].
Retained slots are always `0 .. n_valid - 1`; a forward writes its T new tokens to slots `n_valid ..` and, after
the last layer, brightness is updated, the cache is culled back to the budget and compacted in place. The
buffers are the cache's own: read them through the properties, change them through the methods.

A driver describes each forward with a `ForwardSpec` and runs it with `run(spec, forward)`, which returns a
`StepResult` (see halo.forward); without one (plain `model.generate`) the cache makes the default spec itself
and closes each forward when the last layer's attention has run. Positions keep counting and RoPE sees them
(or, with memory positions, ranks: halo.memory_positions); `get_seq_length()` counts them. Batch size 1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from . import capture
from .backend import select_backend
from .cache_layer import HaloLayer
from .config import HaloConfig
from .cull import select_unit_victims, unit_runs
from .forward import CullResult, Eviction, ForwardSpec, StepResult, causal_mask, default_spec
from .inputs import check_key_states
from .journal import Journal
from .memory_positions import MemoryPositions
from .policy import CullPolicy, HaloPolicy
from .retained import RetainedReader
from .slots import SlotStore

COUNTERS = ("n_valid", "seen", "steps", "next_serial", "next_unit", "unit_slots")


@dataclass
class _Flight:
    """The forward in flight: its spec and the layers whose attention mass it has captured."""
    spec: ForwardSpec
    layers_captured: int = 0


def _slot_property(name: str, doc: str):
    return property(lambda self: self._store.fields[name], doc=doc)


class HaloCache(MemoryPositions, RetainedReader, Cache):
    """Fixed-budget KV cache with brightness, cull, compaction and a journal, one token set for every layer.
    `HaloCache(model, config)` with `config.granularity == "layer"` builds a `halo.layered_cache.LayeredHaloCache`
    (one token set per layer) instead, with "head" a `halo.head_cache.HeadHaloCache` (one per KV head).

    Args:
        model: a transformers causal LM; passing it sizes the buffers and switches on the attention capture.
        config: HaloConfig (default: HaloConfig()).
        policy: cull policy (default: HaloPolicy, brightness with the dark-region bias).
        num_layers, num_kv_heads, head_dim, dtype, device: buffer shape when no model is given.
        default_source: source name of tokens fed by forwards that no driver describes (plain `generate`).
    """

    positions = _slot_property("positions", "int64 [C] absolute position of each slot (first n_valid retained).")
    token_ids = _slot_property("token_ids", "int64 [C] token id of each slot (the text mirror; -1 unknown).")
    sources = _slot_property("sources", "int64 [C] source code of each slot.")
    units = _slot_property("units", "int64 [C] unit id of each slot (-1: a plain token).")
    serials = _slot_property("serials", "int64 [C] birth order of each slot.")
    brightness = _slot_property("brightness", "float32 [C] brightness of each slot, in [0, 255].")
    mass = _slot_property("mass", "float32 [C] the last stream forward's attention mass, summed over layers.")
    last_mass = _slot_property("last_mass", "float32 [C] the same for the forward's last query row only.")

    per_layer = False
    """False: every layer holds the same slots (per-slot fields [C]); True in LayeredHaloCache (fields [L, C])."""

    granularity_classes: dict[str, type] = {}
    """The class `HaloCache(...)` builds per granularity other than "token" (each registers itself)."""

    def __new__(cls, model=None, config: HaloConfig | None = None, **kwargs):
        if cls is HaloCache:  # one memory per layer, or per KV head
            cls = HaloCache.granularity_classes.get((config or HaloConfig()).granularity, HaloCache)
        return super().__new__(cls)

    def __init__(self, model=None, config: HaloConfig | None = None, *, policy: CullPolicy | None = None,
                 num_layers=None, num_kv_heads=None, head_dim=None, dtype=None, device=None, default_source="user"):
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
        self.backend = select_backend(self.config.kernels, self.device)
        self.policy = policy or HaloPolicy()
        self.config.source_code(default_source)  # an unknown name fails here, not in the first forward
        self._default_source = default_source
        self.journal = Journal(self.config.source_names, skip_source=self.config.source_code("marker"))
        self._store = SlotStore(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device,
                                self.config.budget + self.config.chunk_size,
                                groups=self.num_rows if self.per_layer else None)
        self._init_memory_positions(model)
        policies = list(self.config.sources.values())
        self._initial = torch.tensor([p.initial for p in policies], dtype=torch.float32, device=self.device)
        self._decay = torch.tensor([0.0 if p.pinned else p.decay for p in policies], dtype=torch.float32,
                                   device=self.device)
        self._pinned = torch.tensor([p.pinned for p in policies], dtype=torch.bool, device=self.device)
        self._line_sources = set(self.config.line_source_codes())
        self._reset_count = -1  # reset() counts itself
        self.reset()
        self.policy.attach(self)

    # ----------------------------------------------------------------- storage
    kv = property(lambda self: self._store.kv,
                  doc="[L, 2, Hkv, C, D] K/V buffers of every layer (slots 0 .. n_valid - 1 retained).")
    capacity = property(lambda self: self._store.capacity,
                        doc="C, the slots every buffer holds (budget + chunk_size, more after an oversized forward).")

    def add_slot_field(self, name: str, dtype: torch.dtype, fill=0) -> None:
        """Add a per-slot tensor [C] that compaction moves with the slots (for policies that keep state)."""
        self._store.add_field(name, dtype, fill)

    def slot_field(self, name: str) -> torch.Tensor:
        """The per-slot tensor [C] named `name` (a built-in field or one added by `add_slot_field`)."""
        return self._store.fields[name]

    def reset(self) -> None:
        """Forget everything (journal included); buffers are kept."""
        self._n_valid = self._seen = self._steps = self._next_serial = self._next_unit = 0
        self._unit_slots = 0  # retained slots that belong to units: while > 0 the unit-aware cull runs
        self._halo_seconds = 0.0
        self._reset_count += 1
        self._spec: ForwardSpec | None = None  # made by a driver, taken by layer 0
        self._driven = False  # inside run(): the driver commits, not the last layer
        self._flight: _Flight | None = None
        self.last_result: StepResult | None = None  # of the last forward committed
        self.journal.clear()
        self._store.clear_extra()

    # ------------------------------------------------------------ counters
    n_valid = property(lambda self: self._n_valid, doc="Retained slots (0 .. n_valid - 1).")
    seen = property(lambda self: self._seen, doc="Positions used by the stream so far (fed tokens).")
    steps = property(lambda self: self._steps, doc="Stream forwards closed so far.")
    next_serial = property(lambda self: self._next_serial, doc="Birth serial the next new slot gets.")
    halo_seconds = property(lambda self: self._halo_seconds, doc="Time in brightness, cull, compaction, fused decode.")
    reset_count = property(lambda self: self._reset_count, doc="How many times reset() has emptied the cache.")
    current_spec = property(lambda self: self._flight.spec if self._flight is not None else self._spec,
                            doc="The ForwardSpec of the forward prepared or in flight, or None.")
    in_forward = property(lambda self: self._flight is not None or self._spec is not None,
                          doc="True while a forward is prepared or running.")

    # ------------------------------------------------------------ the forward
    def run(self, spec: ForwardSpec, forward):
        """Run `forward()` (a model call over `spec.input_ids` at `spec.position_ids` with this cache) under
        `spec`; returns (its output, the StepResult). If it raises (e.g. KeyboardInterrupt) the forward is
        dropped uncommitted: its new slots stay free, nothing is culled, no counter moves. Patch rows may have
        overwritten some layers of their slots' K/V by then; the driver recomputes them.
        """
        if self.in_forward:
            raise RuntimeError("HaloCache.run: another forward is in flight")
        if spec.n_past != self._n_valid:
            raise ValueError(f"ForwardSpec was made for {spec.n_past} retained slots; the cache holds {self._n_valid}")
        self._spec, self._driven = spec, True
        try:
            output = forward()
            if self._flight is None:
                raise RuntimeError("HaloCache.run: the forward never updated the cache")
        except BaseException:
            self.abort_forward()
            raise
        finally:
            self._driven = False
        return output, self._commit()

    def _enter_layer(self, layer_idx: int, key_states: torch.Tensor) -> _Flight:
        """The forward in flight at `layer_idx`, checked against its key states; layer 0 begins it."""
        if layer_idx > 0:
            if self._flight is None or key_states.shape[-2] != self._flight.spec.rows:
                raise RuntimeError(f"HaloCache: layer {layer_idx} updated outside a forward that began at layer 0")
            return self._flight
        if self._flight is not None:  # an undriven forward that never reached its last layer
            self._commit()
        rows = check_key_states(key_states, self.num_kv_heads, self.head_dim, self.dtype, self.device)
        hooked = capture.take_input_ids()
        spec, self._spec = self._spec or default_spec(self, rows, hooked, self._default_source), None
        if spec.rows != rows:
            raise ValueError(f"the forward has {rows} rows but its ForwardSpec describes {spec.rows}")
        n, t_rows = self._n_valid, spec.new_rows
        if n + t_rows > self.capacity:
            self._store.grow(n + t_rows, n)
        self._write_new_slots(spec)
        self._flight = _Flight(spec)
        return self._flight

    def _write_new_slots(self, spec: ForwardSpec) -> None:
        """Fill the per-slot fields of the forward's new slots and clear the step fields."""
        n, t_rows = self._n_valid, spec.new_rows
        new = slice(n, n + t_rows)
        slots = self._store.fields
        slots["positions"][new] = spec.position_ids[:t_rows]
        slots["token_ids"][new] = spec.input_ids[:t_rows]
        slots["sources"][new] = spec.source
        slots["units"][new] = spec.units if spec.units is not None else -1
        slots["serials"][new] = torch.arange(self._next_serial, self._next_serial + t_rows, device=self.device)
        slots["brightness"][new] = self._initial[spec.source]
        self._store_new_rope(new, t_rows)
        slots["mass"][: n + t_rows].zero_()
        slots["last_mass"][: n + t_rows].zero_()

    def layer_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write this forward's K/V for one layer into the buffers; return the visible [1, Hkv, n+T, D] views."""
        f = self._enter_layer(layer_idx, key_states)
        n_past, t_rows, patches = self.layer_length(layer_idx), f.spec.new_rows, f.spec.patch_slots
        end, (keys, values) = n_past + t_rows, self._store.layer_kv[layer_idx]
        keys[:, n_past:end], values[:, n_past:end] = key_states[0, :, :t_rows], value_states[0, :, :t_rows]
        if patches is not None:
            self._write_patches(layer_idx, key_states[0, :, t_rows:], value_states[0, :, t_rows:])
        capture.set_active(self, layer_idx)
        return keys[None, :, :end], values[None, :, :end]

    def _write_patches(self, layer_idx: int, keys_new: torch.Tensor, values_new: torch.Tensor) -> None:
        """Write the patch rows' K/V [Hkv, k, D] of one layer into the patched slots."""
        keys, values = self._store.layer_kv[layer_idx]
        keys.index_copy_(1, self._flight.spec.patch_slots, keys_new)
        values.index_copy_(1, self._flight.spec.patch_slots, values_new)

    def holds_keys_of(self, layer_idx: int, key: torch.Tensor) -> bool:
        """True when `key` is this cache's key view for the forward in flight at `layer_idx`."""
        f = self._flight
        return (f is not None and key.data_ptr() == self._store.layer_kv[layer_idx][0].data_ptr()
                and key.shape[-2] == self.layer_length(layer_idx) + f.spec.new_rows)

    def layer_length(self, layer_idx: int) -> int:
        """Retained slots of layer `layer_idx` (every layer holds n_valid here)."""
        return self._n_valid

    def attention_mask(self, layer_idx: int = 0) -> torch.Tensor | None:
        """This forward's attention mask at a layer, in slot space: None (plain causal) or bool [1, 1, R, n+T]."""
        spec = self._flight.spec
        if spec.visible is not None:
            return spec.visible[None, None]
        return causal_mask(spec.n_past, spec.new_rows, self.device)

    def capture_layer(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float,
                      value: torch.Tensor | None = None) -> torch.Tensor | None:
        """Accumulate one layer's attention mass (the last layer also updates brightness); close an undriven forward
        after the last layer. With `value` (halo.decode_attention.fuses) return the row's output [Hq, D], else None."""
        f, last, out = self._flight, layer_idx == self.num_layers - 1, None
        if f.spec.streams and self.policy.needs_attention:
            t0 = time.perf_counter()
            f.layers_captured += 1
            query = query[:, : f.spec.new_rows]  # patch rows earn nothing
            out = self._accumulate(layer_idx, query, key, scaling, last, value)
            self._halo_seconds += time.perf_counter() - t0
        if last:
            capture.clear_active()
            if not self._driven:
                self._commit()
        return out

    def _accumulate(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float, last: bool,
                    value: torch.Tensor | None = None) -> torch.Tensor | None:
        """Add one layer's attention mass (with `value`, return the decode row's output); the last updates it."""
        spec, slots, out = self._flight.spec, self._store.fields, None
        mass, last_mass, alpha = slots["mass"], slots["last_mass"], self.config.alpha
        if value is not None:
            counts = torch.full((self.num_kv_heads,), spec.n_past, dtype=torch.int64)
            out = self.backend.decode_attention(query[:, 0], key, value, scaling, counts, mass[None], last_mass[None])
        if last:
            decay, layers = self._decay[slots["sources"][: spec.n_past + spec.new_rows]], self._flight.layers_captured
            if value is None:
                self.backend.attention_column_mass_and_update(query, key, scaling, spec.n_past, mass,
                                                              slots["brightness"], decay, alpha, layers, last_mass)
            else:
                self.backend.update_brightness(slots["brightness"], mass, decay, spec.n_past, 1, alpha, layers)
        elif value is None:
            self.backend.attention_column_mass(query, key, scaling, spec.n_past, mass, last_mass)
        return out

    def abort_forward(self) -> None:
        """Drop the forward in flight (or prepared) without committing it."""
        self._flight = self._spec = self._rope_rows = None
        capture.clear_active()

    def _commit(self) -> StepResult:
        """Close the forward in flight: count its slots; for a stream forward, cull to budget and compact."""
        f, self._flight = self._flight, None
        t0 = time.perf_counter()
        spec = f.spec
        self._count_new_slots(spec)
        self._next_serial += spec.new_rows
        if spec.units is not None:
            self._unit_slots += spec.new_rows
        result = StepResult(slots_written=(spec.n_past, self._n_valid), repaired_slots=spec.patch_slots,
                            streams=spec.streams)
        if spec.streams:
            self._seen += spec.new_rows
            self._steps += 1
            self.policy.observe(self, spec.n_past, spec.new_rows)
            result.extend(self.cull())
        self._halo_seconds += time.perf_counter() - t0
        self.last_result = result
        return result

    def _count_new_slots(self, spec: ForwardSpec) -> None:
        self._n_valid = spec.n_past + spec.new_rows

    # ------------------------------------------------------------------ cull
    def protected_mask(self, protect_serials_from: int | None = None) -> torch.Tensor:
        """bool [n_valid]: sinks, the recent window, pinned sources, and slots born at or after the given serial."""
        n, cfg = self._n_valid, self.config
        pos = self.positions[:n]
        protected = (pos < cfg.sink_tokens) | (pos >= self._seen - cfg.recent_tokens) | self._pinned[self.sources[:n]]
        if protect_serials_from is not None:
            protected |= self.serials[:n] >= protect_serials_from
        return protected

    def cull(self, protect_serials_from: int | None = None) -> CullResult:
        """Evict down to the budget (and, with cull_threshold, every unprotected token that dimmed to it). Plain
        tokens take the device path (fixed victim count, no host sync). When units are retained the unit-aware host
        path runs: a unit scores as its brightest token and dies whole."""
        need = self._n_valid - self.config.budget
        if need <= 0 and self.config.cull_threshold is None:
            return CullResult()
        if self._unit_slots > 0 or self.config.cull_threshold is not None:
            return self._cull_units(max(need, 0), protect_serials_from)
        victims = self.backend.select_victims(self.policy.scores(self), self.positions,
                                              self.protected_mask(protect_serials_from), self._n_valid, need)
        return CullResult([self.evict(victims)])

    def _cull_units(self, need: int, protect_serials_from: int | None) -> CullResult:
        n = self._n_valid
        victims = select_unit_victims(self.policy.scores(self), self.positions, self.brightness[:n],
                                      self.protected_mask(protect_serials_from), self.units[:n], need,
                                      self.config.cull_threshold)
        if victims.numel() == 0:
            return CullResult()
        runs = unit_runs(self.units[victims], self.positions[victims], self.sources[victims], self._line_sources)
        self._unit_slots -= int((self.units[victims] >= 0).sum())
        return CullResult([self.evict(victims)], runs)

    def evict(self, victims: torch.Tensor) -> Eviction:
        """Journal and compact away `victims` (int64 [k] distinct retained slots); returns what left."""
        gone = Eviction(self.positions[victims], self.token_ids[victims], self.brightness[victims])
        if victims.numel():
            self.journal.record(gone.positions, gone.token_ids, self.sources[victims], gone.brightness, self._steps)
            self._n_valid = self.backend.compact_(self._store.kv, list(self._store.fields.values()), victims,
                                                  self._n_valid)
        return gone

    def evict_units(self, unit_ids: list[int]) -> Eviction:
        """Evict every retained slot of the given units (host path; used to merge elision markers)."""
        wanted = torch.tensor(sorted(unit_ids), dtype=torch.int64, device=self.device)
        victims = torch.isin(self.units[: self._n_valid], wanted).nonzero().flatten()
        self._unit_slots -= victims.numel()
        return self.evict(victims)

    def new_unit_ids(self, count: int) -> torch.Tensor:
        """int64 [count] fresh unit ids (CPU), reserved for tokens about to be fed."""
        ids = torch.arange(self._next_unit, self._next_unit + count, dtype=torch.int64)
        self._next_unit += count
        return ids

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seen

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """The retained memory: CPU tensors `kv` [L, 2, Hkv, n, D], `slots` {field: [n]}, counters, policy, journal."""
        if self.in_forward:
            raise RuntimeError("cannot take the state of a HaloCache in the middle of a forward")
        return {**self._store.state_dict(self._n_valid),
                "counters": {name: int(getattr(self, "_" + name)) for name in COUNTERS},
                "halo_seconds": self._halo_seconds,
                "policy": getattr(self.policy, "name", type(self.policy).__name__),
                "journal": self.journal.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output; ValueError naming the first mismatch (the cache is left unchanged)."""
        n = int(state["counters"]["n_valid"])
        policy = getattr(self.policy, "name", type(self.policy).__name__)
        if state["policy"] != policy:
            raise ValueError(f"saved memory used cull policy {state['policy']!r}; this cache has {policy!r}")
        self._store.check_state(state, n)
        self.journal.load_state_dict(state["journal"])
        self._store.load_state_dict(state, n)
        for name in COUNTERS:
            setattr(self, "_" + name, int(state["counters"][name]))
        self._halo_seconds = float(state["halo_seconds"])

    def __repr__(self) -> str:
        return (f"HaloCache(retained={self._n_valid}, budget={self.config.budget}, seen={self._seen}, "
                f"layers={self.num_layers}, evicted={self.journal.count('evicted')})")
