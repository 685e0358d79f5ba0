"""RecallArchive: the keys of evicted tokens at a few retrieval layers, an index over the journal.

When a layer of a per-layer memory (halo.layered_cache) lets a token go, and that layer is one of the retrieval
layers (HaloConfig.recall_layers), its key goes into that layer's ring of the archive together with the token's
serial, position, token id, source and unit. A per-head memory (halo.head_cache) evicts head by head: each KV
head of a retrieval layer has a ring of its own holding that head's key alone (the cache names rings by the row
of its slot fields, `l * Hkv + h`). A token is a recall candidate while some row lacks it (halo.recall). The
journal stays the source of truth: the archive only says where the model would look. Each ring holds `capacity`
tokens; when full, the oldest entry is overwritten.

Storage, on the cache's device: keys [R, Hkv, A, D] in fp16 (bf16 when the model is bf16; Hkv is 1 in the rings of
a per-head memory), int64 fields [R, A] and each entry's usual score (float32 [R, A], below); `bytes_per_token`
reports the cost of one token archived in every ring.

Usual scores: some archived tokens draw mass from almost every query (a word whose key looks like a sink's, as
`assert` in text that begins with `The "assert"`), so a high score from one forward says little about them. Each
entry keeps the mean of its scores (ratio over the bar) in the forwards that scored it since it was archived;
once it has `history` of them, a forward's score is its ratio less `discount` times that mean (never below 0):
what stands out against what the token usually draws.

Positions: with text positions (`rope_positions="text"`) a key keeps the rotation of its text position, which
never moves. With memory positions (the default with recall; `inv_freq` given, halo.memory_positions) a key's
rotation is its rank among the remembered tokens, which moves as the memory is culled; the archive then stores
keys derotated to position 0 and rotates them, at every scoring, to the rank each would take if it came back now
(the cache's `archived_rope`).
"""

from __future__ import annotations

import torch

from .archive_mass import BAR_MIN, BAR_QUANTILE, pool_heads, row_weights
from .memory_positions import rotate_keys

FIELDS = ("serials", "positions", "token_ids", "sources", "units")
"""Per-entry fields of every ring (int64 [R, A]; serial -1: an empty entry)."""


