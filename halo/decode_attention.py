"""Decode attention with its column mass: the output of one decode row and the mass Halo reads, in one pass.

A decode step on CPU otherwise reads every layer's keys twice: SDPA for the output, then the column mass operator
(halo.decode_mass) for the attention each slot received. `torch.ops.halo.decode_attention`
(csrc/decode_attention.cpp) computes the logits and the softmax once and returns the output beside the mass; on
the CPU the cache's attention function takes it for every plain decode row (halo.capture).
`decode_attention_reference` is its PyTorch twin and defines the semantics; `decode_attention` runs the operator
where it applies and the twin elsewhere.
"""

from __future__ import annotations

import functools

import torch

from .extension import load_operators


@functools.lru_cache(maxsize=None)
def operator_available() -> bool:
    """True when `halo._C` registers `torch.ops.halo.decode_attention` (a stale build may lack it)."""
    def fake(query, key, value, scaling, counts, mass, last_row_mass):
        return query.new_empty(query.shape)
    return load_operators({"decode_attention": fake})


def takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """True when the operator computes this call: float32 query [Hq, D], key and value on the CPU."""
    return (query.dim() == 2 and operator_available()
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (query, key, value)))


def fuses(cache, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """True when `cache`'s forward in flight meets this layer's attention (query [1, Hq, T, D], key and value
    [1, Hkv, N, D]) as one plain decode row (no patch rows, no custom visibility) whose output its backend computes
    with the column mass: the attention function then takes `cache.capture_layer(..., value)`'s output for SDPA's.
    """
    spec = cache.current_spec
    return (cache.backend.decode_attention is not None and spec.streams and cache.policy.needs_attention
            and spec.visible is None and spec.rows == 1 and query.shape[0] == 1 and query.shape[2] == 1
            and takes(query[0, :, 0], key[0], value[0]))


def decode_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                               counts: torch.Tensor, mass: torch.Tensor,
                               last_row_mass: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [Hq, D]: the attention output of one decode row; adds the row's column mass into `mass` in place.

    Args:
        query: [Hq, D], the decode row's query heads (RoPE applied).
        key, value: [Hkv, N, D], a layer's K/V views (Hq % Hkv == 0, GQA: query head q reads KV head q // G).
        scaling: softmax scale.
        counts: int64 [Hkv]: retained slots of each KV head before the decode row; head h sees its first
            `counts[h] + 1` slots (the row's own is the last), N >= max(counts) + 1.
        mass: float32 [Hkv, C] (one row per KV head: row h receives `(counts[h] + 1) / G` times the sum of its G
            query heads' probabilities) or [1, C] (one row for the layer, every head holding the same count:
            `(counts + 1) / Hq` times the sum over all query heads), the income normalisation of brightness.
        last_row_mass: None or the same shape as `mass`: receives the same (the decode row is the last row).
    """
    hq, d = query.shape
    heads = key.shape[0]
    group = hq // heads
    visible = counts.to(device=key.device, dtype=torch.int64) + 1
    width = int(visible.max())
    if mass.shape[0] != heads and bool((visible != width).any()):
        raise ValueError("decode_attention: a one-row mass needs every head to hold the same slots, got "
                         f"{counts.tolist()}")
    logits = query.float().view(heads, group, d) @ key[:, :width].float().transpose(1, 2) * scaling  # [Hkv, G, W]
    hidden = torch.arange(width, device=key.device) >= visible[:, None]  # [Hkv, W]
    probs = logits.masked_fill(hidden[:, None], float("-inf")).softmax(-1)
    if mass.shape[0] == heads:
        column = probs.sum(1) * (visible.float() / group)[:, None]  # [Hkv, W]
    else:
        column = probs.sum((0, 1))[None] * (width / hq)
    for target in (mass, last_row_mass):
        if target is not None:
            target[:, :width] += column
    return (probs @ value[:, :width].float()).view(hq, d)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
                     counts: torch.Tensor, mass: torch.Tensor,
                     last_row_mass: torch.Tensor | None = None) -> torch.Tensor:
    """`decode_attention_reference` (same arguments and result), one operator call where `takes` says so."""
    if takes(query, key, value):
        return torch.ops.halo.decode_attention(query, key, value, scaling, counts.to(dtype=torch.int64), mass,
                                               last_row_mass)
    return decode_attention_reference(query, key, value, scaling, counts, mass, last_row_mass)
