"""Brightness: per-slot attention mass of a forward's query rows, and the brightness update (reference path).

Both functions have fused Triton twins in `halo_kernels` with the same signatures; these are the plain-PyTorch
references that define the semantics and run on CPU.

Semantics. A forward adds T new slots after `n_past` retained ones; its query row t (0-based) sees the
`n_t = n_past + t + 1` slots `0 .. n_past + t` (everything retained plus the new rows up to itself). For each
layer, `p_{h,t}[j]` is the softmax probability of row t, head h, on slot j. Each row is one tic:

    mass[j]       += sum_t n_t * mean_h p_{h,t}[j]        (per layer; uniform attention reads 1.0 per row)
    brightness[j]  = clamp(brightness[j] + alpha * mass[j] / num_layers - decay[j] * rows_seeing[j], 0, 255)

where `rows_seeing[j]` is the number of rows that see slot j (T for old slots, T - s for the s-th new slot), so
feeding text in one chunk or token by token gives the same brightness whenever nothing clamps.
"""

from __future__ import annotations

import functools

import torch

from halo_kernels.checks import check_mass_inputs

MAX_BRIGHTNESS = 255.0
# Bound on the [Hq, rows, N] fp32 block the reference materialises at once (elements).
_BLOCK_ELEMENTS = 1 << 22


