"""Attention column mass: per-slot softmax mass of a forward's query rows, fused with the brightness update.

Twin of `halo.brightness.attention_column_mass` (same signature, same semantics). For one layer, with
`n = n_past + T` visible slots and row t of the forward seeing slots `0 .. n_past + t`:

    mass[j]          += sum_t n_t * mean_h p_{h,t}[j]          n_t = n_past + t + 1
    last_row_mass[j] += n_{T-1} * mean_h p_{h,T-1}[j]           (optional)

The [Hq, T, N] probability matrix is never written to memory. Two passes over the keys (online softmax):

1. `_column_mass_stats_kernel`, grid (Hkv * row blocks, key splits): for the query rows that share one KV head
   (GQA: the `Hq / Hkv` heads of a group and all T rows, flattened t-major into `M = group * T` rows), the
   running max and sum of exp2 over the causally visible keys of its split. With one split it writes the final
   per-row max and the row coefficients `n_t / (Hq * l_t)` directly; with several splits it writes partial
   (max, sum) pairs that `_column_mass_merge_kernel` combines (a tiny launch over Hq * T rows).
2. `_column_mass_accum_kernel`, grid (key blocks,): each program owns BLOCK_N slots, loops over the KV heads
   and the row blocks that can see its slots, recomputes the logits, and accumulates
   `sum_rows coef_r * exp2(s_rj - m_r)` into registers; then `mass[j] += col[j]` (one plain read-modify-write
   per slot, no atomics, deterministic). With `UPDATE` it also applies the brightness update to the same
   slots in the same program (`attention_column_mass_and_update`, used on the last layer).

Dtypes: query/key fp16, bf16 or fp32 (the same dtype); products accumulate in fp32 (fp32 inputs use IEEE
fp32 dot, not TF32). Under the Triton interpreter inputs are upcast to fp32 right after loading.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import check_row_inputs

from ._common import FLOAT_DTYPES, cdiv, check_device, interpreting, next_power_of_2, parallel_target
from .brightness_update import brightness_step

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima (keeps exp2 of differences NaN-free)


@triton.jit
def _row_coefficients(m, l, t, T, n_past, inv_hq, row_ok):
    """Per-row weights: coef = n_t / (Hq * l), coef_last = the same on the last row (t == T-1), else 0."""
    w = (n_past + t + 1).to(tl.float32) * inv_hq
    coef = tl.where(row_ok, w / tl.where(row_ok, l, 1.0), 0.0)
    coef_last = tl.where(row_ok & (t == T - 1), coef, 0.0)
    return coef, coef_last


@triton.jit
def _natural_lse(m, l):
    """The row's logsumexp of its natural-log logits from the base-2 running max and sum (l >= 1 on a real row)."""
    return (m + tl.log2(tl.maximum(l, 1e-30))) * _LN2


