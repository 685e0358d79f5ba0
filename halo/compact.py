"""Compact: close the holes left by evicted slots, in place, moving O(evicted) data (reference path).

Retained slots always occupy `0 .. n_valid - 1` of every buffer. Evicting k slots leaves holes below
`n_valid - k`; the survivors among the last k slots fill them. Buffers are never reallocated (addresses stay
fixed for CUDA graphs) and each slot keeps its absolute position. Slot order is not position order afterwards;
everything that needs position order sorts by the stored positions. `halo_kernels.compact` is the fused twin.
"""

from __future__ import annotations

import torch


def compaction_moves(victims: torch.Tensor, n_valid: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) int64 [k]: slot moves that fill every hole below n_valid - k from the tail.

    Pairs the i-th hole (ascending) with the i-th surviving tail slot (ascending). When the tail itself holds
    victims, the unpaired entries come out as `src == dst ==` that tail victim, a harmless self-copy, so the
    move list has a fixed length k and needs no host synchronisation.
    """
    k = victims.numel()
    if k == 0:
        empty = victims.new_empty(0)
        return empty, empty
    keep = n_valid - k
    is_victim = torch.zeros(capacity, dtype=torch.bool, device=victims.device)
    is_victim[victims] = True
    hole_key = torch.where(victims < keep, victims, victims + capacity)
    dst = torch.sort(hole_key).values % capacity
    tail = torch.arange(keep, n_valid, device=victims.device)
    tail_key = torch.where(is_victim[tail], tail + capacity, tail)
    src = torch.sort(tail_key).values % capacity
    return src, dst


def compact_(kv: torch.Tensor, slot_tensors: list[torch.Tensor], victims: torch.Tensor, n_valid: int) -> int:
    """Evict `victims` and compact in place; returns the new retained count `n_valid - k`.

    Args:
        kv: [L, 2, Hkv, C, D] K/V buffers of all layers.
        slot_tensors: per-slot tensors of shape [C] (positions, token ids, brightness, ...), moved alike.
        victims: int64 [k] distinct slot indices < n_valid.
        n_valid: retained slots before eviction.
    """
    k = victims.numel()
    if k == 0:
        return n_valid
    src, dst = compaction_moves(victims, n_valid, kv.shape[3])
    kv[:, :, :, dst] = kv[:, :, :, src]
    for tensor in slot_tensors:
        tensor[dst] = tensor[src]
    return n_valid - k


def compaction_moves_layers(victims: torch.Tensor, counts: torch.Tensor, capacity: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) int64 [L, k]: per layer, the moves of `compaction_moves` for that layer's own victims.

    Args:
        victims: int64 [L, k] distinct slots per row, each below that layer's count, padded with -1.
        counts: int64 [L] valid slots per layer before the eviction.
    Pair i of row l moves the i-th surviving tail slot of layer l into its i-th hole; rows with fewer holes than
    k end in self-copies of slot `capacity - 1`, which no real move of that row writes, so the list is
    rectangular and needs no host synchronisation.
    """
    layers, k = victims.shape
    device = victims.device
    if k == 0:
        empty = victims.new_empty(layers, 0)
        return empty, empty
    valid = victims >= 0
    keep = counts.to(device) - valid.sum(1)
    is_victim = torch.zeros(layers, capacity + 1, dtype=torch.bool, device=device)
    is_victim.scatter_(1, torch.where(valid, victims, capacity), True)
    far = 2 * capacity
    hole = valid & (victims < keep[:, None])
    dst = torch.sort(torch.where(hole, victims, far), dim=1).values
    tail = keep[:, None] + torch.arange(k, device=device)[None, :]
    in_tail = tail < counts.to(device)[:, None]
    survives = in_tail & ~torch.gather(is_victim, 1, tail.clamp(max=capacity))
    src = torch.sort(torch.where(survives, tail, far), dim=1).values
    real = dst < far
    idle = torch.full_like(dst, capacity - 1)
    return torch.where(real, src, idle), torch.where(real, dst, idle)


def compact_layers_(kv: torch.Tensor, slot_tensors: list[torch.Tensor], victims: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
    """Evict each layer's own `victims` and compact every layer in place; returns the new counts int64 [L].

    Args:
        kv: [L, 2, Hkv, C, D] K/V buffers; slot_tensors: per-slot tensors [L, C] moved alike.
        victims: int64 [L, k] per-layer victims padded with -1 (see `compaction_moves_layers`).
        counts: int64 [L] valid slots per layer before the eviction.
    """
    new_counts = counts - (victims >= 0).sum(1).to(counts.device)
    if victims.shape[1] == 0:
        return new_counts
    src, dst = compaction_moves_layers(victims, counts, kv.shape[3])
    rows = torch.arange(kv.shape[0], device=kv.device)[:, None]
    kv[rows, :, :, dst] = kv[rows, :, :, src]
    for tensor in slot_tensors:
        tensor.scatter_(1, dst, torch.gather(tensor, 1, src))
    return new_counts


def compact_heads_(kv: torch.Tensor, slot_tensors: list[torch.Tensor], victims: torch.Tensor,
                   counts: torch.Tensor) -> torch.Tensor:
    """Per-head memory: evict each (layer, KV head)'s own `victims` and compact it in place; returns the new counts.

    Args:
        kv: [L, 2, Hkv, C, D] K/V buffers; slot_tensors: per-slot tensors [L * Hkv, C] (row l * Hkv + h describes
            head h of layer l) moved alike.
        victims: int64 [L * Hkv, k] per-row victims padded with -1 (see `compaction_moves_layers`).
        counts: int64 [L * Hkv] valid slots per row before the eviction.
    The same moves as `compact_layers_`, with the K/V of row r read and written at layer r // Hkv, head r % Hkv.
    """
    new_counts = counts - (victims >= 0).sum(1).to(counts.device)
    if victims.shape[1] == 0:
        return new_counts
    src, dst = compaction_moves_layers(victims, counts, kv.shape[3])
    rows = torch.arange(victims.shape[0], device=kv.device)[:, None]
    layer, head = rows // kv.shape[2], rows % kv.shape[2]
    kv[layer, :, head, dst] = kv[layer, :, head, src]
    for tensor in slot_tensors:
        tensor.scatter_(1, dst, torch.gather(tensor, 1, src))
    return new_counts
