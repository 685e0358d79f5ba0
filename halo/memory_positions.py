"""Memory positions: RoPE that reads the remembered text without its holes (HaloConfig.rope_positions="memory",
and "auto", the default, when recall is on).

With text positions (DESIGN.md step 4; the default without recall) every slot keeps its token's absolute
position. Once a long flood of tool output has been culled, what is left of the conversation sits thousands of
positions before the question with nothing in between, a gap no model saw in training. Measured with the
embedded SmolLM2 on the long-flood conversations (README, Recall): the same remembered tokens, run afresh at their
text positions, answer wrong; run at contiguous positions, right. StreamingLLM places its cache the same way
(positions within the cache, not in the text).

With memory positions a token's RoPE position counts the remembered positions before it (a position some layer, or
with per-head memory some KV head, holds; every layer and head uses the same numbering, so a query row has one
position for all of them) and the holes between them, each hole at most `HaloConfig.rope_gap` positions
(`gapped_ranks`): the sinks sit at 0, 1, ..., a flood culled to a few lines leaves a few short holes, and prose
with short holes keeps its spacing (the default cap is 4). With `rope_gap=0` a position is the token's rank. The
slot field `positions` still holds the text position (journal, masks, markers, recall and diffs read that); the
slot field `rope` holds the position whose rotation is baked into the slot's cached key. Before each forward,
`MemoryPositions.model_positions` re-ranks the remembered tokens together with the forward's new rows and rotates
each key whose rank moved by the difference (RoPE rotations compose: R(a) R(b) = R(a + b)), so the holes left by
the culls close and a row recalled into the middle finds its place; a stream forward after the memory skips that
until the holes add up to more than `RERANK_SLACK` positions.

Exact in float32. In fp16/bf16 every re-rank of a key rounds it once more. Archived keys (recall, halo.archive)
are stored derotated to position 0 and, whenever the archive is scored, rotated to the rank each would take if it
came back now (`MemoryPositions.archived_rope`), so the query rows read them at the distances the current
numbering has. Models without a rotate-half rotary embedding over the whole head are refused.
"""

from __future__ import annotations

import torch

from .forward import ForwardSpec


def rope_inv_freq(model, head_dim: int) -> torch.Tensor:
    """float32 [head_dim / 2]: the inverse frequencies of `model`'s rotary embedding (its `inv_freq` buffer, any
    scaling already folded in). ValueError when the model has none, or one that does not rotate the whole head."""
    inv_freq, problem = _find_inv_freq(model, head_dim)
    if inv_freq is None:
        raise ValueError(f"rope_positions='memory' needs {problem}")
    return inv_freq


