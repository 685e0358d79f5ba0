"""Per-layer in-place compaction: every layer fills the holes of its own victims from its own tail, in one launch.

Twin of `halo.compact.compact_layers_` with the move list of `halo.compact.compaction_moves_layers`: in row l,
the i-th hole (a victim below `keep_l = counts[l] - m_l`, m_l the row's victims; ascending) takes the i-th
surviving tail slot of `keep_l .. counts[l] - 1` (ascending), so both paths leave identical buffers. Cost: one
segmented device sort of the [L, k] victims (the -1 padding sorts first), then one `_compact_layers_kernel`
launch over (move blocks, L * max(1, 2 * Hkv) planes). Each program

* finds, by binary searches in its layer's sorted row (no host sync, no O(capacity) bitmap): `p` the padding
  (entries < 0), `m = k - p`, `keep = counts[l] - m`, `h` the holes (valid victims < keep), and for i < h
  `src_i = keep + i + #{tail victims v_j, j >= p + h : v_j - keep - (j - p - h) <= i}`, `dst_i = row[p + i]`;
* copies the K/V rows src -> dst of its plane (bit-exact: data is moved as same-width integers);
* in the first plane of each layer, also moves that layer's row of every per-slot tensor [L, C] and (first
  block) writes the layer's new count `keep`.

The reference pads short rows with self-copies of slot C - 1; here those pairs are simply masked off (a
self-copy changes nothing), so the buffers match bit for bit. Moves never overlap hazardously: every dst is a
hole below `keep` (read by nobody), every src a slot at or above `keep`, and layers touch disjoint rows.
Buffers are written in place, so their addresses never change (CUDA-graph friendly).

`compaction_moves_layers` returns the same kernel's move list (with the reference's C - 1 padding) without
moving anything: a twin of `halo.compact.compaction_moves_layers`, for tests and inspection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import as_bits, cdiv, check_device, next_power_of_2
from .compact import _lower_bound, _move


@triton.jit
def _compact_layers_kernel(
    kv_ptr, sorted_ptr, counts_ptr, new_counts_ptr, src_out_ptr, dst_out_ptr, slot_ptrs, slot_strides,
    k, n_iter, capacity, HKV, KV_PLANES, PLANES,
    stride_l, stride_kv, stride_h, stride_c, stride_d,
    D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SLOT: tl.constexpr,
    MOVES_ONLY: tl.constexpr,
):
    pid_m = tl.program_id(0)
    plane = tl.program_id(1)
    layer = plane // PLANES  # plane = layer * PLANES + (k|v) * Hkv + head
    local = plane % PLANES
    row = sorted_ptr + layer.to(tl.int64) * k  # this layer's victims, sorted ascending: -1 padding first
    i = pid_m * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = i < k
    zero = tl.zeros([BLOCK_K], tl.int64)

    # p = entries < 0 (the padding): lower bound of 0 in the sorted row.
    pad = _lower_bound(row, zero, zero + k, zero, n_iter, MINUS_INDEX=False)
    keep = tl.load(counts_ptr + layer + zero) - (k - pad)

    # p + h = lower bound of keep among the valid victims (h = holes, the victims below keep).
    tail = _lower_bound(row, pad, zero + k, keep, n_iter, MINUS_INDEX=False)  # first tail victim's index (p + h)

    # For the i-th hole (i < h): count tail victims v_j (j >= p + h) with v_j - keep - (j - p - h) <= i, i.e. the
    # victims lying before the i-th surviving tail slot; that slot is keep + i + count. In integers that
    # condition reads v_j - j < keep - tail + i + 1: a lower bound in the keys v_j - j.
    lo = _lower_bound(row, tail, zero + k, keep - tail + i + 1, n_iter, MINUS_INDEX=True)
    real = ok & (pad + i < tail)
    dst = tl.load(row + pad + i, mask=real, other=0)
    src = keep + i + (lo - tail)

    if MOVES_ONLY:  # grid (move blocks, L): the move list, padded like the reference's with C - 1 self-copies
        out = layer.to(tl.int64) * k + i
        tl.store(src_out_ptr + out, tl.where(real, src, capacity - 1), mask=ok)
        tl.store(dst_out_ptr + out, tl.where(real, dst, capacity - 1), mask=ok)
    else:
        if (pid_m == 0) & (local == 0):
            tl.store(new_counts_ptr + layer + zero, keep, mask=i == 0)
        # K/V rows of this plane.
        which = local // HKV
        head = local % HKV
        base = (kv_ptr + layer.to(tl.int64) * stride_l + which.to(tl.int64) * stride_kv
                + head.to(tl.int64) * stride_h)
        dims = tl.arange(0, BLOCK_D)
        mask = (real & ((zero + local) < KV_PLANES))[:, None] & (dims < D)[None, :]
        _move(base + dims[None, :] * stride_d, src[:, None], dst[:, None], stride_c, mask)
        # per-slot rows of this layer, moved once per layer (by its first plane)
        if local == 0:
            for s in tl.static_range(NUM_SLOT):
                ptr = slot_ptrs[s] + layer.to(tl.int64) * slot_strides[2 * s]
                _move(ptr, src, dst, slot_strides[2 * s + 1], real)


def _check(kv, slot_tensors, victims, counts) -> None:
    op = "compact_layers_"
    if not isinstance(kv, torch.Tensor) or kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"{op}: kv must be [L, 2, Hkv, C, D], got {tuple(getattr(kv, 'shape', ()))}")
    layers, capacity = kv.shape[0], kv.shape[3]
    _check_moves(op, victims, counts, layers)
    if not isinstance(slot_tensors, (list, tuple)):
        raise ValueError(f"{op}: slot_tensors must be a list of [L, C] tensors, got {type(slot_tensors).__name__}")
    for idx, tensor in enumerate(slot_tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.shape[0] != layers \
                or tensor.shape[1] < capacity:
            raise ValueError(f"{op}: slot_tensors[{idx}] must be an [L, C] tensor with L = {layers} and at least "
                             f"C = {capacity} columns, got {tuple(getattr(tensor, 'shape', ()))}")
    check_device(op, kv=kv, victims=victims, counts=counts,
                 **{f"slot_tensors[{i}]": t for i, t in enumerate(slot_tensors)})


def _check_moves(op, victims, counts, layers) -> None:
    if not isinstance(victims, torch.Tensor) or victims.dtype != torch.int64 or victims.dim() != 2 \
            or victims.shape[0] != layers:
        raise ValueError(f"{op}: victims must be an int64 [L, k] tensor with L = {layers}, got "
                         f"{getattr(victims, 'dtype', type(victims))} {tuple(getattr(victims, 'shape', ()))}")
    if not isinstance(counts, torch.Tensor) or counts.dtype != torch.int64 or tuple(counts.shape) != (layers,):
        raise ValueError(f"{op}: counts must be an int64 [L] tensor with L = {layers}, got "
                         f"{getattr(counts, 'dtype', type(counts))} {tuple(getattr(counts, 'shape', ()))}")


def _launch(kv, slot_tensors, victims, counts, capacity, moves_only):
    """Sort the victims and launch the kernel; returns (new_counts, src, dst) (src/dst only when moves_only)."""
    layers, k = victims.shape
    device = victims.device
    sorted_victims = torch.sort(victims, dim=1).values  # contiguous [L, k]; the -1 padding first
    new_counts = torch.empty(layers, dtype=torch.int64, device=device)
    block_k = min(32, next_power_of_2(k))
    n_iter = k.bit_length() + 1
    if moves_only:
        src = torch.empty(layers, k, dtype=torch.int64, device=device)
        dst = torch.empty_like(src)
        _compact_layers_kernel[(cdiv(k, block_k), layers)](
            sorted_victims, sorted_victims, counts, new_counts, src, dst, (), (),
            k, n_iter, capacity, 1, 0, 1, 0, 0, 0, 0, 0,
            D=1, BLOCK_K=block_k, BLOCK_D=1, NUM_SLOT=0, MOVES_ONLY=True,
        )
        return new_counts, src, dst
    bits = as_bits(kv)
    slots = tuple(as_bits(t) for t in slot_tensors)
    strides = tuple(s for t in slots for s in t.stride())
    hkv, d = kv.shape[2], kv.shape[4]
    planes = max(1, 2 * hkv)  # one plane at least: a layer's first plane moves its per-slot rows
    _compact_layers_kernel[(cdiv(k, block_k), layers * planes)](
        bits, sorted_victims, counts, new_counts, new_counts, new_counts, slots, strides,
        k, n_iter, capacity, max(1, hkv), 2 * hkv, planes,
        *bits.stride(),
        D=d, BLOCK_K=block_k, BLOCK_D=next_power_of_2(d), NUM_SLOT=len(slots), MOVES_ONLY=False,
    )
    return new_counts, None, None


def compaction_moves_layers(victims: torch.Tensor, counts: torch.Tensor, capacity: int
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(src, dst) int64 [L, k]: the kernel's move list, equal to `halo.compact.compaction_moves_layers`.

    Args:
        victims: int64 [L, k] distinct slots per row, each below that layer's count, padded with -1.
        counts: int64 [L] valid slots per layer before the eviction (same device).
        capacity: C (host int); rows with fewer holes than k end in self-copies of slot C - 1.
    """
    op = "compaction_moves_layers"
    if not isinstance(victims, torch.Tensor) or victims.dim() != 2:
        raise ValueError(f"{op}: victims must be an int64 [L, k] tensor, got {tuple(getattr(victims, 'shape', ()))}")
    _check_moves(op, victims, counts, victims.shape[0])
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"{op}: capacity must be a positive int, got {capacity!r}")
    check_device(op, victims=victims, counts=counts)
    layers, k = victims.shape
    if k == 0 or layers == 0:
        empty = victims.new_empty(layers, k)
        return empty, empty
    _, src, dst = _launch(None, (), victims, counts, capacity, moves_only=True)
    return src, dst


def compact_layers_(kv: torch.Tensor, slot_tensors: list[torch.Tensor], victims: torch.Tensor,
                    counts: torch.Tensor) -> torch.Tensor:
    """Evict each layer's own `victims` and compact every layer in place; returns the new counts int64 [L].

    Args:
        kv: [L, 2, Hkv, C, D] K/V buffers (any float dtype, any strides), moved bit-exactly.
        slot_tensors: per-slot tensors [L, >= C] (int64, float32, bool, ...; any strides), moved alike.
        victims: int64 [L, k] per-layer victims padded with -1: distinct slots below that layer's count (not
            checked on device: that would need a sync).
        counts: int64 [L] valid slots per layer before the eviction, on the same device (not modified).
    Raises ValueError naming the problem (shape, dtype, device). No host synchronisation, no reallocation.
    """
    _check(kv, slot_tensors, victims, counts)
    layers, k = victims.shape
    if k == 0 or layers == 0:
        return counts.clone()
    new_counts, _, _ = _launch(kv, slot_tensors, victims, counts, kv.shape[3], moves_only=False)
    return new_counts


__all__ = ["compact_layers_", "compaction_moves_layers"]
