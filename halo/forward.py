"""The per-forward contract of HaloCache: a ForwardSpec goes in, a StepResult comes out.

A driver (Session, the marker placer, the repair flush) describes one model forward with a frozen
`ForwardSpec`: the rows it feeds, their positions, source and units, which slots each row may see, and which
retained slots it recomputes in place. `HaloCache.run(spec, forward)` runs the forward under that spec and
returns a `StepResult`: the slots written, the slots repaired, and what the cull that closed it evicted.
Plain `model.generate(..., past_key_values=HaloCache(...))` never builds a spec: the cache makes the default
one (continue the stream at the next position, default source) when layer 0 arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch


@dataclass(frozen=True)
class ForwardSpec:
    """One forward, described before it runs.

    Attributes:
        input_ids: int64 [R] the rows fed to the model: the T new tokens, then one row per patch slot.
        position_ids: int64 [R] their absolute positions (RoPE sees these).
        source: source code (HaloConfig.source_code) of the new tokens.
        new_rows: T, the rows that become new slots.
        n_past: retained slots when the spec was made; the forward must start from exactly this many.
        units: int64 [T] unit id per new token (-1 for none), or None.
        visible: bool [R, n_past + T] which slots each row attends to, or None for the causal default.
        patch_slots: int64 [k] slots (of `cache.token_view()`) whose K/V the last k rows recompute in place, or None.
        horizon: int64 [R] or None: row r sees the retained tokens whose position is below horizon[r]. A
            per-layer memory (halo.layered_cache), whose layers hold different slots, builds each layer's
            retained columns from it and takes only the new-row columns `visible[:, n_past:]` from `visible`.
        streams: True for a forward of the conversation's stream (advances the position counter, earns
            brightness, culls to budget after); False for a service forward (elision markers, a KV-patch flush).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    source: int
    new_rows: int
    n_past: int
    units: torch.Tensor | None = None
    visible: torch.Tensor | None = None
    patch_slots: torch.Tensor | None = None
    horizon: torch.Tensor | None = None
    streams: bool = True

    def __post_init__(self):
        rows = self.input_ids.numel()
        patches = 0 if self.patch_slots is None else self.patch_slots.numel()
        if self.input_ids.dim() != 1 or self.position_ids.shape != self.input_ids.shape:
            raise ValueError(f"ForwardSpec: input_ids {tuple(self.input_ids.shape)} and position_ids "
                             f"{tuple(self.position_ids.shape)} must be equal 1-D shapes")
        if self.new_rows + patches != rows:
            raise ValueError(f"ForwardSpec: {rows} rows cannot be {self.new_rows} new tokens + {patches} patches")
        if self.units is not None and self.units.shape != (self.new_rows,):
            raise ValueError(f"ForwardSpec: units {tuple(self.units.shape)} must be [{self.new_rows}]")
        if self.horizon is not None and (self.visible is None or tuple(self.horizon.shape) != (rows,)):
            raise ValueError(f"ForwardSpec: horizon must be [{rows}] and come with visible")
        if self.visible is not None and tuple(self.visible.shape) != (rows, self.n_past + self.new_rows):
            raise ValueError(f"ForwardSpec: visible {tuple(self.visible.shape)} must be "
                             f"[{rows}, {self.n_past + self.new_rows}]")

    @property
    def rows(self) -> int:
        """R = T new tokens + k patch rows."""
        return int(self.input_ids.numel())


class Eviction(NamedTuple):
    """Slots removed by one cull or unit eviction (device tensors, [k] each, in victim order)."""

    positions: torch.Tensor
    token_ids: torch.Tensor
    brightness: torch.Tensor


@dataclass
class CullResult:
    """What one cull removed: the evictions and the text units (line runs) it culled whole.

    culled_runs: (unit id, first position, last position) per culled text unit, for elision markers.
    """

    evictions: list[Eviction] = field(default_factory=list)
    culled_runs: list[tuple[int, int, int]] = field(default_factory=list)

    def extend(self, other: "CullResult") -> None:
        self.evictions.extend(other.evictions)
        self.culled_runs.extend(other.culled_runs)


@dataclass
class StepResult(CullResult):
    """What one forward did.

    Attributes:
        slots_written: (first, stop) of the new slots the forward wrote, before its cull compacted them.
        repaired_slots: int64 [k] slots whose K/V were recomputed in place (before the cull), or None.
        streams: whether it was a stream forward (brightness earned, cull ran).
        evictions, culled_runs: see CullResult (empty for service forwards).
    """

    slots_written: tuple[int, int] = (0, 0)
    repaired_slots: torch.Tensor | None = None
    streams: bool = True