class RecallArchive:
    """Rings of archived keys, one per retrieval layer (per memory row of one: a layer, or one KV head of it).

    Args:
        layers: the rings' names, distinct and sorted: the retrieval layers' model layer indices, or per KV head the
            rows `l * Hkv + h`; capacity: entries per ring (A).
        num_kv_heads, head_dim: key shape (the KV heads one ring keeps); dtype: the model's dtype (fp32 is stored
            as fp16); device.
        inv_freq: with memory positions, the model's rotary frequencies (float32 [D / 2] on `device`; keys are
            then stored at position 0); None with text positions (keys are stored as they come).
        discount, history: an entry's score in a forward is its ratio over the bar less `discount` times its mean
            ratio in the forwards that scored it before, once there were `history` of them (HaloConfig.recall_discount,
            recall_history; discount 0: the plain ratio).
    """

    def __init__(self, layers: tuple[int, ...], capacity: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, inv_freq: torch.Tensor | None = None,
                 discount: float = 0.0, history: int = 0):
        self.layers = tuple(int(layer) for layer in layers)
        self.inv_freq = inv_freq
        self.ring_of = {layer: r for r, layer in enumerate(self.layers)}
        self.capacity = int(capacity)
        self.device = device
        self.discount, self.history = float(discount), int(history)
        self.key_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
        rings = len(self.layers)
        with torch.inference_mode(False):
            self.keys = torch.zeros(rings, num_kv_heads, self.capacity, head_dim, dtype=self.key_dtype, device=device)
            # one int64 [F, R, A] table, so that a scoring snapshots every field of a ring in one copy
            self._field_table = torch.full((len(FIELDS), rings, self.capacity), -1, dtype=torch.int64, device=device)
            self.fields = dict(zip(FIELDS, self._field_table.unbind(0)))
            # each entry's mean ratio over the forwards that scored it, and how many did
            self.usual = torch.zeros(rings, self.capacity, dtype=torch.float32, device=device)
            self.scored = torch.zeros(rings, self.capacity, dtype=torch.float32, device=device)
            # memory positions on the CPU: the keys as last scored (rotated to `_turned_rope`; -1: not yet)
            self._turned = self._turned_rope = None
            if inv_freq is not None and torch.device(device).type == "cpu":
                self._turned = torch.empty_like(self.keys)
                self._turned_rope = torch.full((rings, self.capacity), -1, dtype=torch.int64, device=device)
        self.clear()

    def clear(self) -> None:
        """Empty every ring."""
        self._next = [0] * len(self.layers)  # next entry each ring writes (it wraps)
        self._filled = [0] * len(self.layers)
        self.fields["serials"].fill_(-1)
        self.usual.zero_()
        self.scored.zero_()
        if self._turned_rope is not None:
            self._turned_rope.fill_(-1)
        self.step_mass: dict[int, dict[str, torch.Tensor]] = {}  # ring -> the last scored forward's mass and entries

    @property
    def bytes_per_token(self) -> int:
        """Bytes one archived token takes at every retrieval layer (keys, with memory positions on the CPU twice: at
        position 0 and as last scored, fields, and its usual score and count)."""
        _, heads, _, dim = self.keys.shape
        copies = 1 if self._turned is None else 2
        return len(self.layers) * (copies * heads * dim * self.keys.element_size() + 8 * len(FIELDS) + 8)

    def __len__(self) -> int:
        """Entries held, over every ring."""
        return int((self.fields["serials"] >= 0).sum())

    def add(self, layer: int, keys: torch.Tensor, values: dict[str, torch.Tensor],
            rope: torch.Tensor | None = None) -> None:
        """Archive k tokens a retrieval layer evicts: keys [Hkv, k, D], values {field: int64 [k]}; with memory
        positions `rope` (int64 [k], the positions whose rotation the keys carry), by which they are derotated."""
        ring, k = self.ring_of[layer], keys.shape[1]
        if k == 0:
            return
        if self.inv_freq is not None and (rope is None or rope.shape != (k,)):
            raise ValueError("RecallArchive.add: with memory positions the keys' rope positions are needed, "
                             f"int64 [{k}]")
        if k > self.capacity:  # only the newest fit
            keys, values = keys[:, -self.capacity:], {name: v[-self.capacity:] for name, v in values.items()}
            rope = None if rope is None else rope[-self.capacity:]
            k = self.capacity
        if self.inv_freq is not None:
            keys = rotate_keys(keys, -rope.to(self.device), self.inv_freq)
        idx = (self._next[ring] + torch.arange(k, device=self.device)) % self.capacity
        self.keys[ring].index_copy_(1, idx, keys.to(self.key_dtype))
        for name in FIELDS:
            self.fields[name][ring].index_copy_(0, idx, values[name])
        self.usual[ring].index_fill_(0, idx, 0.0)
        self.scored[ring].index_fill_(0, idx, 0.0)
        if self._turned_rope is not None:
            self._turned_rope[ring].index_fill_(0, idx, -1)
        self._next[ring] = (self._next[ring] + k) % self.capacity
        self._filled[ring] = min(self.capacity, self._filled[ring] + k)

    def drop(self, serials: torch.Tensor) -> None:
        """Forget the entries of these serials (recalled tokens, now back in the cache), in every ring."""
        gone = torch.isin(self.fields["serials"], serials.to(self.device))
        self._field_table.masked_fill_(gone, -1)
        self.usual.masked_fill_(gone, 0.0)
        self.scored.masked_fill_(gone, 0.0)

    def score(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int, heads: str,
              backend, retained_mass: torch.Tensor | None = None, archived_rope=None,
              held: dict[str, torch.Tensor] | None = None,
              held_usual: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Score ring `layer` against one forward's query rows (see halo.archive_mass) into `step_mass`.

        query: [Hq, T, D]; key: [Hkv, >= n_past + T, D] the layer's keys (the first n_past retained); heads: how
        heads read a hit (HaloConfig.recall_heads, `halo.archive_mass.pool_heads`); backend: the cache's
        `halo.backend.Backend` (its `retained_lse`, `retained_mass`, `bars` and `archive_ratio`); retained_mass: float32
        [>= n_past], the head-mean mass these rows gave the retained slots (the layer's brightness column mass,
        already computed by the step: the floor is read from it, and with heads "mean" nothing per head is
        formed); None: the mean of the per-head mass. An entry's `mass` is its ratio over the bar times
        `floor`, the head-mean bar (the `BAR_QUANTILE` quantile of the head-mean mass the retained tokens drew):
        the score in brightness's currency, exactly the head-mean mass with heads "mean". With memory positions
        `archived_rope` maps text positions (int64 [A]) to the RoPE positions the keys are rotated to first
        (rotated copies of the filled entries, `_rotated`; the stored keys stay at position 0).
        `held`: the FIELDS of the n_past retained slots (int64 [n_past] each; serial -1 where a slot may not be a
        hit), scored as candidates too, by the mass they drew in this forward over the same bar against their own
        usual reads `held_usual` (float32 [n_past] mean and count, the cache's slot fields, updated in place; given
        with `held`), and 0 until `history` forwards scored them (HaloConfig.recall_held_reads: a token some rows
        hold and others lack, which the rows holding it read now, comes back in the rows that lack it). None: the
        archive alone.
        """
        ring = self.ring_of[layer]
        width = self._filled[ring]
        if (width == 0 and held is None) or n_past == 0:
            return
        hq = query.shape[0]
        if retained_mass is not None and (retained_mass.dtype != torch.float32 or retained_mass.dim() != 1
                                          or retained_mass.numel() < n_past or retained_mass.device != query.device):
            raise ValueError(f"RecallArchive.score: retained_mass must be a float32 vector of at least {n_past} slots "
                             f"on {query.device}, got {retained_mass.dtype} {tuple(retained_mass.shape)} on "
                             f"{retained_mass.device}")
        lse = backend.retained_lse(query, key, scaling, n_past)
        per_head = None if heads == "mean" and retained_mass is not None else \
            backend.retained_mass(query, key, scaling, n_past, lse)
        floor = backend.bars(retained_mass[:n_past] if retained_mass is not None else per_head.mean(0), BAR_QUANTILE,
                             BAR_MIN)
        if heads == "mean":  # ratio_scales(.., "mean") * floor: the head-mean bar cancels
            scale = torch.full((hq,), 1.0 / hq, dtype=torch.float32, device=query.device)
        else:  # the mass over each head's bar, in brightness's currency
            scale = floor / backend.bars(per_head, BAR_QUANTILE, BAR_MIN)
        mass = torch.zeros(0, dtype=torch.float32, device=query.device)
        if width:
            valid = self.fields["serials"][ring, :width] >= 0
            keys = self.keys[ring, :, :width] if self.inv_freq is None else self._rotated(ring, width, archived_rope)
            mass = backend.archive_ratio(query, keys, valid, scaling, lse,
                                         row_weights(n_past, query.shape[1], query.device), scale, heads)
            mass = self._against_usual(self.usual[ring, :width], self.scored[ring, :width], mass, floor, valid)
        # the entries as scored (one copy of every field): the cull that closes this forward may overwrite some
        entries = dict(zip(FIELDS, self._field_table[:, ring, :width].clone().unbind(0)))
        if held is not None:  # the retained slots' mass in the same currency (head-mean mass over the bar * floor)
            drew = retained_mass[:n_past] if heads == "mean" and retained_mass is not None else \
                pool_heads(per_head * scale[:, None], heads, key.shape[0])
            drew = self._against_usual(*held_usual, drew, floor, torch.ones_like(drew, dtype=torch.bool), True)
            mass = torch.cat([mass, drew])
            entries = {name: torch.cat([entries[name], held[name][:n_past]]) for name in FIELDS}
        self.step_mass[ring] = {"mass": mass, "floor": floor.expand(mass.numel()), **entries}

    def _against_usual(self, usual: torch.Tensor, scored: torch.Tensor, mass: torch.Tensor, floor: torch.Tensor,
                       valid: torch.Tensor, known_only: bool = False) -> torch.Tensor:
        """This forward's mass (float32 [width]) less `discount` times each entry's usual (float32 [width], in units
        of the bar `floor`), once it has `history` scores (`scored`; with `known_only`, 0 until then); then this
        forward's ratio joins each valid entry's mean (both updated in place)."""
        ratio = mass / floor.clamp(min=1e-12)
        if self.discount > 0 or known_only:
            known = scored >= self.history
            mass = (ratio - self.discount * torch.where(known, usual, torch.zeros_like(usual))).clamp(min=0) * floor
            if known_only:
                mass = torch.where(known, mass, torch.zeros_like(mass))
        counted = valid.float()
        scored += counted
        usual += counted * (ratio - usual) / scored.clamp(min=1)
        return mass

    def _rotated(self, ring: int, width: int, archived_rope) -> torch.Tensor:
        """Memory positions: ring `ring`'s first `width` keys rotated to the RoPE positions `archived_rope` gives
        their text positions. On CUDA all of them afresh (no host sync; in float32, then rounded to the key dtype);
        on the CPU the copy in `_turned`,
        where only the entries that are new or whose rank moved are rotated again, from their key at position 0
        (rounded once to the key dtype, as a stored key is; never rotation upon rotation)."""
        rope, keys = archived_rope(self.fields["positions"][ring, :width]), self.keys[ring, :, :width]
        if self._turned is None:  # rounded once to the key dtype, as the CPU's copy: the kernel's tensor-core path
            return rotate_keys(keys, rope, self.inv_freq).to(self.key_dtype)
        moved = torch.nonzero(rope != self._turned_rope[ring, :width]).flatten()
        if moved.numel():
            self._turned[ring][:, moved] = rotate_keys(keys[:, moved], rope[moved], self.inv_freq).to(self.key_dtype)
            self._turned_rope[ring, moved] = rope[moved]
        return self._turned[ring, :, :width]

    def take_scores(self, threshold: float | None = None, skip: torch.Tensor | None = None
                    ) -> dict[str, torch.Tensor] | None:
        """The last scored forward's candidates, once: every entry held when it was scored, in every scored ring,
        with `mass` and `floor` (float32, the ring's bar) and the fields (int64), concatenated over rings; None when
        nothing was scored, or (with `threshold`) when no held entry outside the `skip` source codes (int64) has a
        mass of at least `threshold` times its bar: that test is the only host read until something reaches it."""
        if not self.step_mass:
            return None
        if threshold is not None:
            reaches = []
            for scored in self.step_mass.values():
                reach = (scored["mass"] >= threshold * scored["floor"]) & (scored["serials"] >= 0)
                if skip is not None:
                    reach &= ~torch.isin(scored["sources"], skip.to(reach.device))
                reaches.append(reach.any())
            if not bool(torch.stack(reaches).any()):
                self.step_mass = {}
                return None
        parts = []
        for scored in self.step_mass.values():
            held = scored["serials"] >= 0
            parts.append({name: value[held] for name, value in scored.items()})
        self.step_mass = {}
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    # ---------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """CPU copies of the used entries: `keys` [R, Hkv, A_used, D], `fields` {name: [R, A_used]} and the ring
        counters, each entry's `usual` score and how many forwards `scored` it (float32 [R, A_used]); with memory
        positions `derotated` (True: the keys are at position 0)."""
        width = max(self._filled, default=0)
        state = {"keys": self.keys[:, :, :width].detach().cpu().contiguous(),
                 "fields": {name: t[:, :width].detach().cpu().contiguous() for name, t in self.fields.items()},
                 "usual": self.usual[:, :width].cpu().clone(), "scored": self.scored[:, :width].cpu().clone(),
                 "next": list(self._next), "filled": list(self._filled), "layers": list(self.layers)}
        if self.inv_freq is not None:
            state["derotated"] = True
        return state

    def check_state(self, state: dict, *, next_serial: int, seen: int) -> None:
        """ValueError naming the first way `state_dict()` output does not fit this archive (or is corrupted): shapes,
        dtypes, non-finite keys, tokens never fed (serial >= next_serial, position >= seen), ring counters, keys
        rotated otherwise than this archive keeps them (memory positions: at position 0, `derotated`)."""
        keys, fields = state["keys"], state["fields"]
        rings, heads, _, dim = self.keys.shape
        if list(state["layers"]) != list(self.layers):
            raise ValueError(f"saved archive has retrieval layers {state['layers']}, this cache {list(self.layers)}")
        if bool(state.get("derotated", False)) != (self.inv_freq is not None):
            raise ValueError("saved archive keys are rotated otherwise than this cache keeps them: memory positions "
                             "keep them at position 0 (older files kept the rotation each had at eviction)"
                             if self.inv_freq is not None else "saved archive keys are at position 0 (memory "
                             "positions); this cache uses text positions")
        width = keys.shape[2] if keys.dim() == 4 else -1
        if keys.dim() != 4 or (keys.shape[0], keys.shape[1], keys.shape[3]) != (rings, heads, dim) \
                or width > self.capacity:
            raise ValueError(f"saved archive keys have shape {tuple(keys.shape)}; expected [{rings}, {heads}, "
                             f"<= {self.capacity}, {dim}]")
        if keys.dtype != self.key_dtype or not bool(torch.isfinite(keys.float()).all()):
            raise ValueError(f"saved archive keys must be finite {self.key_dtype}")
        if set(fields) != set(FIELDS) or any(tuple(fields[n].shape) != (rings, width) or fields[n].dtype != torch.int64
                                             for n in FIELDS):
            raise ValueError(f"saved archive fields must be int64 [{rings}, {width}]: {sorted(FIELDS)}")
        for name in ("usual", "scored"):  # files from before usual scores have neither: they start at 0
            value = state.get(name)
            if value is not None and (tuple(value.shape) != (rings, width) or value.dtype != torch.float32
                                      or not bool(torch.isfinite(value).all()) or bool((value < 0).any())):
                raise ValueError(f"saved archive {name} must be finite, non-negative float32 [{rings}, {width}]")
        held = fields["serials"] >= 0
        if bool((fields["serials"] >= next_serial).any()) or bool((fields["positions"][held] >= seen).any()) \
                or bool((fields["positions"][held] < 0).any()):
            raise ValueError("saved archive names tokens that were never fed (serial or position out of range)")
        counters = [list(state["next"]), list(state["filled"])]
        if any(len(c) != rings or min(c, default=0) < 0 or max(c, default=0) > self.capacity for c in counters) \
                or max(counters[1], default=0) != width:
            raise ValueError(f"saved archive ring counters {counters} do not fit {rings} rings of {self.capacity}")

    def load_state_dict(self, state: dict, *, next_serial: int, seen: int) -> None:
        """Restore `state_dict()` output (checked first by `check_state`; on error the archive is unchanged)."""
        self.check_state(state, next_serial=next_serial, seen=seen)
        keys, fields = state["keys"], state["fields"]
        width = keys.shape[2]
        self.clear()
        self.keys[:, :, :width] = keys.to(self.device)
        for name in FIELDS:
            self.fields[name][:, :width] = fields[name].to(self.device)
        for name in ("usual", "scored"):
            if state.get(name) is not None:
                getattr(self, name)[:, :width] = state[name].to(self.device)
        self._next, self._filled = [int(c) for c in state["next"]], [int(c) for c in state["filled"]]
