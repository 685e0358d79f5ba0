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
