"""In-place KV compaction: fill the holes of evicted slots from the tail, all layers and metadata in one launch.

Twin of `halo.compact.compact_` with the same move list as `halo.compact.compaction_moves` (the i-th hole in
ascending order takes the i-th surviving tail slot in ascending order; tail victims become self-copies), so both
paths leave identical buffers. Cost: one device sort of the k victims, then one `_compact_kernel` launch over
(move blocks, L * 2 * Hkv planes) that

* derives its block's (src, dst) pairs from the sorted victims with two binary searches (no host sync, no
  O(capacity) bitmap): `dst = sorted_victims`, `h = #victims < keep` (the holes), and for i < h
  `src_i = keep + i + #{tail victims v : v - keep - (rank of v among tail victims) <= i}`;
* copies the K/V rows src -> dst of its plane (bit-exact: data is moved as same-width integers);
* in the programs of plane 0, also moves every per-slot metadata tensor (positions, ids, brightness, ...).

Moves never overlap hazardously: every dst is a hole below `keep` (read by nobody) or a tail victim copied
onto itself. Buffers are written in place, so their addresses never change (CUDA-graph friendly).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_bits, cdiv, check_device, next_power_of_2


@triton.jit
def _lower_bound(ptr, lo, hi, value, n_iter, MINUS_INDEX: tl.constexpr):
    """Per lane, the first index j in [lo, hi) whose key is >= value (hi when none), by n_iter halvings.

    The key is ptr[j], or ptr[j] - j when MINUS_INDEX (nondecreasing too over distinct sorted integers); keys
    must be nondecreasing over [lo, hi), and n_iter >= bit_length(hi - lo) + 1. Shared by `_compact_kernel`
    and `compact_layers._compact_layers_kernel`, like `_move`.
    """
    for _ in range(n_iter):
        active = lo < hi
        mid = (lo + hi) // 2
        key = tl.load(ptr + mid, mask=active, other=0)
        if MINUS_INDEX:
            key = key - mid
        below = key < value
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & (~below), mid, hi)
    return lo


@triton.jit
def _move(ptr, src, dst, stride, mask):
    """Where mask: copy the element at ptr + src * stride to ptr + dst * stride (broadcast: rows of a plane when
    ptr spans a row's columns and src/dst are [BLOCK, 1]). Integer payloads, so the copy is bit-exact."""
    tl.store(ptr + dst * stride, tl.load(ptr + src * stride, mask=mask), mask=mask)


@triton.jit
def _compact_kernel(
    kv_ptr, victims_ptr, slot_ptrs, slot_strides,
    k, keep, n_iter, HKV, n_planes,
    stride_l, stride_kv, stride_h, stride_c, stride_d,
    D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SLOT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    plane = tl.program_id(1)
    i = pid_m * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = i < k
    dst = tl.load(victims_ptr + i, mask=ok, other=0)  # victims sorted ascending

    # h = number of victims below `keep` (lower bound of keep in the sorted victims).
    zero = tl.zeros([BLOCK_K], tl.int64)
    h = _lower_bound(victims_ptr, zero, zero + k, keep, n_iter, MINUS_INDEX=False)

    # For the i-th hole (i < h): count tail victims v_j (j >= h) with v_j - keep - (j - h) <= i, i.e. the
    # victims lying before the i-th surviving tail slot; that slot is keep + i + count. In integers that
    # condition reads v_j - j < keep - h + i + 1: a lower bound in the keys v_j - j.
    lo = _lower_bound(victims_ptr, h, zero + k, keep - h + i + 1, n_iter, MINUS_INDEX=True)
    src = tl.where(i < h, keep + i + (lo - h), dst)

    # K/V rows of this plane (plane = (layer, k|v, head)).
    layer = plane // (2 * HKV)
    which = (plane // HKV) % 2
    head = plane % HKV
    base = kv_ptr + layer.to(tl.int64) * stride_l + which.to(tl.int64) * stride_kv + head.to(tl.int64) * stride_h
    dims = tl.arange(0, BLOCK_D)
    mask = (ok & ((zero + plane) < n_planes))[:, None] & (dims < D)[None, :]
    _move(base + dims[None, :] * stride_d, src[:, None], dst[:, None], stride_c, mask)

    if plane == 0:
        for s in tl.static_range(NUM_SLOT):
            _move(slot_ptrs[s], src, dst, slot_strides[s], ok)


def _check(kv, slot_tensors, victims, n_valid) -> None:
    op = "compact_"
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"{op}: kv must be [L, 2, Hkv, C, D], got {tuple(getattr(kv, 'shape', ()))}")
    capacity = kv.shape[3]
    if not isinstance(n_valid, int) or not 0 <= n_valid <= capacity:
        raise ValueError(f"{op}: n_valid ({n_valid!r}) must be an int in [0, {capacity}]")
    if not isinstance(victims, torch.Tensor) or victims.dtype != torch.int64 or victims.dim() != 1:
        raise ValueError(f"{op}: victims must be a 1-D int64 tensor, got {getattr(victims, 'dtype', type(victims))} "
                         f"{tuple(getattr(victims, 'shape', ()))}")
    if victims.numel() > n_valid:
        raise ValueError(f"{op}: {victims.numel()} victims among {n_valid} retained slots")
    for idx, tensor in enumerate(slot_tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 1 or tensor.numel() < n_valid:
            raise ValueError(f"{op}: slot_tensors[{idx}] must be a 1-D tensor of at least {n_valid} slots, got "
                             f"{tuple(getattr(tensor, 'shape', ()))}")
    check_device(op, kv=kv, victims=victims, **{f"slot_tensors[{i}]": t for i, t in enumerate(slot_tensors)})


def compact_(kv: torch.Tensor, slot_tensors: list[torch.Tensor], victims: torch.Tensor, n_valid: int) -> int:
    """Evict `victims` and compact in place; returns the new retained count `n_valid - k`.

    Args:
        kv: [L, 2, Hkv, C, D] K/V buffers of all layers (any float dtype, any strides).
        slot_tensors: per-slot 1-D tensors of at least n_valid slots (int64, float32, bool, ...), moved alike.
        victims: int64 [k] distinct slot indices < n_valid (not checked on device: that would need a sync).
        n_valid: retained slots before eviction (host int).
    """
    _check(kv, slot_tensors, victims, n_valid)
    k = victims.numel()
    if k == 0:
        return n_valid
    sorted_victims = torch.sort(victims).values
    bits = as_bits(kv)
    slots = tuple(as_bits(t) for t in slot_tensors)
    strides = tuple(t.stride(0) for t in slots)
    L, _, hkv, _, d = kv.shape
    block_k = min(32, next_power_of_2(k))
    block_d = next_power_of_2(d)
    n_planes = L * 2 * hkv
    _compact_kernel[(cdiv(k, block_k), max(1, n_planes))](  # one plane at least: plane 0 moves the metadata
        bits, sorted_victims, slots, strides,
        k, n_valid - k, k.bit_length() + 1, max(1, hkv), n_planes,
        *bits.stride(),
        D=d, BLOCK_K=block_k, BLOCK_D=block_d, NUM_SLOT=len(slots),
    )
    return n_valid - k


__all__ = ["compact_"]
