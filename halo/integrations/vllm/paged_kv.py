"""Read and move one request's K/V in vLLM's CPU paged cache (CPU_ATTN backend, vLLM 0.32.0).

A layer's cache is [num_blocks, Hkv, block_size, 2 * D]; per (block, head) its 2 * block_size * D elements hold
the keys in the first half and the values in the second, in an order that depends on the kernel ISA (with
"vec", keys are stored transposed, [D, block_size]). Rather than hard-coding each ISA, `probe_layout` writes
known values with vLLM's own cache-write op (`impl.do_kv_cache_update`) into a scratch block and reads back
where every (slot offset, channel) of K and of V landed. A request's physical slot s lives in block
`block_ids[s // block_size]` at offset `s % block_size`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockLayout:
    """Where each (slot offset, channel) of K and V sits in a (block, head) chunk of 2 * block_size * D elements.

    Attributes:
        key: int64 [block_size, D] flat offsets of keys; value: the same for values.
    """

    key: torch.Tensor
    value: torch.Tensor

    @property
    def block_size(self) -> int:
        return self.key.shape[0]

    @functools.cached_property
    def strided(self) -> tuple[bool, bool] | None:
        """(keys transposed, values transposed) when K fills the first half of a chunk and V the second, each as
        [block_size, D] rows or [D, block_size] columns (then strided views replace index gathers); else None."""
        size, dim = self.key.shape
        o, d = torch.arange(size)[:, None], torch.arange(dim)[None, :]
        forms = []
        for where, base in ((self.key, 0), (self.value, size * dim)):
            if torch.equal(where, base + o * dim + d):
                forms.append(False)
            elif torch.equal(where, base + d * size + o):
                forms.append(True)
            else:
                return None
        return forms[0], forms[1]


def probe_layout(impl, layer, kv_cache: torch.Tensor) -> BlockLayout:
    """Probe the layout of `kv_cache` by writing one block of known K/V with vLLM's own op.

    Args:
        impl: the layer's CPUAttentionBackendImpl; layer: its Attention layer; kv_cache: its cache (shape and dtype).
    Raises RuntimeError when the written values cannot be located one to one (an unsupported layout).
    """
    _, heads, block_size, two_d = kv_cache.shape
    dim = two_d // 2
    scratch = torch.zeros((1, heads, block_size, two_d), dtype=kv_cache.dtype)
    slots = torch.arange(block_size, dtype=torch.int64)
    found = []
    for code in (_offset_code(block_size, dim, heads), _channel_code(block_size, dim, heads)):
        scratch.zero_()
        value = code + 0.5  # distinct from K and from untouched zeros
        impl.do_kv_cache_update(layer, code.to(kv_cache.dtype).contiguous(), value.to(kv_cache.dtype).contiguous(),
                                scratch, slots)
        found.append(scratch[0, 0].reshape(-1).float().clone())
    offsets, channels = found
    key_at, value_at = _locate(offsets, channels, block_size, dim, 0.0), _locate(offsets, channels, block_size, dim,
                                                                                 0.5)
    return BlockLayout(key_at, value_at)


def _offset_code(block_size: int, dim: int, heads: int) -> torch.Tensor:
    """[bs, H, D]: 1 + slot offset in every channel (exact in fp16/bf16 for block_size <= 255)."""
    return (torch.arange(block_size, dtype=torch.float32) + 1)[:, None, None].expand(block_size, heads, dim) * 2


def _channel_code(block_size: int, dim: int, heads: int) -> torch.Tensor:
    """[bs, H, D]: 1 + channel in every slot."""
    return (torch.arange(dim, dtype=torch.float32) + 1)[None, None, :].expand(block_size, heads, dim) * 2


def _locate(offsets: torch.Tensor, channels: torch.Tensor, block_size: int, dim: int, half: float) -> torch.Tensor:
    """int64 [bs, D]: flat index of each (slot offset, channel) whose probes read 2 * (o + 1) + half and
    2 * (d + 1) + half."""
    frac = offsets - torch.floor(offsets)
    mine = (offsets > 0) & ((frac - half).abs() < 0.25)
    index = torch.nonzero(mine).flatten()
    o = torch.round((offsets[index] - half) / 2).long() - 1
    d = torch.round((channels[index] - half) / 2).long() - 1
    out = torch.full((block_size, dim), -1, dtype=torch.int64)
    ok = (o >= 0) & (o < block_size) & (d >= 0) & (d < dim)
    out[o[ok], d[ok]] = index[ok]
    if index.numel() != block_size * dim or bool((out < 0).any()):
        raise RuntimeError("cannot locate K/V channels in vLLM's CPU cache layout (probe found "
                           f"{index.numel()} of {block_size * dim} entries); this cache layout is not supported")
    return out


def _chunks(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks, Hkv, 2 * block_size * D] view of a CPU_ATTN layer cache."""
    if kv_cache.dim() != 4:
        raise ValueError(f"expected a CPU_ATTN layer cache [num_blocks, Hkv, block_size, 2 * D], got "
                         f"{tuple(kv_cache.shape)}")
    return kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], -1)