def causal_visibility(n_past: int, t_rows: int, device) -> torch.Tensor:
    """bool [T, n_past + T]: new row t sees every retained slot and the new rows up to itself."""
    cols = torch.arange(n_past + t_rows, device=device)
    return cols[None, :] <= n_past + torch.arange(t_rows, device=device)[:, None]


def causal_mask(n_past: int, t_rows: int, device) -> torch.Tensor | None:
    """The plain causal mask of a forward over `n_past` retained slots, as attention takes it: None when SDPA needs
    none (a prefill from empty runs is_causal; a single row sees everything), else bool [1, 1, T, n_past + T]."""
    if n_past == 0 or t_rows == 1:
        return None
    return causal_visibility(n_past, t_rows, device)[None, None]


def head_visibility(counts: torch.Tensor, t_rows: int, width: int) -> torch.Tensor:
    """bool [Hkv, T, width] for a per-head memory (halo.head_cache), head h holding `counts[h]` slots (int64 [Hkv],
    a device tensor) followed by the T new rows: row t of head h sees slot j when j <= counts[h] + t, so a head's
    free slots past its own (its layer's attention sees its fullest head) stay hidden."""
    cols = torch.arange(width, device=counts.device)
    rows = torch.arange(t_rows, device=counts.device)
    return cols[None, None, :] <= counts[:, None, None] + rows[None, :, None]


def visible_before(slot_positions: torch.Tensor, row_positions: torch.Tensor) -> torch.Tensor:
    """bool [R, n]: row r may see retained slot j when the slot's position is before the row's."""
    return slot_positions[None, :] < row_positions[:, None]


def default_spec(cache, rows: int, hooked: torch.Tensor | None, source: str) -> ForwardSpec:
    """The spec of a forward no driver describes (plain `generate`): `rows` tokens of `source` continuing the
    stream, with the ids the embedding hook saw (`hooked` [1, rows]) or -1 (unknown) when it saw none."""
    if hooked is not None and hooked.shape == (1, rows):
        ids = hooked[0].to(cache.device, torch.int64)
    else:
        ids = torch.full((rows,), -1, dtype=torch.int64, device=cache.device)
    return stream_spec(cache, ids, source)


def stream_spec(cache, token_ids: torch.Tensor, source: str, units: torch.Tensor | None = None,
                patch_slots: torch.Tensor | None = None) -> ForwardSpec:
    """The spec of the next forward of `cache`'s stream: T new tokens at the next positions, then k patch rows.

    Args:
        token_ids: int64 [T] ids about to be fed (T may be 0 for a forward of patches only, which is then a
            service forward: no brightness, no cull).
        source: source name of these tokens.
        units: int64 [T] unit ids (from `new_unit_ids`; -1 for plain tokens), or None.
        patch_slots: int64 [k] distinct slots of `cache.token_view()` whose K/V this forward recomputes (repair
            patches): each patch row carries the token at the token's position, sees the retained slots before
            that position and its own slot, and writes its K/V into the slot before the layer's attention (in
            a per-layer memory, into the slot of every layer that holds the token).
            Patch rows add no slots, earn no brightness and are left out of the attention mass.
    """
    code = cache.config.source_code(source)
    ids = token_ids.to(cache.device, torch.int64)
    t_rows, n = ids.numel(), cache.n_valid
    positions = torch.arange(cache.seen, cache.seen + t_rows, device=cache.device)
    visible = horizon = None
    if patch_slots is not None:
        view = cache.token_view()
        patch_positions = view.positions[patch_slots]
        visible = torch.zeros(t_rows + patch_slots.numel(), n + t_rows, dtype=torch.bool, device=cache.device)
        visible[:t_rows] = causal_visibility(n, t_rows, cache.device)
        visible[t_rows:, :n] = cache.retained_visibility(patch_positions, own_slots=patch_slots)
        ids = torch.cat([ids, view.token_ids[patch_slots]])
        positions = horizon = torch.cat([positions, patch_positions])
    units = None if units is None else units.to(cache.device)
    return ForwardSpec(ids, positions, code, t_rows, n, units, visible, patch_slots, horizon, streams=t_rows > 0)
