"""RecallMemory: the per-layer and per-head caches' side of recall (HaloConfig.recall): the archive it fills, the
tokens it takes back, their grace period, and the state it saves.

Filling: when a retrieval layer evicts text tokens, their keys at that layer go into `archive`
(halo.archive.RecallArchive; with memory positions derotated to position 0, and rotated to their present ranks,
`archived_rope`, when scored). The archive has one ring per row of the slot fields that belongs to a retrieval
layer: per layer, the layer's row with every KV head's key; per KV head (`halo.head_cache`, which evicts head by
head), row `l * Hkv + h` with head h's key alone, scored by that head's own query heads. Scoring happens inside
the cache's stream forwards of a recall source. Taking back is driven from outside (halo.recall.Recall): it runs
a service forward that writes the archived tokens as new slots at their original positions, then calls
`adopt_recalled`.
"""

from __future__ import annotations

import torch

from .archive import RecallArchive
from .layer_cull import pack_rows
from .policy import restart_refilled

_ARCHIVED_FIELDS = ("serials", "positions", "token_ids", "sources", "units")
# held reads: each slot's mean read and how many forwards scored it (as the archive's usual scores), and its owner
_READ_FIELDS = (("read_usual", torch.float32, 0.0), ("read_scored", torch.float32, 0.0),
                ("read_owner", torch.int64, -1))


