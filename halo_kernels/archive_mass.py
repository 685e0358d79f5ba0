"""Archive mass: the attention mass each archived key would earn if it alone were put back in the cache.

Twin of `halo.archive_mass.archive_mass` (same signature, same semantics). For query head `h` and archived
entry `a`,

    mass[h, a] = sum_t row_weight[t] * sigmoid(scaling * q_{h,t} . k_{h // G, a} - row_lse[h, t])

and 0 where `valid[a]` is False. One launch, grid (archive blocks,): each program owns BLOCK_A entries and loops
over the KV heads, loading its [BLOCK_A, D] key block of that head once. Two ways through the `G = Hq / Hkv`
query heads that share it (GQA), chosen on the host:
- grouped (few rows: padded G x T at most 64, decode's T = 1 among them): the group's G x T rows form one
  [BLOCK_G * BLOCK_T, D] operand (row g * BLOCK_T + t), one `tl.dot` per KV head gives every head's logits, and a
  reshape to [BLOCK_G, BLOCK_T, BLOCK_A] sums each head's rows. At T = 1 that is one dot per KV head instead of
  G dots of 15 padding rows each.
- per head (long chunks): for each query head, its T rows in blocks of BLOCK_M, one `tl.dot` each.
Either way `sum_t w_t * sigmoid(s_ta - lse_t)` accumulates in registers and each (head, entry) is written once
(plain store, no atomics, deterministic); invalid entries are neither read nor scored and are written as 0.

`halo_kernels.retained_rows.retained_mass` runs it with SOFTMAX set over the retained keys: `exp` in place of the
sigmoid gives the mass each retained slot drew at each head (the bars recall reads hits against).

`archive_ratio` runs the same kernel with POOL set: a program owns every head of its entries, so it scales each
head's mass by `head_scale[h]` and pools over heads in registers (POOL 1 the sum, 2 the best KV head group's mean,
3 the best head) and writes float32 [A]: no [Hq, A] mass in memory, no pooling launches after it.

The sigmoid is `1 / (1 + exp2((lse - s) * log2 e))` with the logits pre-scaled by `scaling * log2 e`: exp2 of a
large argument gives +inf and the probability 0, of a very negative one 0 and the probability 1 (no NaN).

Dtypes: query/keys fp16, bf16 or fp32; products accumulate in fp32 (fp32 inputs, or a query and keys of two
different dtypes, are upcast and use IEEE fp32 dot, not TF32). Under the Triton interpreter inputs are upcast
to fp32 right after loading.
"""

from __future__ import annotations

import numbers

import torch
import triton
import triton.language as tl

from ._common import FLOAT_DTYPES, cdiv, check_device, interpreting, next_power_of_2

_LOG2E = 1.4426950408889634
_LOG2E_K = tl.constexpr(_LOG2E)


