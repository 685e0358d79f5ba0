"""LayeredHaloCache: per-layer memory. Every layer keeps the tokens it attends to.

`HaloConfig(granularity="layer")`. The K/V buffers are those of HaloCache ([L, 2, Hkv, C, D]) but every per-slot
field is [L, C]: row l lists layer l's own slots (positions, token ids, sources, units, serials, brightness, the
step's attention mass), in its own slot order. Each layer's brightness is fed by that layer's attention alone
(the token-level rule with num_layers = 1), and after every stream forward each layer culls its own dimmest
units down to the budget and is compacted in place by its own victims. Units die whole within a layer.

Token-level meaning stays exact: a token is *remembered* while any layer holds it and goes to the journal when
the last layer drops it, so remembered tokens + journal = fed. `snapshot()` lists the remembered tokens with
how many layers hold each (`layers`) and their brightness averaged over those layers. Layers may hold fewer
than `budget` slots for a while (a whole unit freed more than was needed): `layer_length(l)` is layer l's
count, `n_valid` the largest. A layer's slots past its own count are free (position FREE_POSITION, serial and
unit -1).

With HaloConfig.recall, the retrieval layers' evicted keys go into an archive that every stream forward of a
recall source scores (halo.recall_memory, halo.recall).
"""

from __future__ import annotations

import torch

from .brightness import value_norms, value_weights_rows
from .cache import HaloCache
from .cull import unit_runs
from .cull_ops import select_word_victims_layers
from .forward import CullResult, Eviction, ForwardSpec, causal_mask, visible_before
from .layer_cull import FREE_POSITION, pack_rows, position_order_layers, select_unit_victims_layers
from .recall_memory import RecallMemory
from .token_view import TokenView


