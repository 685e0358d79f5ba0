"""RequestMemory: the Halo state of one request inside a vLLM worker (brightness, cull, compaction, journal).

The K/V live in vLLM's paged cache; this object keeps the per-slot fields Halo needs beside them, in the
request's own physical slot order (slot s is token s of the request's block table). Rows are layers when
`granularity == "layer"` (each layer ranks and culls its own slots, every layer evicting the same number, so
one block table still serves all layers) and a single row shared by every layer when `granularity == "token"`.
Every row holds `count` slots, and `count <= min(seen, budget)` after every step: equal to it with single-token
victims, up to a unit's length below it with whole units (see `victims` below); the scheduler reserves blocks for
`min(seen, budget)` (accounting.py), so the worker always fits.

One step: `begin_step` writes the new slots (logical positions, sources, units, initial brightness), the attention
wrapper calls `accumulate` once per layer with the query rows and the request's keys, and `end_step` applies the
brightness update and, over budget, picks the victims with halo's own rules, journals the tokens no row holds
any more and compacts the per-slot fields; it returns the slot moves the caller applies to the paged K/V.

Rules (the same functions as halo.layered_cache / halo.policy.HaloPolicy; the CPU paths of halo.backend):
    mass       halo.brightness.attention_column_mass's sum (per layer; summed over layers in token mode), computed
               by column_mass.column_mass: halo.decode_mass's C++ operator for a decode row, causal query blocks
               for a prefill chunk (the reference itself with kernels="reference")
    brightness halo.brightness.update_brightness_layers (layer) / update_brightness (token)
    score      halo.layer_cull.cull_scores_layers + SourcePolicy.priority of each slot's source; the tokens of a
               line (a prompt of a source in unit_sources) take their line's mean score (halo.cull.unit_means,
               HaloPolicy's default line_pooling="mean")
    units      words and lines (request_units.RequestUnits: halo.units.WordTracker, the line rule of
               halo.units.tokenize_lines); a unit scores as its best token, is protected whole when any of its
               tokens is, and dies whole
    protected  sinks (position < sink_tokens), the recent window (position >= seen - recent_tokens), pinned sources
    victims    with units: unit_cull.equal_unit_victims (halo.layer_cull.select_word_victims_layers' dying order,
               every row freeing the same count K >= count - budget, so a row may end a few slots under the
               budget: the shortfall, refilled by the next steps); without units, or when whole units cannot
               give every row the same count (a budget too small for the protected set and the units at its
               edges): halo.layer_cull.select_victims_layers, k = count - budget single tokens per row
    moves      halo.compact.compaction_moves_layers
Elision markers (culled lines leave no marker), repair, recall and cull_threshold are not available here
(settings.check_servable refuses them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from halo.brightness import update_brightness, update_brightness_layers
from halo.compact import compaction_moves_layers
from halo.cull import unit_means
from halo.journal import Journal
from halo.layer_cull import FREE_POSITION, cull_scores_layers, position_order_layers, select_victims_layers

from .column_mass import column_mass
from .request_units import RequestUnits
from .settings import ServingConfig
from .unit_cull import equal_unit_victims


@dataclass(frozen=True)
class SlotMoves:
    """Physical slot moves of one eviction: int64 [R, k] `src` -> `dst` per row (src == dst: nothing to move)."""

    src: torch.Tensor
    dst: torch.Tensor
    per_layer: bool


class RequestMemory:
    """Per-slot Halo fields of one request's physical slots.

    Args:
        request_id: vLLM's request id (for errors and the journal file name).
        serving: the request's ServingConfig.
        num_layers: attention layers of the model.
        num_prompt_tokens: prompt length; positions below it are fed as `prompt_source`, the rest as `output_source`.
        tokenizer: the model's Hugging Face tokenizer (word and line units read its token tables); None is
            allowed when the settings give the request no units (request_units.needs_tokenizer).
        vocab_size: the model's vocabulary size (the token tables' length; read only with a tokenizer).
    """

    def __init__(self, request_id: str, serving: ServingConfig, num_layers: int, num_prompt_tokens: int,
                 tokenizer=None, vocab_size: int = 0):
        cfg = serving.halo
        self.request_id = request_id
        self.serving = serving
        self.config = cfg
        self.num_layers = num_layers
        self.per_layer = cfg.granularity == "layer"
        self.rows = num_layers if self.per_layer else 1
        self.num_prompt_tokens = num_prompt_tokens
        names = cfg.source_names
        self._prompt_code = cfg.source_code(serving.prompt_source)
        self._output_code = cfg.source_code(serving.output_source)
        self._initial = torch.tensor([cfg.sources[n].initial for n in names], dtype=torch.float32)
        self._decay = torch.tensor([0.0 if cfg.sources[n].pinned else cfg.sources[n].decay for n in names],
                                   dtype=torch.float32)
        self._priority = torch.tensor([cfg.sources[n].priority for n in names], dtype=torch.float32)
        self._pinned = torch.tensor([cfg.sources[n].pinned for n in names], dtype=torch.bool)
        self._in_lines = torch.tensor([n in cfg.unit_sources for n in names], dtype=torch.bool)
        self.unit_maker = RequestUnits(serving, num_prompt_tokens, tokenizer, vocab_size)
        self._units_seen = False  # whether any fed token belongs to a unit (then the whole-unit cull runs)
        self.reference = cfg.kernels == "reference"  # column mass by halo.brightness itself (column_mass.py)
        self.count = 0  # physical slots held (every row holds the same number)
        self.seen = 0  # logical tokens fed
        self.steps = 0
        self._rows_in_flight = 0
        self._capacity = 0
        self.positions = self.sources = self.units = self.brightness = self.mass = torch.empty(0)
        self._grow(max(64, cfg.budget + 1))
        self.token_ids = torch.zeros(max(64, num_prompt_tokens + 1), dtype=torch.int64)
        self.position_units = torch.full_like(self.token_ids, -1)  # unit id of each logical position
        self.held = torch.zeros_like(self.token_ids, dtype=torch.int32)  # rows holding each logical position
        self.journal = Journal(names)
        self.journal_path = None
        if serving.journal_dir:
            os.makedirs(serving.journal_dir, exist_ok=True)
            self.journal_path = os.path.join(serving.journal_dir, f"{_safe(request_id)}.jsonl")
            self.journal.open_sink(self.journal_path)

    # ------------------------------------------------------------ storage
    def _grow(self, capacity: int) -> None:
        """Make room for `capacity` slots per row, keeping what is stored."""
        if capacity <= self._capacity:
            return
        capacity = max(capacity, 2 * self._capacity)
        old = self._capacity

        def grown(tensor, fill, dtype):
            out = torch.full((self.rows, capacity), fill, dtype=dtype)
            if old:
                out[:, :old] = tensor
            return out

        self.positions = grown(self.positions, FREE_POSITION, torch.int64)
        self.sources = grown(self.sources, 0, torch.int64)
        self.units = grown(self.units, -1, torch.int64)
        self.brightness = grown(self.brightness, 0.0, torch.float32)
        self.mass = grown(self.mass, 0.0, torch.float32)
        self._capacity = capacity

    def _grow_logical(self, length: int) -> None:
        if length <= self.token_ids.numel():
            return
        size = max(length, 2 * self.token_ids.numel())
        extra = size - self.token_ids.numel()
        self.token_ids = torch.cat([self.token_ids, self.token_ids.new_zeros(extra)])
        self.position_units = torch.cat([self.position_units, self.position_units.new_full((extra,), -1)])
        self.held = torch.cat([self.held, self.held.new_zeros(extra)])

    # ------------------------------------------------------------ one step
    def begin_step(self, start: int, token_ids: torch.Tensor) -> None:
        """Write the slots of this step's T tokens (int64 [T]) at logical positions start .. start + T - 1."""
        if start != self.seen:
            raise RuntimeError(f"request {self.request_id}: vLLM schedules tokens from position {start} but its Halo "
                               f"memory has seen {self.seen}; the scheduler and the worker disagree")
        if self._rows_in_flight:
            raise RuntimeError(f"request {self.request_id}: begin_step called twice without end_step")
        t_rows = int(token_ids.numel())
        n = self.count + t_rows
        self._grow(n)
        self._grow_logical(start + t_rows)
        positions = torch.arange(start, start + t_rows, dtype=torch.int64)
        codes = torch.where(positions < self.num_prompt_tokens, self._prompt_code, self._output_code)
        self.positions[:, self.count:n] = positions
        self.sources[:, self.count:n] = codes
        self.brightness[:, self.count:n] = self._initial[codes]
        self.mass[:, :n] = 0.0
        token_ids = token_ids.to(torch.int64)
        units = self.unit_maker.units(start, token_ids)
        self.units[:, self.count:n] = units
        self._units_seen = self._units_seen or bool((units >= 0).any())
        self.position_units[start:start + t_rows] = units
        self.token_ids[start:start + t_rows] = token_ids
        self.held[start:start + t_rows] = self.rows
        self._rows_in_flight = t_rows

    def accumulate(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        """Add one layer's attention mass: query [Hq, T, D] of this step, key [Hkv, count + T, D] of the request."""
        row = layer if self.per_layer else 0
        column_mass(query, key, scaling, self.count, self.mass[row], reference=self.reference)

    def add_mass(self, layer: int, mass: torch.Tensor) -> None:
        """Add one layer's column mass computed elsewhere (float32 [count + T], e.g. a row of
        column_mass.decode_column_mass_batch)."""
        row = layer if self.per_layer else 0
        self.mass[row, : mass.numel()] += mass

    def end_step(self) -> SlotMoves | None:
        """Update brightness, cull to budget and compact the fields; returns the K/V slot moves, or None."""
        t_rows, n_past = self._rows_in_flight, self.count
        n = n_past + t_rows
        cfg = self.config
        b, m = self.brightness[:, :n], self.mass[:, :n]
        decay = self._decay[self.sources[:, :n]]
        if self.per_layer:
            update_brightness_layers(b, m, decay, torch.full((self.rows,), n_past, dtype=torch.int64), t_rows,
                                     cfg.alpha)
        else:
            update_brightness(self.brightness[0], self.mass[0], decay[0], n_past, t_rows, cfg.alpha, self.num_layers)
        self.count, self.seen, self._rows_in_flight = n, self.seen + t_rows, 0
        self.steps += 1
        if n <= cfg.budget:
            return None
        return self._cull(n - cfg.budget)

    def _cull(self, need: int) -> SlotMoves:
        """Evict at least `need` slots from every row, the same number K from each; returns the moves."""
        victims = self._victims(need)  # [R, K]
        n, k = self.count, victims.shape[1]
        pos, b = self.positions[:, :n], self.brightness[:, :n]
        self._journal(torch.gather(pos, 1, victims), torch.gather(b, 1, victims))
        counts = torch.full((self.rows,), n, dtype=torch.int64)
        moves_src, moves_dst = compaction_moves_layers(victims, counts, self._capacity)
        for field in (self.positions, self.sources, self.units, self.brightness):
            field.scatter_(1, moves_dst, torch.gather(field, 1, moves_src))
        self.count = n - k
        self.positions[:, self.count:n] = FREE_POSITION
        self.units[:, self.count:n] = -1
        return SlotMoves(moves_src, moves_dst, self.per_layer)

    def _victims(self, need: int) -> torch.Tensor:
        """int64 [R, K]: whole units, K >= need the same in every row (unit_cull), or `need` single tokens per
        row when no unit was fed or whole units cannot give every row the same count."""
        cfg, n = self.config, self.count
        pos, src, b, units = self.positions[:, :n], self.sources[:, :n], self.brightness[:, :n], self.units[:, :n]
        order = position_order_layers(pos)
        counts = torch.full((self.rows,), n, dtype=torch.int64)
        scores = cull_scores_layers(b, pos, counts, cfg.dark_bias, cfg.dark_radius, order) + self._priority[src]
        protected = (pos < cfg.sink_tokens) | (pos >= self.seen - cfg.recent_tokens) | self._pinned[src]
        if self._units_seen:
            lines = self._in_lines[src]
            if bool(lines.any()):
                scores = unit_means(scores, units, lines)
            victims = equal_unit_victims(scores, order, b, protected, units, need)
            if victims is not None:
                return victims
        return select_victims_layers(scores, pos, protected, need)

    def _journal(self, victim_positions: torch.Tensor, victim_brightness: torch.Tensor) -> None:
        """Journal the victims' positions that no row holds any more (brightness: the brightest at death)."""
        flat = victim_positions.reshape(-1)
        self.held.index_add_(0, flat, torch.full_like(flat, -1, dtype=torch.int32))
        unique, inverse = torch.unique(flat, return_inverse=True)
        best = torch.zeros(unique.numel(), dtype=torch.float32).scatter_reduce(
            0, inverse, victim_brightness.reshape(-1), "amax", include_self=False)
        gone = self.held[unique] == 0
        positions = unique[gone]
        codes = torch.where(positions < self.num_prompt_tokens, self._prompt_code, self._output_code)
        self.journal.record(positions, self.token_ids[positions], codes, best[gone], self.steps)

    # ------------------------------------------------------------ reading
    def partial_units(self) -> list[tuple[int, int]]:
        """(row, unit id) of every unit that a row holds only in part of the tokens fed of it so far; [] while
        the whole-unit rule holds (it breaks only on the single-token fallback). A check for tests."""
        fed = self.position_units[: self.seen]
        fed = fed[fed >= 0]
        if fed.numel() == 0:
            return []
        size = torch.bincount(fed)
        units = self.units[:, : self.count]
        rows = torch.arange(self.rows)[:, None].expand_as(units)
        mine = units >= 0
        held = torch.zeros(self.rows, size.numel(), dtype=torch.int64)
        held.index_put_((rows[mine], units[mine]), torch.ones_like(units[mine]), accumulate=True)
        partial = (held > 0) & (held < size[None, :])
        return [tuple(pair) for pair in torch.nonzero(partial).tolist()]

    def report(self) -> dict:
        """Counters of this request: fed, retained (slots per layer), remembered (positions some row holds),
        evicted (journal entries), budget, steps, granularity, each row's retained positions and their brightness
        in position order, and the journal as (position, token id, source, brightness, step) tuples."""
        held = self.held[: self.seen]
        order = torch.sort(self.positions[:, : self.count], dim=1).indices
        positions = torch.gather(self.positions[:, : self.count], 1, order)
        brightness = torch.gather(self.brightness[:, : self.count], 1, order)
        return {"request_id": self.request_id, "fed": self.seen, "retained": self.count,
                "remembered": int((held > 0).sum()), "evicted": self.journal.count(), "budget": self.config.budget,
                "steps": self.steps, "granularity": self.config.granularity,
                "retained_positions": positions.tolist(), "retained_brightness": brightness.tolist(),
                "journal": [(e.position, e.token_id, e.source, e.brightness, e.step) for e in self.journal.entries]}

    def close(self) -> None:
        """Close the journal's JSONL sink, if any."""
        self.journal.close()

    def discard(self) -> None:
        """Close the journal and empty its JSONL file, if any: vLLM recomputes a preempted request from token 0,
        so the memory built next starts the file again (it would otherwise hold the evictions of both)."""
        self.close()
        if self.journal_path is not None:
            open(self.journal_path, "w").close()


def _safe(name: str) -> str:
    """A file name made of `name`'s letters, digits, '-', '_' and '.'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