def _find_inv_freq(model, head_dim: int) -> tuple[torch.Tensor | None, str]:
    """(the model's inverse frequencies, "") or (None, what the model lacks)."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            if 2 * inv_freq.numel() != head_dim:
                return None, (f"RoPE over the whole head; {type(module).__name__} rotates {2 * inv_freq.numel()} "
                              f"of {head_dim} dims")
            return inv_freq.detach().float(), ""
    return None, (f"a model with rotary position embeddings; {type(model).__name__} has no module with an "
                  f"`inv_freq` buffer")


def gapped_ranks(numbering: torch.Tensor, positions: torch.Tensor, gap: int) -> torch.Tensor:
    """int64, shaped like `positions`: the RoPE position of each text position in a memory that holds the sorted,
    unique text positions `numbering` (int64 [m], m >= 1), every hole (a run of positions it lacks, the one before
    its first included) counting at most `gap` positions. gap 0: a held position's rank in `numbering`; a gap no
    hole exceeds: the text position itself. A position it lacks reads where it would sit if inserted (the ones
    after it not moved; with gap 0 the rank of the next held one). Tensor ops only."""
    none = numbering.new_full((1,), -1)  # a held position -1 at RoPE position -1 starts the numbering
    step = (numbering.diff(prepend=none) - 1).clamp_(max=gap) + 1
    before = torch.searchsorted(numbering, positions)  # held positions below each: index of the last + 1
    start = torch.cat([none, step.cumsum(0) - 1])[before]
    return start + (positions - torch.cat([none, numbering])[before] - 1).clamp(max=gap) + 1


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """float32, a new tensor: `keys` rotated by `delta` positions (the rotate-half RoPE convention of transformers).

    keys: [..., n, D] (fp32/fp16/bf16; rotated in float32); delta: int64 broadcastable to keys.shape[:-1];
    inv_freq: float32 [D / 2] on the keys' device.
    """
    angle = delta.to(torch.float32)[..., None] * inv_freq
    cos, sin = angle.cos(), angle.sin()
    k = keys.float()
    half = k.shape[-1] // 2
    first, second = k[..., :half], k[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], -1)


def rotate_keys_(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> None:
    """Rotate cached keys in place by `delta` positions (`rotate_keys`, written back in the keys' dtype)."""
    keys.copy_(rotate_keys(keys, delta, inv_freq))


RERANK_SLACK = 32
"""Holes of up to this many positions in all may stay open between re-ranks: a stream forward whose rows all come
after the memory continues from the newest key unless the holes closed since the last re-rank exceed it (then
every moved key is rotated). Re-ranking every step cost a per-layer SmolLM2 step at budget 512 about 12 ms of
rotation on CPU; a few positions of slack read as no gap at all."""


def rotates_every_slot(device: torch.device) -> bool:
    """Whether a re-rank rotates every held key (on CUDA: no gather of the moved ones and no host sync to find
    them) or only the keys whose rank moved (elsewhere: on the CPU most keys before the newest hole stay put)."""
    return device.type == "cuda"


def per_head_delta(delta: torch.Tensor, layers: int, heads: int) -> torch.Tensor:
    """int64 [L, Hkv, n] (a view): each KV head's rotation from a cache's `delta`: [n] (one token set for all
    layers), [L, n] (per layer: every head of a layer alike) or [L * Hkv, n] (per head, row l * Hkv + h)."""
    n = delta.shape[-1]
    rows = delta.reshape(delta.shape[0] if delta.dim() == 2 else 1, n)  # not -1: n may be 0 (nothing held yet)
    if rows.shape[0] == layers * heads:
        return rows.view(layers, heads, n)
    return rows.view(rows.shape[0], 1, n).expand(layers, heads, n)


class MemoryPositions:
    """Mixin of HaloCache: the RoPE positions of its forwards (uses its slot store, `config`, `n_valid` and the
    forward in flight; LayeredHaloCache overrides `_held_slots`)."""

    _inv_freq: torch.Tensor | None = None
    _rope_rows: torch.Tensor | None = None
    _rope_table: tuple | None = None  # (the forward it was built in, sorted held positions, their `rope`, one more)

    @property
    def memory_positions(self) -> bool:
        """Whether RoPE sees ranks in the memory (rope_positions "memory", or "auto" resolved to it)."""
        return self._inv_freq is not None

    def _init_memory_positions(self, model) -> None:
        """With memory positions: read the model's rotary frequencies and add the `rope` slot field. "auto" takes
        them with recall on a model whose RoPE turns the whole head, and text positions otherwise."""
        mode = self.config.rope_positions
        if mode == "text" or (mode == "auto" and (not self.config.recall or model is None)):
            return
        if model is None:
            raise ValueError("rope_positions='memory' needs the model (its rotary embedding) to build the cache")
        inv_freq, problem = _find_inv_freq(model, self.head_dim)
        if inv_freq is None:
            if mode == "auto":
                return
            raise ValueError(f"rope_positions='memory' needs {problem}")
        self._inv_freq = inv_freq.to(self.device)
        self.add_slot_field("rope", torch.int64, 0)

    def model_positions(self, spec: ForwardSpec) -> torch.Tensor:
        """int64 [R]: the positions the model's RoPE sees for `spec`'s rows: the text positions, or with memory
        positions each row's gapped rank among the remembered positions and the rows' own (`gapped_ranks`), after
        the cached keys have been rotated to theirs in the same numbering."""
        if self._inv_freq is None:
            return spec.position_ids
        n, fields = self._n_valid, self._store.fields
        held = self._held_slots()
        positions, rope = fields["positions"][..., :n], fields["rope"][..., :n]
        held_positions, gap = positions[held], self.config.rope_gap
        rows = self._rows_after(spec, held_positions, rope[held], gap)
        if rows is not None:
            self._rope_rows = rows
            return rows
        numbering = torch.unique(torch.cat([held_positions, spec.position_ids[:spec.new_rows]]))
        ranks = gapped_ranks(numbering, positions.contiguous(), gap)
        delta = (ranks - rope).masked_fill_(~held, 0)
        if rotates_every_slot(delta.device):  # a zero delta leaves a key as it is
            keys = self._store.kv[:, 0, :, :n]  # [L, Hkv, n, D]
            rotate_keys_(keys, per_head_delta(delta, *keys.shape[:2]), self._inv_freq)
        elif bool(delta.any()):  # on the CPU only the keys after a hole move
            self._rotate_moved(delta)
        rope.copy_(torch.where(held, ranks, rope))
        rows = gapped_ranks(numbering, spec.position_ids, gap)
        self._rope_rows = rows[:spec.new_rows]
        return rows

    def archived_rope(self, positions: torch.Tensor) -> torch.Tensor:
        """int64, shaped like `positions` (text positions, e.g. of archived tokens): the RoPE position a token there
        would take if it came back now, its insertion rank among the remembered tokens: the `rope` of the first
        remembered token at or after it, or one past the newest key. After a re-rank that is the gapped rank of that
        token in the numbering `model_positions` uses (with `rope_gap` 0 the position's `searchsorted`; with capped
        holes a recalled token then sits up to `rope_gap` positions earlier); between re-ranks (RERANK_SLACK) it stays
        in the frame of the keys as they stand, which the forward's rows continue. Tensor ops only (no host sync); the
        table is built once per forward (the remembered tokens do not change during one)."""
        flight, table = self._flight, self._rope_table
        if table is None or flight is None or table[0] is not flight:
            n, fields = self._n_valid, self._store.fields
            if n == 0:
                return torch.zeros_like(positions)
            held = self._held_slots()
            rope = fields["rope"][..., :n]
            after = rope.masked_fill(~held, -1).amax().add(1).view(1)
            unheld = torch.iinfo(torch.int64).max  # after every text position: sorts last, reads `after`
            ordered, order = torch.sort(fields["positions"][..., :n].masked_fill(~held, unheld).flatten())
            table = (flight, ordered, torch.cat([torch.where(held, rope, after).flatten()[order], after]))
            self._rope_table = table
        return table[2][torch.searchsorted(table[1], positions.contiguous())]

    def _held_slots(self) -> torch.Tensor:
        """bool [n_valid]: the retained slots (every one; LayeredHaloCache: [L, n_valid], each layer's own)."""
        return torch.ones(self._n_valid, dtype=torch.bool, device=self.device)

    def _store_new_rope(self, new: slice, t_rows: int) -> None:
        """Write the `rope` field of a forward's new slots `new` (fields [C]) with memory positions."""
        rope = self._new_rope(t_rows)
        if rope is not None:
            self._store.fields["rope"][new] = rope

    @staticmethod
    def _rows_after(spec: ForwardSpec, held_positions: torch.Tensor, held_rope: torch.Tensor,
                    gap: int) -> torch.Tensor | None:
        """The rows' RoPE positions when the keys may stay as they are: only new rows, all after every remembered
        token, and the holes since the last re-rank shrink the newest key's position by at most RERANK_SLACK
        (the rows then continue from the newest key). None when the memory must be re-ranked first."""
        if spec.rows != spec.new_rows or held_positions.numel() == 0:
            return None
        newest, remembered = int(held_rope.max()), torch.unique(held_positions)
        drift = newest - int(gapped_ranks(remembered, remembered[-1:], gap))  # grows along position order
        last, first = int(remembered[-1]), int(spec.position_ids.min())
        if drift > RERANK_SLACK or first <= last:
            return None
        return newest + min(first - last - 1, gap) + 1 + torch.arange(spec.rows, device=spec.position_ids.device)

    def _rotate_moved(self, delta: torch.Tensor) -> None:
        """Rotate only the keys whose rank moved (`delta` int64 [n], [L, n] or [L * Hkv, n], nonzero where it
        moved)."""
        keys = self._store.kv[:, 0]  # [L, Hkv, C, D]
        delta = per_head_delta(delta, *keys.shape[:2])
        layers, heads, cols = torch.nonzero(delta, as_tuple=True)
        moved = keys[layers, heads, cols]  # [k, D]
        rotate_keys_(moved, delta[layers, heads, cols], self._inv_freq)
        keys[layers, heads, cols] = moved

    def _new_rope(self, t_rows: int) -> torch.Tensor | None:
        """The `rope` values of a forward's new slots (int64 [T]), or None with text positions."""
        if self._inv_freq is None:
            return None
        rows, self._rope_rows = self._rope_rows, None
        if rows is None or rows.numel() != t_rows:
            raise RuntimeError("memory positions (rope_positions 'memory', or 'auto' with recall): a forward "
                               "must be driven by a Session (ModelRunner), which gives the model its positions")
        return rows