def request_keys(kv_cache: torch.Tensor, layout: BlockLayout, block_ids: torch.Tensor, n: int) -> torch.Tensor:
    """[Hkv, n, D] keys of a request's physical slots 0 .. n - 1 (a copy, possibly strided; the cache's dtype).

    Args:
        block_ids: int [>= ceil(n / block_size)] the request's block table row.
    """
    return batch_keys(kv_cache, layout, block_ids[None], n)[0]


def batch_keys(kv_cache: torch.Tensor, layout: BlockLayout, block_rows: torch.Tensor, n: int) -> torch.Tensor:
    """[R, Hkv, n, D] keys of physical slots 0 .. n - 1 of R requests, gathered at once (a copy, possibly strided).

    Args:
        block_rows: int [R, >= ceil(n / block_size)] the requests' block table rows (see `batch_key_blocks`).
    """
    blocks = batch_key_blocks(kv_cache, layout, block_rows, n)  # [R, nb, Hkv, D, bs]
    count, nb, heads, dim, size = blocks.shape
    return blocks.permute(0, 2, 3, 1, 4).reshape(count, heads, dim, nb * size)[..., :n].transpose(2, 3)


def batch_key_blocks(kv_cache: torch.Tensor, layout: BlockLayout, block_rows: torch.Tensor, n: int) -> torch.Tensor:
    """[R, nb, Hkv, D, block_size] keys of the first nb = ceil(n / block_size) blocks of R requests, each block's
    keys as columns (slot s of a request: block s // block_size, column s % block_size); one index_select of
    the cache's blocks (a copy), the columns a strided view where the layout stores keys as rows.

    Args:
        block_rows: int [R, >= nb] the requests' block table rows. A request holding fewer than n slots reads
            whatever its row names past its own blocks (a padding entry of the block table, possibly another
            request's block): only read, never written; callers mask those slots.
    """
    chunks = _chunks(kv_cache)
    count, size = block_rows.shape[0], layout.block_size
    blocks = block_rows[:, : -(-n // size)].reshape(-1).long()  # [R * nb]
    halves = _halves(chunks, layout)
    if halves is None:
        keys = chunks.index_select(0, blocks)[..., layout.key].transpose(-1, -2)  # [R * nb, Hkv, D, bs]
    else:
        (key_half, transposed), _ = halves
        keys = key_half.index_select(0, blocks)
        keys = keys if transposed else keys.transpose(-1, -2)
    return keys.unflatten(0, (count, -1))


def _halves(chunks: torch.Tensor, layout: BlockLayout):
    """((K view, transposed), (V view, transposed)) of the cache when the layout is strided, else None.

    Views are [num_blocks, Hkv, bs, D] (rows) or [num_blocks, Hkv, D, bs] (transposed)."""
    strided = layout.strided
    if strided is None:
        return None
    size, dim = layout.key.shape
    out = []
    for half, transposed in zip((chunks[:, :, : size * dim], chunks[:, :, size * dim:]), strided):
        shape = (dim, size) if transposed else (size, dim)
        out.append((half.unflatten(2, shape), transposed))
    return out


def move_slots(kv_cache: torch.Tensor, layout: BlockLayout, block_ids: torch.Tensor, src: torch.Tensor,
               dst: torch.Tensor) -> None:
    """Copy K and V of physical slots `src` into slots `dst` (int64 [m], disjoint sets), in place.

    Only blocks named by `block_ids` (the request's row) are read or written.
    """
    if src.numel() == 0:
        return
    chunks = _chunks(kv_cache)
    ids, size = block_ids.long(), layout.block_size
    halves = _halves(chunks, layout)
    if halves is None:
        src_block, dst_block = ids[src // size][:, None], ids[dst // size][:, None]
        for where in (layout.key, layout.value):
            chunks[dst_block, :, where[dst % size]] = chunks[src_block, :, where[src % size]]
        return
    src_block, dst_block, src_off, dst_off = ids[src // size], ids[dst // size], src % size, dst % size
    for half, transposed in halves:
        if transposed:  # [nb, H, D, bs]
            half[dst_block, :, :, dst_off] = half[src_block, :, :, src_off]
        else:  # [nb, H, bs, D]
            half[dst_block, :, dst_off] = half[src_block, :, src_off]


def blocks_of_slots(block_ids: torch.Tensor, slots: torch.Tensor, block_size: int) -> set[int]:
    """Block ids that hold the given physical slots of a request."""
    return set(block_ids.long()[slots // block_size].tolist())