@triton.jit
def _column_mass_stats_kernel(
    q_ptr, k_ptr,
    m_ptr, l_ptr, coef_ptr, coef_last_ptr,
    stride_qh, stride_qt, stride_qd,
    stride_kh, stride_kn, stride_kd,
    n_past, T, GROUP, M, R,
    qk_scale, inv_hq, blocks_per_split,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, FINAL: tl.constexpr, LSE: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_rb = tl.cdiv(M, BLOCK_M)
    kvh = pid_r // n_rb
    rb = pid_r % n_rb
    n_total = n_past + T

    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    t = rows // GROUP
    head = kvh * GROUP + rows % GROUP
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < D

    q_ptrs = q_ptr + head[:, None].to(tl.int64) * stride_qh + t[:, None].to(tl.int64) * stride_qt + dims[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    limit = n_past + t  # last visible slot of each row

    # Keys this row block can see at all (rows are t-major, so the block's largest t bounds them).
    t_max = tl.minimum((rb * BLOCK_M + BLOCK_M - 1) // GROUP, T - 1)
    hi = n_past + t_max + 1
    start = pid_s * blocks_per_split * BLOCK_N
    stop = tl.minimum(start + blocks_per_split * BLOCK_N, hi)

    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(start, stop, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        k_ptrs = k_base + cols[:, None].to(tl.int64) * stride_kn + dims[None, :] * stride_kd
        k = tl.load(k_ptrs, mask=(cols[:, None] < n_total) & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        s = tl.where(cols[None, :] <= limit[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
        m_i = m_new

    out = kvh * M + rows  # row index in the [Hkv * M] = [Hq * T] stats vectors
    if FINAL and LSE:
        tl.store(coef_ptr + out, _natural_lse(m_i, l_i), mask=row_ok)
    elif FINAL:
        coef, coef_last = _row_coefficients(m_i, l_i, t, T, n_past, inv_hq, row_ok)
        tl.store(m_ptr + out, m_i, mask=row_ok)
        tl.store(coef_ptr + out, coef, mask=row_ok)
        tl.store(coef_last_ptr + out, coef_last, mask=row_ok)
    else:
        tl.store(m_ptr + pid_s * R + out, m_i, mask=row_ok)
        tl.store(l_ptr + pid_s * R + out, l_i, mask=row_ok)


@triton.jit
def _column_mass_merge_kernel(
    m_part_ptr, l_part_ptr, m_ptr, coef_ptr, coef_last_ptr,
    n_splits, n_past, T, GROUP, M, R, inv_hq,
    BLOCK: tl.constexpr, LSE: tl.constexpr,
):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < R
    t = (idx % M) // GROUP
    m = tl.full([BLOCK], _NEG_BIG, tl.float32)
    l = tl.zeros([BLOCK], tl.float32)
    for s in range(n_splits):
        ms = tl.load(m_part_ptr + s * R + idx, mask=ok, other=_NEG_BIG)
        ls = tl.load(l_part_ptr + s * R + idx, mask=ok, other=0.0)
        m_new = tl.maximum(m, ms)
        l = l * tl.exp2(m - m_new) + ls * tl.exp2(ms - m_new)
        m = m_new
    if LSE:
        tl.store(coef_ptr + idx, _natural_lse(m, l), mask=ok)
    else:
        coef, coef_last = _row_coefficients(m, l, t, T, n_past, inv_hq, ok)
        tl.store(m_ptr + idx, m, mask=ok)
        tl.store(coef_ptr + idx, coef, mask=ok)
        tl.store(coef_last_ptr + idx, coef_last, mask=ok)


@triton.jit
def _column_mass_accum_kernel(
    q_ptr, k_ptr, m_ptr, coef_ptr, coef_last_ptr,
    mass_ptr, last_ptr, bright_ptr, decay_ptr,
    stride_qh, stride_qt, stride_qd,
    stride_kh, stride_kn, stride_kd,
    n_past, T, GROUP, M, HKV,
    qk_scale, gain,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, HAS_LAST: tl.constexpr, UPDATE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_total = n_past + T
    j0 = pid * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    col_ok = cols < n_total
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < D

    # Rows are t-major; rows with t < j0 - n_past see none of this block's slots.
    first_t = tl.maximum(j0 - n_past, 0)
    rb_start = (first_t * GROUP) // BLOCK_M
    n_rb = tl.cdiv(M, BLOCK_M)

    acc = tl.zeros([BLOCK_N], tl.float32)
    acc_last = tl.zeros([BLOCK_N], tl.float32)
    k_head = k_ptr  # advanced by one head per iteration (pointer arithmetic stays 64-bit)
    for kvh in range(HKV):
        k_ptrs = k_head + cols[:, None].to(tl.int64) * stride_kn + dims[None, :] * stride_kd
        k_head += stride_kh
        k = tl.load(k_ptrs, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
        kt = tl.trans(k)
        for rb in range(rb_start, n_rb):
            rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            t = rows // GROUP
            head = kvh * GROUP + rows % GROUP
            q_ptrs = q_ptr + head[:, None].to(tl.int64) * stride_qh + t[:, None].to(tl.int64) * stride_qt + dims[None, :] * stride_qd
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            stat = kvh * M + rows
            m = tl.load(m_ptr + stat, mask=row_ok, other=0.0)
            coef = tl.load(coef_ptr + stat, mask=row_ok, other=0.0)
            if IEEE:
                s = tl.dot(q, kt, input_precision="ieee")
            else:
                s = tl.dot(q, kt)
            s = s * qk_scale
            visible = (cols[None, :] <= (n_past + t)[:, None]) & row_ok[:, None]
            p = tl.where(visible, tl.exp2(s - m[:, None]), 0.0)
            acc += tl.sum(p * coef[:, None], axis=0)
            if HAS_LAST:
                coef_last = tl.load(coef_last_ptr + stat, mask=row_ok, other=0.0)
                acc_last += tl.sum(p * coef_last[:, None], axis=0)

    mass = tl.load(mass_ptr + cols, mask=col_ok, other=0.0) + acc
    tl.store(mass_ptr + cols, mass, mask=col_ok)
    if HAS_LAST:
        last = tl.load(last_ptr + cols, mask=col_ok, other=0.0) + acc_last
        tl.store(last_ptr + cols, last, mask=col_ok)
    if UPDATE:
        bright = tl.load(bright_ptr + cols, mask=col_ok, other=0.0)
        decay = tl.load(decay_ptr + cols, mask=col_ok, other=0.0)
        tl.store(bright_ptr + cols, brightness_step(bright, mass, decay, cols, n_past, T, gain), mask=col_ok)


def _check_vector(op: str, name: str, tensor: torch.Tensor, n: int) -> None:
    if tensor.dtype != torch.float32 or tensor.dim() != 1 or tensor.numel() < n:
        raise ValueError(f"{op}: {name} must be a float32 vector of at least {n} slots, got {tensor.dtype} {tuple(tensor.shape)}")
    if n > 1 and tensor.stride(0) != 1:
        raise ValueError(f"{op}: {name} must be contiguous (stride 1), got stride {tensor.stride(0)}")


def check_rows(op: str, query, key, n_past) -> None:
    """ValueError prefixed with `op` when query rows [Hq, T, D] and keys [Hkv, N, D] do not fit these kernels:
    shapes and GQA grouping, n_past a host int in range, one fp16/bf16/fp32 dtype, one device the kernels run on."""
    try:
        check_row_inputs(query, key, n_past)
    except ValueError as err:
        raise ValueError(f"{op}: {err}") from None
    if query.dtype not in FLOAT_DTYPES or key.dtype != query.dtype:
        raise ValueError(f"{op}: query and key must share one dtype among fp16/bf16/fp32, got {query.dtype} and {key.dtype}")
    if not isinstance(n_past, int) or isinstance(n_past, bool):
        raise ValueError(f"{op}: n_past must be an int, got {type(n_past).__name__}")
    check_device(op, query=query, key=key)


def _check_inputs(op: str, query, key, n_past, mass, last_row_mass) -> None:
    check_rows(op, query, key, n_past)
    t_rows = query.shape[1]
    _check_vector(op, "mass", mass, n_past + t_rows)
    if last_row_mass is not None:
        _check_vector(op, "last_row_mass", last_row_mass, n_past + t_rows)
    check_device(op, query=query, key=key, mass=mass, last_row_mass=last_row_mass)


def _config(d: int, rows: int, block_n: int | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for head dim `d` and `rows` query rows per KV head."""
    block_d = max(16, next_power_of_2(d))
    block_m = min(64, max(16, next_power_of_2(rows)))
    if block_n is None:
        if interpreting():
            block_n = 256  # fewer, larger programs: the interpreter pays per program and per op
        else:
            block_n = 128 if block_d <= 64 else 64
    num_warps = 4 if block_d <= 64 else 8
    return block_m, block_n, block_d, num_warps


def row_stats(query, key, scaling, n_past, lse: bool = False, block_n: int | None = None,
              splits: int | None = None):
    """Pass 1 (and the merge when it is split): float32 [Hq * T] (row max, coef, coef_last), or with `lse` the
    rows' natural logsumexp in the second vector (rows ordered kvh * G * T + t * G + g, as the kernels index them)."""
    hq, t_rows, d = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    rows = group * t_rows  # rows per KV head
    n = n_past + t_rows
    device = key.device
    block_m, block_n, block_d, num_warps = _config(d, rows, block_n)
    upcast = interpreting() or query.dtype == torch.float32
    ieee = query.dtype == torch.float32
    inv_hq = 1.0 / hq
    r_total = hq * t_rows

    n_rb = cdiv(rows, block_m)
    n_kb = cdiv(n, block_n)
    if splits is None:
        splits = max(1, min(n_kb, 128, parallel_target(device) // max(1, hkv * n_rb)))
    splits = max(1, min(int(splits), n_kb))
    per_split = cdiv(n_kb, splits)
    splits = cdiv(n_kb, per_split)

    f32 = dict(dtype=torch.float32, device=device)
    m_fin = torch.empty(r_total, **f32)
    coef = torch.empty(r_total, **f32)
    coef_last = coef if lse else torch.empty(r_total, **f32)
    final = splits == 1
    if final:
        m_part = l_part = m_fin
    else:
        m_part = torch.empty(splits * r_total, **f32)
        l_part = torch.empty(splits * r_total, **f32)

    _column_mass_stats_kernel[(hkv * n_rb, splits)](
        query, key, m_part if not final else m_fin, l_part, coef, coef_last,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        n_past, t_rows, group, rows, r_total,
        float(scaling) * _LOG2E, inv_hq, per_split,
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast, IEEE=ieee, FINAL=final, LSE=lse, num_warps=num_warps,
    )
    if not final:
        merge_block = 256
        _column_mass_merge_kernel[(cdiv(r_total, merge_block),)](
            m_part, l_part, m_fin, coef, coef_last,
            splits, n_past, t_rows, group, rows, r_total, inv_hq,
            BLOCK=merge_block, LSE=lse,
        )
    return m_fin, coef, coef_last


def _launch(query, key, scaling, n_past, mass, last_row_mass, brightness=None, decay=None, gain=0.0,
            block_n: int | None = None, splits: int | None = None) -> None:
    """Both passes (and the merge when pass 1 is split). `block_n`/`splits` override the heuristics (tests)."""
    hq, t_rows, d = query.shape
    hkv = key.shape[0]
    if t_rows == 0:
        return
    group = hq // hkv
    block_m, block_n, block_d, num_warps = _config(d, group * t_rows, block_n)
    upcast = interpreting() or query.dtype == torch.float32
    ieee = query.dtype == torch.float32
    m_fin, coef, coef_last = row_stats(query, key, scaling, n_past, block_n=block_n, splits=splits)
    update = brightness is not None
    _column_mass_accum_kernel[(cdiv(n_past + t_rows, block_n),)](
        query, key, m_fin, coef, coef_last,
        mass, last_row_mass if last_row_mass is not None else mass,
        brightness if update else mass, decay if update else mass,
        query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2),
        n_past, t_rows, group, group * t_rows, hkv,
        float(scaling) * _LOG2E, float(gain),
        D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        UPCAST=upcast, IEEE=ieee, HAS_LAST=last_row_mass is not None, UPDATE=update, num_warps=num_warps,
    )


def attention_column_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int, mass: torch.Tensor,
                          last_row_mass: torch.Tensor | None = None) -> None:
    """Accumulate one layer's per-slot attention mass into `mass` (in place), without a host sync.

    Args:
        query: [Hq, T, D] fp16/bf16/fp32 query rows of this forward (any strides), RoPE applied.
        key: [Hkv, N, D] keys of the same dtype (any strides, e.g. a view of the cache buffer), N >= n_past + T;
            slots >= n_past + T are not read. Hq % Hkv == 0 (GQA).
        scaling: softmax scale (usually D ** -0.5).
        n_past: retained slots before this forward's rows (host int).
        mass: float32 [C] contiguous, C >= n_past + T: `mass[j] += sum_t n_t * mean_h p_{h,t}[j]` for j < n_past + T.
        last_row_mass: optional float32 [C]: `+= n_{T-1} * mean_h p_{h,T-1}[j]` (the current query only).
    """
    _check_inputs("attention_column_mass", query, key, n_past, mass, last_row_mass)
    _launch(query, key, scaling, n_past, mass, last_row_mass)


def attention_column_mass_and_update(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int,
                                     mass: torch.Tensor, brightness: torch.Tensor, decay: torch.Tensor,
                                     alpha: float, num_layers: int, last_row_mass: torch.Tensor | None = None) -> None:
    """Last layer of a forward: accumulate its column mass, then apply the brightness update, in one pass-2 launch.

    Equivalent to `attention_column_mass(query, key, scaling, n_past, mass, last_row_mass)` followed by
    `update_brightness(brightness, mass, decay, n_past, T, alpha, num_layers)`: the program that owns slots
    `j .. j + BLOCK_N` adds this layer's mass and immediately updates their brightness (the update needs no
    other slot), so the fused op costs the column-mass launches and nothing more.

    Args:
        brightness: float32 [C] updated in place on slots `0 .. n_past + T - 1`, clamped to [0, 255].
        decay: float32 [>= n_past + T] per-slot decay per tic.
        alpha, num_layers: gain `alpha / num_layers` on the layer-summed mass.
        Other arguments as `attention_column_mass`.
    """
    op = "attention_column_mass_and_update"
    _check_inputs(op, query, key, n_past, mass, last_row_mass)
    n = n_past + query.shape[1]
    _check_vector(op, "brightness", brightness, n)
    _check_vector(op, "decay", decay, n)
    check_device(op, key=key, brightness=brightness, decay=decay)
    if num_layers <= 0:
        raise ValueError(f"{op}: num_layers must be positive, got {num_layers}")
    _launch(query, key, scaling, n_past, mass, last_row_mass, brightness=brightness, decay=decay,
            gain=float(alpha) / num_layers)


__all__ = ["attention_column_mass", "attention_column_mass_and_update"]