@triton.jit
def _weighted_prob(q_ptr, lse_ptr, w_ptr, kt, head, t, row_ok, dims, d_ok,
                   stride_qh, stride_qt, stride_qd, stride_lh, stride_lt, stride_w, qk_scale,
                   UPCAST: tl.constexpr, IEEE: tl.constexpr, SOFTMAX: tl.constexpr):
    """float32 [rows, BLOCK_A]: w_t * sigmoid(scaling * q_{head, t} . k_a - lse_{head, t}) for row r = (head[r], t[r])
    (with SOFTMAX: w_t * exp(...), the probability of a key the row saw), 0 where not row_ok; kt is the
    [BLOCK_D, BLOCK_A] key block, transposed."""
    q_ptrs = (q_ptr + head.to(tl.int64)[:, None] * stride_qh + t[:, None].to(tl.int64) * stride_qt
              + dims[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    lse = tl.load(lse_ptr + head.to(tl.int64) * stride_lh + t.to(tl.int64) * stride_lt, mask=row_ok, other=0.0)
    lse = lse * _LOG2E_K
    w = tl.load(w_ptr + t.to(tl.int64) * stride_w, mask=row_ok, other=0.0)
    if IEEE:
        s = tl.dot(q, kt, input_precision="ieee")
    else:
        s = tl.dot(q, kt)
    if SOFTMAX:  # a retained key: its softmax probability; padded rows (lse 0, weight 0) stay finite
        return tl.exp2(tl.minimum(s * qk_scale - lse[:, None], 0.0)) * w[:, None]
    # sigmoid(scaling * q.k - lse) in base 2; padded rows have weight 0 and a finite probability
    return 1.0 / (1.0 + tl.exp2(lse[:, None] - s * qk_scale)) * w[:, None]


@triton.jit
def _archive_mass_kernel(
    q_ptr, k_ptr, valid_ptr, lse_ptr, w_ptr, scale_ptr, out_ptr,
    stride_qh, stride_qt, stride_qd,
    stride_kh, stride_ka, stride_kd,
    stride_lh, stride_lt, stride_w, stride_v, stride_s, stride_oh,
    A, GROUP, T, HKV,
    qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    GROUPED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_T: tl.constexpr, POOL: tl.constexpr,
    SOFTMAX: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    col_ok = cols < A
    if SOFTMAX:  # retained keys: every one is held
        valid = col_ok
    else:
        valid = tl.load(valid_ptr + cols.to(tl.int64) * stride_v, mask=col_ok, other=0) != 0
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < D
    n_rb = tl.cdiv(T, BLOCK_M)
    pooled = tl.zeros([BLOCK_A], tl.float32)  # POOL > 0: the sum or best over heads so far (scores are >= 0)

    k_head = k_ptr  # advanced by one head per iteration (pointer arithmetic stays 64-bit)
    for kvh in range(HKV):
        k_ptrs = k_head + cols[:, None].to(tl.int64) * stride_ka + dims[None, :] * stride_kd
        k_head += stride_kh
        k = tl.load(k_ptrs, mask=valid[:, None] & d_ok[None, :], other=0.0)  # invalid entries are never read
        if UPCAST:
            k = k.to(tl.float32)
        kt = tl.trans(k)
        if GROUPED:  # row g * BLOCK_T + t: query head kvh * GROUP + g, row t
            g_of = tl.arange(0, BLOCK_G * BLOCK_T) // BLOCK_T
            t = tl.arange(0, BLOCK_G * BLOCK_T) % BLOCK_T
            p = _weighted_prob(q_ptr, lse_ptr, w_ptr, kt, kvh * GROUP + g_of, t, (g_of < GROUP) & (t < T), dims,
                               d_ok, stride_qh, stride_qt, stride_qd, stride_lh, stride_lt, stride_w, qk_scale,
                               UPCAST, IEEE, SOFTMAX)
            acc_g = tl.sum(tl.reshape(p, [BLOCK_G, BLOCK_T, BLOCK_A]), axis=1)  # [BLOCK_G, BLOCK_A]
            gs = tl.arange(0, BLOCK_G)
            if POOL == 0:
                out_ptrs = out_ptr + (kvh * GROUP + gs).to(tl.int64)[:, None] * stride_oh + cols[None, :]
                tl.store(out_ptrs, tl.where(valid[None, :], acc_g, 0.0),
                         mask=(gs < GROUP)[:, None] & col_ok[None, :])
            else:  # padded heads have scale 0
                scale = tl.load(scale_ptr + (kvh * GROUP + gs).to(tl.int64) * stride_s, mask=gs < GROUP, other=0.0)
                scaled = acc_g * scale[:, None]
                if POOL == 1:
                    pooled += tl.sum(scaled, axis=0)
                elif POOL == 2:
                    pooled = tl.maximum(pooled, tl.sum(scaled, axis=0) / GROUP)
                else:
                    pooled = tl.maximum(pooled, tl.max(scaled, axis=0))
        else:
            group_sum = tl.zeros([BLOCK_A], tl.float32)
            for g in range(GROUP):
                head = kvh * GROUP + g
                acc = tl.zeros([BLOCK_A], tl.float32)
                for rb in range(n_rb):
                    t = rb * BLOCK_M + tl.arange(0, BLOCK_M)
                    p = _weighted_prob(q_ptr, lse_ptr, w_ptr, kt, head + tl.zeros_like(t), t, t < T, dims, d_ok,
                                       stride_qh, stride_qt, stride_qd, stride_lh, stride_lt, stride_w, qk_scale,
                                       UPCAST, IEEE, SOFTMAX)
                    acc += tl.sum(p, axis=0)
                if POOL == 0:
                    tl.store(out_ptr + head.to(tl.int64) * stride_oh + cols, tl.where(valid, acc, 0.0), mask=col_ok)
                else:
                    scaled = acc * tl.load(scale_ptr + head.to(tl.int64) * stride_s)
                    if POOL == 3:
                        pooled = tl.maximum(pooled, scaled)
                    else:
                        group_sum += scaled
            if POOL == 1:
                pooled += group_sum
            elif POOL == 2:
                pooled = tl.maximum(pooled, group_sum / GROUP)
    if POOL != 0:
        tl.store(out_ptr + cols, tl.where(valid, pooled, 0.0), mask=col_ok)


def _check(op, query, keys, valid, scaling, row_lse, row_weight) -> None:
    for name, tensor in (("query", query), ("keys", keys), ("valid", valid), ("row_lse", row_lse), ("row_weight", row_weight)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a tensor, got {type(tensor).__name__}")
    if query.dim() != 3 or keys.dim() != 3:
        raise ValueError(f"{op}: query must be [Hq, T, D] and keys [Hkv, A, D]; got {tuple(query.shape)} and {tuple(keys.shape)}")
    hq, t_rows, d = query.shape
    hkv, entries, dk = keys.shape
    if d != dk or hkv == 0 or hq % hkv:
        raise ValueError(f"{op}: query {tuple(query.shape)} does not fit keys {tuple(keys.shape)} "
                         f"(head dims must match and Hq a multiple of Hkv)")
    if query.dtype not in FLOAT_DTYPES or keys.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: query and keys must be fp16/bf16/fp32, got {query.dtype} and {keys.dtype}")
    if valid.dtype != torch.bool or tuple(valid.shape) != (entries,):
        raise ValueError(f"{op}: valid must be a bool [A] tensor with A = {entries}, got {valid.dtype} {tuple(valid.shape)}")
    if row_lse.dtype != torch.float32 or tuple(row_lse.shape) != (hq, t_rows):
        raise ValueError(f"{op}: row_lse must be a float32 [Hq, T] = [{hq}, {t_rows}] tensor, got "
                         f"{row_lse.dtype} {tuple(row_lse.shape)}")
    if row_weight.dtype != torch.float32 or tuple(row_weight.shape) != (t_rows,):
        raise ValueError(f"{op}: row_weight must be a float32 [T] = [{t_rows}] tensor, got "
                         f"{row_weight.dtype} {tuple(row_weight.shape)}")
    if not isinstance(scaling, numbers.Real) or isinstance(scaling, bool):
        raise ValueError(f"{op}: scaling must be a float, got {scaling!r}")
    check_device(op, query=query, keys=keys, valid=valid, row_lse=row_lse, row_weight=row_weight)


GROUPED_ROWS = 64
"""The grouped path's largest operand: padded G x T rows of one KV head's query group in one `tl.dot`."""


def _grouping(group: int, rows: int) -> tuple[int, int] | None:
    """(BLOCK_G, BLOCK_T) of the grouped path for `group` query heads per KV head and `rows` rows each, or None when
    their padded product passes GROUPED_ROWS (the per-head path). BLOCK_G grows so the operand has >= 16 rows."""
    block_t = next_power_of_2(rows)
    block_g = max(next_power_of_2(group), 16 // block_t if block_t < 16 else 1)
    return (block_g, block_t) if block_g * block_t <= GROUPED_ROWS else None


def _config(d: int, rows: int, entries: int, block_a: int | None = None):
    """(BLOCK_M, BLOCK_A, BLOCK_D, num_warps) for head dim `d`, `rows` query rows per head and `entries`."""
    block_d = max(16, next_power_of_2(d))
    block_m = min(64, max(16, next_power_of_2(rows)))  # tl.dot needs >= 16 on every side
    if block_a is None:
        if interpreting():
            block_a = 256  # fewer, larger programs: the interpreter pays per program and per op
        else:
            block_a = 128 if block_d <= 64 else 64
        block_a = min(block_a, max(16, next_power_of_2(entries)))
    num_warps = 4 if block_d <= 64 else 8
    return block_m, block_a, block_d, num_warps


POOLS = {"mean": 1, "group": 2, "each": 3}
"""The kernel's POOL for each HaloConfig.recall_heads value (0: no pooling, the [Hq, A] mass)."""


def launch(query, keys, valid, scaling, row_lse, row_weight, head_scale=None, heads: str | None = None,
           block_a: int | None = None, grouped: bool | None = None, softmax: bool = False) -> torch.Tensor:
    """The one launch: float32 [Hq, A] without `heads`, else [A] pooled with `head_scale`; `block_a` overrides the
    heuristic, `grouped` the choice of path (tests; None: by size). With `softmax` (valid None: every key held)
    each term is the softmax probability `exp(s - lse)` of a key the rows saw instead of the sigmoid."""
    hq, t_rows, d = query.shape
    hkv, entries, _ = keys.shape
    pool = 0 if heads is None else POOLS[heads]
    out = torch.empty((hq, entries) if pool == 0 else (entries,), dtype=torch.float32, device=keys.device)
    if entries == 0:
        return out
    if t_rows == 0:
        return out.zero_()
    group = hq // hkv
    block_m, block_a, block_d, num_warps = _config(d, t_rows, entries, block_a)
    grouping = _grouping(group, t_rows) if grouped is None or grouped else None
    if grouped and grouping is None:
        raise ValueError(f"archive_mass: {group} x {t_rows} rows per KV head are too many for the grouped path")
    block_g, block_t = grouping or (1, 1)
    same = query.dtype == keys.dtype
    upcast = interpreting() or not same or query.dtype == torch.float32
    ieee = upcast  # fp32 operands: IEEE fp32 dot, not TF32
    valid_bytes = (row_weight if valid is None else valid.view(torch.uint8))  # not read with softmax
    scale = row_weight if head_scale is None else head_scale  # any float32 tensor: not read without pooling
    _archive_mass_kernel[(cdiv(entries, block_a),)](
        query, keys, valid_bytes, row_lse, row_weight, scale, out,
        query.stride(0), query.stride(1), query.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2),
        row_lse.stride(0), row_lse.stride(1), row_weight.stride(0), valid_bytes.stride(0), scale.stride(0),
        out.stride(0),
        entries, group, t_rows, hkv,
        float(scaling) * _LOG2E,
        D=d, BLOCK_M=block_m, BLOCK_A=block_a, BLOCK_D=block_d,
        UPCAST=upcast, IEEE=ieee, GROUPED=grouping is not None, BLOCK_G=block_g, BLOCK_T=block_t, POOL=pool,
        SOFTMAX=softmax, num_warps=num_warps,
    )
    return out


def archive_mass(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                 row_lse: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """float32 [Hq, A]: `sum_t row_weight[t] * sigmoid(scaling * q_{h,t} . k_{h//G, a} - row_lse[h, t])`, 0 where invalid.

    One launch, no host sync; the result is a new tensor on the keys' device.

    Args:
        query: [Hq, T, D] fp16/bf16/fp32 query rows (any strides), RoPE applied.
        keys: [Hkv, A, D] fp16/bf16/fp32 archived keys (any strides), Hq % Hkv == 0 (query head h reads key
            head h // (Hq / Hkv)). Keys of invalid entries are not read.
        valid: bool [A] which archive entries hold a token.
        scaling: softmax scale (host float).
        row_lse: float32 [Hq, T] (`halo.archive_mass.retained_rows`); row_weight: float32 [T]
            (`halo.archive_mass.row_weights`); any strides.
    Raises ValueError naming the problem (shape, dtype, device).
    """
    _check("archive_mass", query, keys, valid, scaling, row_lse, row_weight)
    return launch(query, keys, valid, scaling, row_lse, row_weight)


def archive_ratio(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                  row_lse: torch.Tensor, row_weight: torch.Tensor, head_scale: torch.Tensor, heads: str
                  ) -> torch.Tensor:
    """float32 [A]: the archived tokens' scores pooled over heads (`halo.archive_mass.archive_ratio`), 0 where
    invalid, in the same launch as the mass: no [Hq, A] intermediate. One launch, no host sync.

    Args:
        query, keys, valid, scaling, row_lse, row_weight: as `archive_mass`; head_scale: float32 [Hq] on the
        keys' device; heads: "mean" (sum of the scaled masses), "group" (the best KV head group's mean) or
        "each" (the best head).
    Raises ValueError naming the problem (shape, dtype, device, heads).
    """
    _check("archive_ratio", query, keys, valid, scaling, row_lse, row_weight)
    if heads not in POOLS:
        raise ValueError(f"archive_ratio: heads must be one of {sorted(POOLS)}, got {heads!r}")
    if not isinstance(head_scale, torch.Tensor) or head_scale.dtype != torch.float32 or \
            tuple(head_scale.shape) != (query.shape[0],):
        raise ValueError(f"archive_ratio: head_scale must be a float32 [Hq] = [{query.shape[0]}] tensor, got "
                         f"{getattr(head_scale, 'dtype', type(head_scale).__name__)} "
                         f"{tuple(getattr(head_scale, 'shape', ()))}")
    check_device("archive_ratio", keys=keys, head_scale=head_scale)
    return launch(query, keys, valid, scaling, row_lse, row_weight, head_scale, heads)


__all__ = ["archive_mass", "archive_ratio"]
