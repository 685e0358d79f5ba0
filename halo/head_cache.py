"""HeadHaloCache: per-head memory. Every KV head of every layer keeps the tokens it attends to.

`HaloConfig(granularity="head")`. The per-layer memory of `halo.layered_cache` one level finer: the per-slot
fields are [L * Hkv, C], row `l * Hkv + h` listing the slots of KV head h of layer l in its own slot order, over
the same K/V buffers [L, 2, Hkv, C, D] (head h of layer l keeps its slots in `kv[l, :, h]`). A row's brightness
is fed by the attention of its own query heads alone (the GQA group of the KV head, mean over those heads), and
after every stream forward each row culls its own dimmest units down to the budget. Heads of one model attend to
different things (position, syntax, one entity); a layer-wide set keeps what the heads agree on, a per-head set
what each needs, which lowers perplexity under the same budget (README, Memory per head).

A layer's heads may hold different counts (a whole word or line can leave a row a few slots short): the layer's
attention then sees `layer_length(l)` (its fullest head) + the new rows, each head with its own mask, its free
slots hidden. A token is remembered while any (layer, head) holds it; `snapshot()["layers"]` counts the rows.
With memory positions (halo.memory_positions) every head's keys sit at the ranks of one numbering, the remembered
positions of all heads. Recall (halo.recall_memory) archives each head's evictions in a ring of its own, read by
that head's query heads. Value weighting (HaloConfig.value_weight) weighs each head's income by its own value
norms.
"""

from __future__ import annotations

import torch

from . import capture
from .cache import HaloCache
from .compact import compact_heads_
from .forward import causal_mask, head_visibility
from .layered_cache import LayeredHaloCache


class HeadHaloCache(LayeredHaloCache):
    """HaloCache with one retained token set per (layer, KV head) (HaloConfig.granularity == "head").

    Cull policies see [L * Hkv, n] per-slot fields and return scores of that shape, as for per-layer memory.
    """

    granularity = "head"

    @property
    def num_rows(self) -> int:
        """Rows of the per-slot fields: one per KV head of every layer (row l * Hkv + h)."""
        return self.num_layers * self.num_kv_heads

    def _head_counts(self, layer_idx: int) -> list[int]:
        heads = self.num_kv_heads
        return self._counts[layer_idx * heads:(layer_idx + 1) * heads]

    def layer_length(self, layer_idx: int) -> int:
        """Slots of layer `layer_idx`'s fullest head (the length its attention sees before the new rows)."""
        return max(self._head_counts(layer_idx))

    # ------------------------------------------------------------ the forward
    def _write_new_slots(self, spec) -> None:
        super()._write_new_slots(spec)
        # every layer's write index for this forward at once: head h's rows go after its own slots, at flat
        # slot h * C + count + t of the layer's [Hkv * C, D] key and value buffers (one index_copy_ per buffer)
        heads, t_rows, capacity = self.num_kv_heads, spec.new_rows, self.capacity
        first = self._counts_t.view(-1, heads) + torch.arange(heads, device=self.device) * capacity  # [L, Hkv]
        index = first[:, :, None] + torch.arange(t_rows, device=self.device)
        self._write_index = index.view(len(first), heads * t_rows)
        self._visibility = None  # attention_mask's per-head masks of this forward, built at the first layer asking

    def layer_update(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        """Write this forward's K/V for one layer, each head after its own slots; return [1, Hkv, n+T, D] views
        with n = layer_length(layer_idx) (the shorter heads' extra slots are masked by `attention_mask`)."""
        f = self._enter_layer(layer_idx, key_states)
        t_rows, counts = f.spec.new_rows, self._head_counts(layer_idx)
        keys, values = self._store.layer_kv[layer_idx]
        index = self._write_index[layer_idx]
        keys.view(-1, self.head_dim).index_copy_(0, index, key_states[0, :, :t_rows].reshape(-1, self.head_dim))
        values.view(-1, self.head_dim).index_copy_(0, index, value_states[0, :, :t_rows].reshape(-1, self.head_dim))
        if self.config.value_weight:  # each head's own value norms, at the same flat slots of its layer's rows
            heads = self.num_kv_heads
            norms = self._store.fields["value_norm"][layer_idx * heads:(layer_idx + 1) * heads]
            norms.view(-1).index_copy_(0, index, value_states[0, :, :t_rows].float().norm(dim=-1).reshape(-1))
        if self._patches is not None:
            self._write_patches(layer_idx, key_states[0, :, t_rows:], value_states[0, :, t_rows:])
        capture.set_active(self, layer_idx)
        end = max(counts) + t_rows
        return keys[None, :, :end], values[None, :, :end]

    def _write_patches(self, layer_idx: int, keys_new: torch.Tensor, values_new: torch.Tensor) -> None:
        keys, values = self._store.layer_kv[layer_idx]
        for head in range(self.num_kv_heads):
            row = layer_idx * self.num_kv_heads + head
            slots, rows = self._patches[row]
            keys[head].index_copy_(0, slots, keys_new[head, rows])
            values[head].index_copy_(0, slots, values_new[head, rows])
            if self.config.value_weight:
                self._store.fields["value_norm"][row].index_copy_(0, slots, values_new[head, rows].float().norm(dim=-1))

    def attention_mask(self, layer_idx: int = 0) -> torch.Tensor | None:
        """None when every head of the layer holds the same count and the rows need no mask; else bool
        [1, 1, R, n+T] (the same for every head) or [1, Hkv, R, n+T] (one per KV head; `halo.capture` repeats it
        over each head's query heads)."""
        spec, counts = self._flight.spec, self._head_counts(layer_idx)
        width = max(counts) + spec.new_rows
        if spec.visible is None and len(set(counts)) == 1:
            return causal_mask(counts[0], spec.new_rows, self.device)
        if spec.visible is None:  # every layer's masks at once (counts do not change during a forward)
            if self._visibility is None:
                widest = max(self._counts) + spec.new_rows
                masks = head_visibility(self._counts_t, spec.new_rows, widest)
                self._visibility = masks.view(self.num_layers, self.num_kv_heads, spec.new_rows, widest)
            return self._visibility[layer_idx, :, :, :width][None]
        first = layer_idx * self.num_kv_heads
        masks = [self._row_visibility(first + head, spec) for head in range(self.num_kv_heads)]
        return torch.stack([torch.nn.functional.pad(m, (0, width - m.shape[1])) for m in masks])[None]

    def _column_mass(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float,
                     value: torch.Tensor | None = None) -> torch.Tensor | None:
        """Each KV head's mass from its own query heads, over its own slots and the new rows (on the CPU a decode
        row of every head in one operator call; with `value`, as LayeredHaloCache, with the row's output)."""
        if value is not None:
            return super()._column_mass(layer_idx, query, key, scaling, value)
        fields, rows = self._store.fields, slice(layer_idx * self.num_kv_heads, (layer_idx + 1) * self.num_kv_heads)
        self.backend.attention_column_mass_heads(query, key, scaling, self._head_counts(layer_idx),
                                                 fields["mass"][rows], fields["last_mass"][rows])

    def _compact(self, victims: torch.Tensor) -> torch.Tensor:
        return compact_heads_(self._store.kv, list(self._store.fields.values()), victims, self._counts_t)


HaloCache.granularity_classes["head"] = HeadHaloCache