class LayeredHaloCache(RecallMemory, HaloCache):
    """HaloCache with one retained token set per layer (HaloConfig.granularity == "layer"); same arguments.

    Cull policies see [L, n] per-slot fields (`cache.brightness[:, :n]`, ...) and return [L, n] scores;
    `protected_mask()` is [L, n] with each layer's free slots protected. Repair works on `token_view()`, one
    entry per remembered token: a repaired token's id changes in every layer that holds it, and its patch row
    recomputes its K/V in each of those layers against that layer's own retained tokens before it.
    """

    per_layer = True
    granularity = "layer"
    """The HaloConfig.granularity this class serves (the constructor refuses any other)."""

    @property
    def num_rows(self) -> int:
        """Rows of the per-slot fields, each one retained token set: one per layer."""
        return self.num_layers

    @property
    def rows_per_layer(self) -> int:
        """Rows of the per-slot fields each layer owns (1; per KV head, Hkv: rows l * Hkv to (l + 1) * Hkv - 1)."""
        return self.num_rows // self.num_layers

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.config.granularity != self.granularity:  # the config's refusals are keyed on its granularity
            raise ValueError(f"{type(self).__name__} serves granularity {self.granularity!r}, but the config says "
                             f"{self.config.granularity!r}; build the cache with HaloCache(model, config)")
        if self.config.value_weight:  # each slot's value norm, written with its K/V (HaloConfig.value_weight)
            self.add_slot_field("value_norm", torch.float32, 0.0)

    def reset(self) -> None:
        """Forget everything (journal included); buffers are kept."""
        super().reset()
        self._counts = [0] * self.num_rows
        self._counts_t = torch.zeros(self.num_rows, dtype=torch.int64, device=self.device)
        self._units_seen = False
        self._order: torch.Tensor | None = None  # position_order(), kept until the slots change
        self._tokens: dict[str, torch.Tensor] | None = None  # _remembered(), the same
        self._patches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (slots, patch rows)
        self._clear_free(self.capacity)
        self._reset_recall()

    # ------------------------------------------------------------ counters
    def layer_length(self, layer_idx: int) -> int:
        """Retained slots of layer `layer_idx`."""
        return self._counts[layer_idx]

    @property
    def layer_counts(self) -> torch.Tensor:
        """int64 [rows] retained slots per row: per layer, or per KV head of every layer (a copy)."""
        return self._counts_t.clone()

    def _slots_changed(self) -> None:
        """Forget what was derived from the slots (position order, the remembered tokens)."""
        self._order = self._tokens = None

    def position_order(self) -> torch.Tensor:
        """int64 [L, n_valid]: each layer's slots in position order, free slots last (kept until slots change)."""
        if self._order is None or self._order.shape[1] != self._n_valid:
            self._order = position_order_layers(self.positions[:, : self._n_valid])
        return self._order

    # ------------------------------------------------------------ the forward
    def _write_new_slots(self, spec: ForwardSpec) -> None:
        if self._capacity_seen != self.capacity:  # the buffers grew: their new slots are free
            self._clear_free(self.capacity)
        self._patches = None if spec.patch_slots is None else self._patch_targets(spec.patch_slots)
        t_rows, layers = spec.new_rows, self.num_rows
        idx = self._counts_t[:, None] + torch.arange(t_rows, device=self.device)[None, :]  # [L, T]
        units = spec.units if spec.units is not None else torch.full((t_rows,), -1, device=self.device)
        serials = torch.arange(self._next_serial, self._next_serial + t_rows, device=self.device)
        values = {"positions": spec.position_ids[:t_rows], "token_ids": spec.input_ids[:t_rows],
                  "sources": torch.full((t_rows,), spec.source, device=self.device), "units": units,
                  "serials": serials, "brightness": self._initial[spec.source].expand(t_rows)}
        rope = self._new_rope(t_rows)
        if rope is not None:
            values["rope"] = rope
        fields = self._store.fields
        for name, value in values.items():
            fields[name].scatter_(1, idx, value.to(fields[name].dtype)[None, :].expand(layers, t_rows))
        fields["mass"][:, : self._n_valid + t_rows].zero_()
        fields["last_mass"][:, : self._n_valid + t_rows].zero_()
        if spec.units is not None:
            self._units_seen = True

    def _patch_targets(self, patch_slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per row: (its slots holding the patched tokens, the patch rows that write them), from view slots."""
        wanted = self.token_view().serials[patch_slots]
        targets = []
        for row in range(self.num_rows):
            match = self.serials[row, : self._counts[row], None] == wanted[None, :]  # [n_r, k]
            targets.append(torch.nonzero(match, as_tuple=True))
        return targets

    def layer_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        views = super().layer_update(layer_idx, key_states, value_states)
        if self.config.value_weight:
            n_past, t_rows = self._counts[layer_idx], self._flight.spec.new_rows
            norms = value_norms(value_states[0, :, :t_rows])
            self._store.fields["value_norm"][layer_idx, n_past:n_past + t_rows] = norms
        return views

    def _write_patches(self, layer_idx: int, keys_new: torch.Tensor, values_new: torch.Tensor) -> None:
        slots, rows = self._patches[layer_idx]
        keys, values = self._store.layer_kv[layer_idx]
        keys.index_copy_(1, slots, keys_new[:, rows])
        values.index_copy_(1, slots, values_new[:, rows])
        if self.config.value_weight:
            self._store.fields["value_norm"][layer_idx].index_copy_(0, slots, value_norms(values_new[:, rows]))

    def attention_mask(self, layer_idx: int = 0) -> torch.Tensor | None:
        spec = self._flight.spec
        if spec.visible is not None:
            return self._row_visibility(layer_idx, spec)[None, None]
        return causal_mask(self._counts[layer_idx], spec.new_rows, self.device)

    def _row_visibility(self, row: int, spec: ForwardSpec) -> torch.Tensor:
        """bool [R, n + T] of a forward with a custom visibility, for one row (a layer, or a KV head) holding n
        slots: its retained slots before each row's horizon (a patch row also sees its own slot), then the new
        rows as the spec says."""
        if spec.horizon is None:
            raise ValueError(f"a per-{self.granularity} cache needs ForwardSpec.horizon with a custom visibility")
        retained = visible_before(self.positions[row, : self._counts[row]], spec.horizon)
        if self._patches is not None:
            slots, rows = self._patches[row]
            retained[spec.new_rows + rows, slots] = True
        return torch.cat([retained, spec.visible[:, spec.n_past:]], dim=1)

    def _accumulate(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float, last: bool,
                    value: torch.Tensor | None = None) -> torch.Tensor | None:
        fields = self._store.fields
        out = self._column_mass(layer_idx, query, key, scaling, value)
        if self.scores_recall(self._flight.spec.source, query.shape[1], layer_idx):
            self._score_archive(layer_idx, query, key, scaling)
        if self.config.value_weight:  # after recall's bar, which reads the attention alone
            self._weigh_mass(layer_idx, query.shape[1])
        if last:
            width = self._n_valid + query.shape[1]
            self.backend.update_brightness_layers(fields["brightness"][:, :width], fields["mass"][:, :width],
                                                  self._decay[fields["sources"][:, :width]], self._counts_t,
                                                  query.shape[1], self.config.alpha)
        return out

    def _weigh_mass(self, layer_idx: int, t_rows: int) -> None:
        """HaloConfig.value_weight: weigh each row of this layer's mass (its held slots and the new rows) by
        `value_weights` of the row's value norms (`value_weights_rows`: every row of the layer in one pass)."""
        fields, rows = self._store.fields, slice(layer_idx * self.rows_per_layer, (layer_idx + 1) * self.rows_per_layer)
        width = max(self._counts[rows]) + t_rows
        ends = self._counts_t[rows] + t_rows
        fields["mass"][rows, :width] *= value_weights_rows(fields["value_norm"][rows, :width], ends,
                                                           self.config.value_weight)

    def _column_mass(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float,
                     value: torch.Tensor | None = None) -> torch.Tensor | None:
        """Add one layer's attention mass (query [Hq, T, D], key [Hkv, N, D]) to its rows of the step fields; with
        `value` (a decode row, halo.decode_attention.fuses) return the row's attention output [Hq, D] too."""
        mass, last_mass = self._store.fields["mass"], self._store.fields["last_mass"]
        if value is None:
            return self.backend.attention_column_mass(query, key, scaling, self._counts[layer_idx], mass[layer_idx],
                                                      last_mass[layer_idx])
        rows = slice(layer_idx * self.rows_per_layer, (layer_idx + 1) * self.rows_per_layer)
        counts = self._counts_t[rows].expand(self.num_kv_heads)  # per layer: its one count for every KV head
        return self.backend.decode_attention(query[:, 0], key, value, scaling, counts, mass[rows], last_mass[rows])

    def abort_forward(self) -> None:
        """Drop the forward in flight without committing it; the slots it wrote become free again."""
        super().abort_forward()
        self._patches = None
        self._slots_changed()
        self._clear_free(self.capacity)

    def _clear_free(self, width: int) -> None:
        """Mark the free slots among the first `width` of every layer: position FREE_POSITION, serial and unit -1."""
        self._capacity_seen = self.capacity
        free = torch.arange(width, device=self.device)[None, :] >= self._counts_t[:, None]
        self.positions[:, :width].masked_fill_(free, FREE_POSITION)
        self.serials[:, :width].masked_fill_(free, -1)
        self.units[:, :width].masked_fill_(free, -1)

    def _count_new_slots(self, spec: ForwardSpec) -> None:
        self._slots_changed()
        self._counts = [c + spec.new_rows for c in self._counts]
        self._counts_t += spec.new_rows
        self._n_valid = max(self._counts)

    # ------------------------------------------------------------------ cull
    def protected_mask(self, protect_serials_from: int | None = None) -> torch.Tensor:
        """bool [L, n_valid]: free slots, sinks, the recent window, pinned sources, slots born at or after a serial."""
        n, cfg = self._n_valid, self.config
        pos = self.positions[:, :n]
        free = torch.arange(n, device=self.device)[None, :] >= self._counts_t[:, None]
        protected = free | (pos < cfg.sink_tokens) | (pos >= self._seen - cfg.recent_tokens)
        protected |= self._pinned[self.sources[:, :n]]
        if protect_serials_from is not None:
            protected |= self.serials[:, :n] >= protect_serials_from
        return self._protect_graced(protected)

    def cull(self, protect_serials_from: int | None = None) -> CullResult:
        """Every layer evicts down to the budget (and, with cull_threshold, the unprotected units that dimmed to
        it). Tokens no layer holds any more go to the journal; line units no layer holds are returned as runs."""
        budget, n = self.config.budget, self._n_valid
        if max(self._counts) <= budget and self.config.cull_threshold is None:
            return CullResult()
        need = (self._counts_t - budget).clamp(min=0)
        scores = self.policy.scores(self)
        protected = self.protected_mask(protect_serials_from)
        if self._units_seen or self.config.cull_threshold is not None or len(set(self._counts)) > 1:
            args = (self.brightness[:, :n], protected, self.units[:, :n], need, self.config.cull_threshold)
            victims = select_word_victims_layers(scores, self.position_order(), *args)
            if victims is None:  # some layer must cut protected units: the general path
                victims = select_unit_victims_layers(scores, self.positions[:, :n], *args)
        else:
            victims = self.backend.select_victims_layers(scores, self.positions[:, :n], protected,
                                                         max(self._counts) - budget)
        if victims.numel() == 0:
            return CullResult()
        gone, runs = self._evict(victims)
        return CullResult([gone], runs)

    def _compact(self, victims: torch.Tensor) -> torch.Tensor:
        """Evict every row's `victims` from the K/V and the slot fields in place; returns the new row counts."""
        return self.backend.compact_layers_(self._store.kv, list(self._store.fields.values()), victims, self._counts_t)

    def evict(self, victims: torch.Tensor) -> Eviction:
        """Evict each row's `victims` (int64 [rows, k], -1 padded) and compact; returns the tokens no row holds now."""
        return self._evict(victims)[0]

    def _evict(self, victims: torch.Tensor) -> tuple[Eviction, list[tuple[int, int, int]]]:
        n, fields = self._n_valid, self._store.fields
        self._slots_changed()
        taken = victims >= 0
        rows = torch.arange(self.num_rows, device=self.device)[:, None].expand_as(victims)[taken]
        cols = victims[taken]
        left = {name: fields[name][rows, cols] for name in ("serials", "positions", "token_ids", "sources", "units",
                                                            "brightness")}
        if self.archive is not None:
            self._archive_victims(victims)
        self._counts_t = self._compact(victims)
        self._clear_free(n)
        self._counts = self._counts_t.tolist()
        self._n_valid = max(self._counts)
        # a token dies when the last layer holding it lets go (several layers may drop it in the same cull)
        held = torch.zeros(self._next_serial + 1, dtype=torch.bool, device=self.device)  # by serial + 1 (free: -1)
        held[fields["serials"][:, :n].flatten() + 1] = True  # one scatter, where isin sorts every held serial
        dead = ~held[left["serials"] + 1]
        if not bool(dead.any()):  # every victim still lives in some other layer
            nothing = left["positions"][:0]
            return Eviction(nothing, left["token_ids"][:0], left["brightness"][:0]), []
        serials, first = torch.unique(left["serials"][dead], return_inverse=True)
        pick = torch.zeros(serials.numel(), dtype=torch.int64, device=self.device).scatter_(
            0, first, torch.nonzero(dead).flatten())
        died = {name: value[pick] for name, value in left.items()}
        self.journal.record(died["positions"], died["token_ids"], died["sources"], died["brightness"], self._steps)
        gone = Eviction(died["positions"], died["token_ids"], died["brightness"])
        return gone, unit_runs(died["units"], died["positions"], died["sources"], self._line_sources)

    def evict_units(self, unit_ids: list[int]) -> Eviction:
        """Evict every slot of the given units from every layer (merging elision markers)."""
        wanted = torch.tensor(sorted(unit_ids), dtype=torch.int64, device=self.device)
        n = self._n_valid
        held = torch.arange(n, device=self.device)[None, :] < self._counts_t[:, None]
        return self._evict(pack_rows(held & torch.isin(self.units[:, :n], wanted)))[0]

    def replace_tokens(self, slots: torch.Tensor, new_ids: torch.Tensor) -> None:
        """Write repaired token ids at `slots` of `token_view()` (int64 [k]) into every layer holding those tokens;
        the old ones go to the journal as "replaced" (once per token); patch rows then recompute their K/V."""
        view = self.token_view()
        self.journal.record(view.positions[slots], view.token_ids[slots], view.sources[slots],
                            view.brightness[slots], self._steps, kind="replaced")
        n = self._n_valid
        match = self.serials[:, :n, None] == view.serials[slots][None, None, :]  # [L, n, k]
        hit = match.any(-1)
        self.token_ids[:, :n][hit] = new_ids.to(self.device)[match.long().argmax(-1)[hit]]
        self._slots_changed()

    def slot_of_position(self) -> dict[int, int]:
        """position -> slot of `token_view()` of every remembered token."""
        return self.token_view().slot_of_position()

    # -------------------------------------------------------------- reading
    def retained_visibility(self, horizon: torch.Tensor, own_slots: torch.Tensor | None = None) -> torch.Tensor:
        """bool [R, n_valid], all False: each row builds its own retained columns from ForwardSpec.horizon."""
        return torch.zeros(horizon.numel(), self._n_valid, dtype=torch.bool, device=self.device)

    def remembered_count(self) -> int:
        """Tokens some layer holds (markers included)."""
        return int(torch.unique(self.serials[:, : self._n_valid][self._held()]).numel())

    def count_source(self, code: int) -> int:
        """Remembered tokens (held by some layer) of source `code`."""
        n = self._n_valid
        mine = self._held() & (self.sources[:, :n] == code)
        return int(torch.unique(self.serials[:, :n][mine]).numel())

    def _held(self) -> torch.Tensor:
        """bool [L, n_valid]: the slots each layer holds."""
        return torch.arange(self._n_valid, device=self.device)[None, :] < self._counts_t[:, None]

    _held_slots = _held

    def _remembered(self) -> dict[str, torch.Tensor]:
        """Each remembered token once, ordered by birth (device tensors, read-only): its slot fields, `brightness`
        averaged over the layers holding it and `layers` (int64, how many); kept until the slots change."""
        if self._tokens is not None:
            return self._tokens
        n = self._n_valid
        held = self._held()
        flat = {name: self._store.fields[name][:, :n][held] for name in
                ("positions", "token_ids", "sources", "units", "serials", "brightness")}
        serials, inverse = torch.unique(flat["serials"], return_inverse=True)
        count = torch.zeros(serials.numel(), dtype=torch.int64, device=self.device).index_add_(
            0, inverse, torch.ones_like(inverse))
        total = torch.zeros(serials.numel(), dtype=torch.float32, device=self.device).index_add_(
            0, inverse, flat["brightness"])
        first = torch.zeros(serials.numel(), dtype=torch.int64, device=self.device).scatter_(
            0, inverse, torch.arange(inverse.numel(), device=self.device))
        out = {name: flat[name][first] for name in ("positions", "token_ids", "sources", "units", "serials")}
        out["brightness"], out["layers"] = total / count, count
        self._tokens = out
        return out

    def token_view(self) -> TokenView:
        """Each remembered token once (ordered by birth), brightness averaged over the layers that hold it;
        protected: sinks, the recent window and pinned sources."""
        cfg, tokens = self.config, self._remembered()
        positions, sources = tokens["positions"], tokens["sources"]
        protected = ((positions < cfg.sink_tokens) | (positions >= self._seen - cfg.recent_tokens)
                     | self._pinned[sources])
        return TokenView(positions, tokens["token_ids"], tokens["brightness"], sources, tokens["serials"], protected,
                         int(positions.numel()))

    def snapshot(self) -> dict[str, torch.Tensor]:
        """The remembered tokens (held by at least one layer) sorted by position (ties by birth), as CPU tensors:
        the slot fields, `brightness` averaged over the layers holding the token, and `layers` (int64, how many)."""
        tokens = self._remembered()
        order = torch.sort(tokens["positions"], stable=True).indices
        return {name: value[order].cpu() for name, value in tokens.items()}

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """HaloCache.state_dict() with [L, n] slot fields and `layer_counts`; with recall, the archive, the grace
        periods and the serials born by recall."""
        state = {**super().state_dict(), "layer_counts": list(self._counts)}
        if self.archive is not None:
            state["recall"] = self._recall_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = self._with_read_fields(state)
        counts = state.get("layer_counts")
        if not isinstance(counts, list) or len(counts) != self.num_rows:
            raise ValueError(f"saved {self.config.granularity}-level memory needs layer_counts for {self.num_rows} "
                             "retained token sets")
        if max(counts) != int(state["counters"]["n_valid"]) or min(counts) < 0:
            raise ValueError(f"saved layer_counts {counts} do not match n_valid {state['counters']['n_valid']}")
        self._check_recall_state(state)
        super().load_state_dict(state)
        self._load_recall_state(state)
        self._counts = [int(c) for c in counts]
        self._counts_t = torch.tensor(self._counts, dtype=torch.int64, device=self.device)
        self._clear_free(self.capacity)
        self._slots_changed()
        self._units_seen = bool((self.units[:, : self._n_valid] >= 0).any())


HaloCache.granularity_classes["layer"] = LayeredHaloCache