def attention_column_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    n_past: int,
    mass: torch.Tensor,
    last_row_mass: torch.Tensor | None = None,
) -> None:
    """Accumulate one layer's per-slot attention mass into `mass` (in place).

    Args:
        query: [Hq, T, D] query rows of this forward (fp16/bf16/fp32), RoPE applied.
        key: [Hkv, N, D] cached keys, N >= n_past + T; slots >= n_past + T are ignored. Hq % Hkv == 0 (GQA).
        scaling: softmax scale (usually D ** -0.5).
        n_past: retained slots before this forward's rows.
        mass: float32 [C], C >= n_past + T: receives `sum_t n_t * mean_h p_{h,t}[j]` for j < n_past + T.
        last_row_mass: optional float32 [C]: receives `n_{T-1} * mean_h p_{h,T-1}[j]` (the current query only).
    """
    check_mass_inputs(query, key, n_past, mass)
    hq, t_rows, d = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    n = n_past + t_rows
    k_t = key[:, :n].float().transpose(1, 2)  # [Hkv, D, N]
    q = query.float().reshape(hkv, group * t_rows, d)  # rows ordered (g, t)
    if t_rows == 1:  # a decode step: the general path's arithmetic, without its bookkeeping
        probs = torch.softmax(torch.matmul(q, k_t).mul_(scaling), dim=-1)  # [Hkv, G, N]
        mass[:n] += torch.matmul(_row_weight(n, hq, group, key.device), probs).sum(dim=0)
        if last_row_mass is not None:
            last_row_mass[:n] += probs.sum(dim=(0, 1)) * (float(n) / hq)
        return
    rows_per_block = max(1, _BLOCK_ELEMENTS // max(1, hq * n))
    # one block (every decode step) adds straight into `mass`; several sum first, then add
    total = mass[:n] if rows_per_block >= t_rows else torch.zeros(n, dtype=torch.float32, device=key.device)
    for start in range(0, t_rows, rows_per_block):
        stop = min(t_rows, start + rows_per_block)
        rows = stop - start
        block = q.view(hkv, group, t_rows, d)[:, :, start:stop].reshape(hkv, group * rows, d)
        logits = torch.matmul(block, k_t).mul_(scaling).view(hkv, group, rows, n)
        if t_rows > 1:
            # only the new columns can be invisible: row t sees new slot s iff s <= t
            new_cols = torch.arange(t_rows, device=key.device)
            hidden = new_cols[None, :] > torch.arange(start, stop, device=key.device)[:, None]  # [rows, T]
            logits[..., n_past:].masked_fill_(hidden, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        weight = torch.arange(n_past + start + 1, n_past + stop + 1, device=key.device, dtype=torch.float32)
        weight = (weight / hq).repeat(group)  # n_t / Hq for each (g, t) row
        total += torch.matmul(weight, probs.view(hkv, group * rows, n)).sum(dim=0)
        if last_row_mass is not None and stop == t_rows:
            last_row_mass[:n] += probs[:, :, -1].sum(dim=(0, 1)) * (float(n) / hq)
    if rows_per_block < t_rows:
        mass[:n] += total


def attention_column_mass_heads(query: torch.Tensor, key: torch.Tensor, scaling: float, counts: list[int],
                                mass: torch.Tensor, last_row_mass: torch.Tensor | None = None, *,
                                per_head=attention_column_mass) -> None:
    """Per-head memory (halo.head_cache): each KV head's column mass from its own query heads, in place.

    Args:
        query: [Hq, T, D]; key: [Hkv, N, D], the layer's key view; KV head h's query heads are
            `query[h * G:(h + 1) * G]` (G = Hq / Hkv).
        counts: retained slots of each KV head before this forward (host ints, Hkv of them); head h's new rows sit
            at slots `counts[h] .. counts[h] + T - 1`, and N >= max(counts) + T.
        mass, last_row_mass: float32 [Hkv, C]: row h receives `per_head(query of head h, key[h:h + 1], scaling,
            counts[h], ...)`, the column mass over head h's own slots (the mean over its G query heads).
        per_head: the single-head column mass to run (a backend's `attention_column_mass`).
    """
    heads = key.shape[0]
    group = query.shape[0] // heads
    for head, n_past in enumerate(counts):
        per_head(query[head * group:(head + 1) * group], key[head:head + 1, : n_past + query.shape[1]], scaling,
                 n_past, mass[head], None if last_row_mass is None else last_row_mass[head])


@functools.lru_cache(maxsize=64)
def _row_weight(n: int, hq: int, group: int, device: torch.device) -> torch.Tensor:
    """float32 [group]: n / Hq for each query head of a KV group, as the general path computes it."""
    with torch.inference_mode(False):
        return (torch.arange(n, n + 1, device=device, dtype=torch.float32) / hq).repeat(group)


def rows_seeing(n_past: int, t_rows: int, device) -> torch.Tensor:
    """float32 [n_past + T]: how many of this forward's rows see each slot (T for old slots, T - s for new slot s).

    Each row that sees a slot is one step of its decay (one "tic" in the design's words).
    """
    idx = torch.arange(n_past + t_rows, device=device)
    return (t_rows - (idx - n_past).clamp(min=0)).to(torch.float32)


def update_brightness(
    brightness: torch.Tensor,
    mass: torch.Tensor,
    decay: torch.Tensor,
    n_past: int,
    t_rows: int,
    alpha: float,
    num_layers: int,
) -> None:
    """Apply one forward's brightness update in place on slots `0 .. n_past + T - 1`.

    Args:
        brightness: float32 [C] per-slot brightness (newborn slots already hold their source's initial value).
        mass: float32 [C] attention mass summed over layers (see `attention_column_mass`).
        decay: float32 [C] per-slot decay per tic (0 for pinned sources).
        n_past, t_rows: retained slots before the forward and rows in it.
        alpha: gain on normalised attention.
        num_layers: layers whose mass was summed (mass / num_layers is the layer average).
    """
    n = n_past + t_rows
    seen_by = rows_seeing(n_past, t_rows, brightness.device)
    updated = brightness[:n] + mass[:n] * (alpha / num_layers) - decay[:n] * seen_by
    brightness[:n] = updated.clamp_(0.0, MAX_BRIGHTNESS)


def attention_column_mass_and_update(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    n_past: int,
    mass: torch.Tensor,
    brightness: torch.Tensor,
    decay: torch.Tensor,
    alpha: float,
    num_layers: int,
    last_row_mass: torch.Tensor | None = None,
) -> None:
    """The last layer of a forward: accumulate its column mass, then apply the brightness update (in place).

    Reference twin of the fused kernel `halo_kernels.attention_column_mass_and_update`: exactly
    `attention_column_mass(query, key, scaling, n_past, mass, last_row_mass)` followed by
    `update_brightness(brightness, mass, decay, n_past, T, alpha, num_layers)`, with T = query.shape[1] and
    `mass` holding the sum over all `num_layers` layers once this layer is added. `decay` is float32 [>= n_past + T].
    """
    attention_column_mass(query, key, scaling, n_past, mass, last_row_mass)
    update_brightness(brightness, mass, decay, n_past, query.shape[1], alpha, num_layers)


def update_brightness_layers(brightness: torch.Tensor, mass: torch.Tensor, decay: torch.Tensor,
                             n_past: torch.Tensor, t_rows: int, alpha: float) -> None:
    """Per-layer memory: apply one forward's brightness update to every layer's own slots, in place.

    Layer l's slot j: `b = clamp(b + alpha * mass[l, j] - decay[l, j] * rows_seeing_l(j), 0, 255)`, with
    `rows_seeing_l` as in `rows_seeing(n_past[l], T)` (0 past that layer's slots), so each layer's brightness
    follows exactly the token-level rule fed by that layer's attention alone (num_layers = 1).

    Args:
        brightness, mass, decay: float32 [L, n] (views of the first n columns, n >= max(n_past) + T).
        n_past: int64 [L] retained slots of each layer before the forward; t_rows: T.
    """
    idx = torch.arange(brightness.shape[1], device=brightness.device)[None, :]
    seen_by = (t_rows - (idx - n_past.to(brightness.device)[:, None]).clamp(min=0)).clamp(min=0).to(torch.float32)
    brightness.copy_((brightness + mass * alpha - decay * seen_by).clamp_(0.0, MAX_BRIGHTNESS))


def value_norms(values: torch.Tensor) -> torch.Tensor:
    """float32 [T]: each row's value vector norm, averaged over KV heads, from values [Hkv, T, D] (any dtype)."""
    return values.float().norm(dim=-1).mean(0)


def value_weights(norms: torch.Tensor, power: float) -> torch.Tensor:
    """float32 [n]: `norms ** power` over its mean over the n slots given (HaloConfig.value_weight), so the weights
    average 1: a layer's attention mass times these still reads 1.0 per row on average, and a slot whose value is
    large earns more of it, since a row reads `p_j * v_j` from it, not `p_j` alone. The rule for one row: the cache
    weighs a layer's rows at once with `value_weights_rows`, which tests hold to this row by row."""
    weights = norms.clamp(min=1e-12).pow(power)
    return weights / weights.mean()


def value_weights_rows(norms: torch.Tensor, ends: torch.Tensor, power: float) -> torch.Tensor:
    """float32 [R, W]: row r is `value_weights(norms[r, :ends[r]], power)` followed by ones (int64 ends [R], each
    in [1, W]): the weights of several rows (the KV heads of a layer) in one pass."""
    inside = torch.arange(norms.shape[1], device=norms.device) < ends[:, None]
    weights = torch.where(inside, norms.clamp(min=1e-12).pow(power), 0.0)
    weights = weights * (ends[:, None] / weights.sum(1, keepdim=True))
    return torch.where(inside, weights, 1.0)