class RecallMemory:
    """Mixin of LayeredHaloCache (uses its slot store, counters, journal and `token_view`)."""

    archive: RecallArchive | None = None
    """The archive of evicted keys at the retrieval layers, or None when recall is off."""

    def _reset_recall(self) -> None:
        cfg = self.config
        self._grace: list[tuple[int, int, int]] = []  # recalled serials [first, stop) protected while seen < until
        self._recalled = torch.zeros(0, dtype=torch.int64, device=self.device)  # serials born by recall
        if cfg.recall and self.archive is None:
            layers, per = cfg.recall_layer_indices(self.num_layers), self.rows_per_layer
            # one ring per row of a retrieval layer; per KV head a ring keeps that head's key alone
            self.archive = RecallArchive(tuple(layer * per + h for layer in layers for h in range(per)),
                                         cfg.recall_capacity, self.num_kv_heads // per, self.head_dim, self.dtype,
                                         self.device, inv_freq=self._inv_freq,  # memory positions: at position 0
                                         discount=cfg.recall_discount, history=cfg.recall_history)
            self._recall_sources = {cfg.source_code(name) for name in cfg.recall_sources}
            if cfg.held_reads:
                for name, dtype, fill in _READ_FIELDS:
                    self.add_slot_field(name, dtype, fill)
        elif self.archive is not None:
            self.archive.clear()

    def scores_recall(self, source: int, rows: int, layer_idx: int) -> bool:
        """Whether a stream forward of `source` with `rows` query rows scores the archive at layer `layer_idx`."""
        return (self.archive is not None and source in self._recall_sources and rows >= self.config.recall_min_rows
                and layer_idx * self.rows_per_layer in self.archive.ring_of)  # the layer's first row has a ring

    def _score_archive(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Score the rings of layer `layer_idx` with this forward's rows (query [Hq, T, D], key [Hkv, >= n + T, D],
        each row's own retained slots first, then its new rows; the step's column mass already in `mass`). Per
        KV head each ring is read by its own GQA group of query heads against its own slots."""
        per = self.rows_per_layer
        q_heads, k_heads = query.shape[0] // per, key.shape[0] // per
        fields = self._store.fields
        partial = None
        if self.config.held_reads:
            restart_refilled(self, "read_owner", "read_usual", "read_scored")  # another token took the slot
            partial = self._partial_slots()
        for h in range(per):
            row = layer_idx * per + h
            n = self._counts[row]
            held = None
            usual = None
            if partial is not None:  # a held slot is a candidate only while some row lacks its token
                held = {name: fields[name][row, :n] for name in _ARCHIVED_FIELDS}
                usual = (fields["read_usual"][row, :n], fields["read_scored"][row, :n])
                held["serials"] = torch.where(partial[row, :n], held["serials"], -1)
            self.archive.score(row, query[h * q_heads:(h + 1) * q_heads], key[h * k_heads:(h + 1) * k_heads],
                               scaling, n, self.config.recall_heads, self.backend, fields["mass"][row],
                               self.archived_rope, held, usual)

    def _partial_slots(self) -> torch.Tensor:
        """bool [rows, n_valid]: the held slots whose text token (not a marker) some rows lack. No host read: one
        count by serial (the new rows a forward in flight wrote past a row's count are not held)."""
        n, held = self._n_valid, self._held()
        index = torch.where(held, self.serials[:, :n] + 1, 0)
        count = torch.zeros(self._next_serial + 1, dtype=torch.int64, device=self.device).index_add_(
            0, index.flatten(), held.flatten().long())
        return held & (count[index] < self.num_rows) & (self.sources[:, :n] != self.config.source_code("marker"))

    def displaced_priority(self, most: int, priority: torch.Tensor) -> torch.Tensor:
        """float32 [<= most]: the source priority (`priority`: float32 per source code) of what recalled tokens
        would push out. Entry j is the median over rows (layers, or KV heads) of the priority of each row's (j+1)-th
        next victim (the slots it could evict now, lowest policy score first; +inf where a row has fewer); it ends
        where most rows have no more. One host read."""
        scores = self.policy.scores(self).masked_fill(self.protected_mask(), float("inf"))
        low = torch.topk(scores, min(most, scores.shape[1]), dim=1, largest=False)
        ranks = priority.to(self.device)[self.sources.gather(1, low.indices)]
        ranks = ranks.masked_fill(low.values.isinf(), float("inf")).median(dim=0).values.cpu()
        return ranks[torch.isfinite(ranks)]

    def _protect_graced(self, protected: torch.Tensor) -> torch.Tensor:
        """`protected` [L, n] with the recalled tokens still in their grace period added, unless that would leave
        some layer fewer unprotected slots than it must free to reach the budget: the budget wins over a grace
        period (a recall near the protected set's size, with markers being placed, could otherwise block the cull)."""
        n = protected.shape[1]
        self._grace = [grace for grace in self._grace if self._seen < grace[2]]
        if not self._grace:
            return protected
        graced = protected.clone()
        for first, stop, _ in self._grace:
            graced |= (self.serials[:, :n] >= first) & (self.serials[:, :n] < stop)
        need = (self._counts_t - self.config.budget).clamp(min=0)
        return protected if bool(((~graced).sum(1) < need).any()) else graced

    def _archive_victims(self, victims: torch.Tensor) -> None:
        """Put the keys of the retrieval layers' victims (int64 [rows, k], -1 padded; text tokens, not markers) into
        the archive, before compaction moves them (with memory positions, with the `rope` they carry, by which the
        archive derotates them)."""
        fields, marker = self._store.fields, self.config.source_code("marker")
        per = self.rows_per_layer
        heads = self.num_kv_heads // per
        for row in self.archive.layers:
            layer, h = divmod(row, per)
            cols = victims[row][victims[row] >= 0]
            cols = cols[fields["sources"][row, cols] != marker]
            rope = fields["rope"][row, cols] if self._inv_freq is not None else None
            self.archive.add(row, self._store.layer_kv[layer][0][h * heads:(h + 1) * heads, cols],
                             {name: fields[name][row, cols] for name in _ARCHIVED_FIELDS}, rope)

    def adopt_recalled(self, first_serial: int, old_serials: torch.Tensor, sources: torch.Tensor,
                       brightness: torch.Tensor) -> None:
        """Finish a recall forward whose k new slots, born from `first_serial`, hold archived tokens in the order of
        `old_serials` (int64 [k], their serials before eviction): give them their sources (int64 [k]) and
        brightness (float32 [k]) in every layer, protect them for `recall_grace` fed positions (ending the grace of
        any earlier recall), journal them as "recalled" and drop them from the archive."""
        k, n = old_serials.numel(), self._n_valid
        fields = self._store.fields
        serials = fields["serials"][:, :n]
        born = (serials >= first_serial) & (serials < first_serial + k)
        index = (serials - first_serial).clamp(0, k - 1)
        fields["sources"][:, :n] = torch.where(born, sources.to(self.device)[index], fields["sources"][:, :n])
        fields["brightness"][:, :n] = torch.where(born, brightness.to(self.device)[index],
                                                  fields["brightness"][:, :n])
        # only the newest recall is protected: the protected set stays below the budget (HaloConfig.validate)
        self._grace = [(first_serial, first_serial + k, self._seen + self.config.recall_grace)]
        self._recalled = torch.cat([self._recalled, torch.arange(first_serial, first_serial + k, device=self.device)])
        self._slots_changed()
        view = self.token_view()
        mine = (view.serials >= first_serial) & (view.serials < first_serial + k)
        self.journal.record(view.positions[mine], view.token_ids[mine], view.sources[mine], view.brightness[mine],
                            self._steps, kind="recalled")
        self.archive.drop(old_serials)

    def evict_serials(self, serials: torch.Tensor):
        """Evict the tokens of these serials (int64 [k]) from every layer holding them (Eviction of those that
        die, journaled)."""
        n = self._n_valid
        return self._evict(pack_rows(self._held() & torch.isin(self.serials[:, :n], serials.to(self.device))))[0]

    def recalled_mask(self, serials: torch.Tensor) -> torch.Tensor:
        """bool [k]: which of these serials were born by recall."""
        return torch.isin(serials, self._recalled.to(serials.device))

    # ---------------------------------------------------------- persistence
    def _recall_state(self) -> dict:
        return {"archive": self.archive.state_dict(), "grace": [list(g) for g in self._grace],
                "recalled": self._recalled.cpu()}

    def _with_read_fields(self, state: dict) -> dict:
        """`state` with the held-read fields this cache keeps and the file lacks (saved before held reads) added as
        no history: those slots' usual reads start afresh."""
        slots = state["slots"]
        missing = [(name, dtype, fill) for name, dtype, fill in _READ_FIELDS
                   if name in self._store.fields and name not in slots]
        if not missing or "serials" not in slots:
            return state
        shape = tuple(slots["serials"].shape)
        return {**state, "slots": {**slots, **{name: torch.full(shape, fill, dtype=dtype)
                                               for name, dtype, fill in missing}}}

    def _check_recall_state(self, state: dict) -> None:
        """ValueError when the saved recall state does not fit this cache (nothing is changed)."""
        recall = state.get("recall")
        if (recall is not None) != (self.archive is not None):
            raise ValueError("saved memory and this cache disagree on recall (HaloConfig.recall)")
        if recall is None:
            return
        counters = state["counters"]
        self.archive.check_state(recall["archive"], next_serial=int(counters["next_serial"]),
                                 seen=int(counters["seen"]))
        recalled = recall["recalled"]
        if not isinstance(recalled, torch.Tensor) or recalled.dim() != 1 or recalled.dtype != torch.int64:
            raise ValueError("saved recalled serials must be an int64 vector")
        if any(len(g) != 3 for g in recall["grace"]):
            raise ValueError(f"saved grace periods must be [first, stop, until] triples, got {recall['grace']}")

    def _load_recall_state(self, state: dict) -> None:
        recall = state.get("recall")
        if recall is None:
            return
        counters = state["counters"]
        self.archive.load_state_dict(recall["archive"], next_serial=int(counters["next_serial"]),
                                     seen=int(counters["seen"]))
        self._grace = [tuple(int(x) for x in g) for g in recall["grace"]]
        self._recalled = recall["recalled"].to(self.device)
