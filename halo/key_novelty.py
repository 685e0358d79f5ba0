"""Key novelty: how unlike the other keys of its (layer, KV head) a retained key points.

Why (measured on SmolLM2-135M; README, "Key novelty"): attention income says what the rows read so far; it
predicts poorly what later rows will read. A key that points where most keys of its head point (the common
direction of the held keys) matches any query about as well as its neighbours do, so dropping it loses little;
a key that points elsewhere is the one some later query will match and nothing else can stand in for (KeyDiff,
Park et al. 2025, ranks by this alone). `HaloConfig(key_weight=k)` multiplies each slot's cull basis (brightness,
or the mean income) by `exp(k * novelty)`: the log of the basis and the novelty add.
"""

from __future__ import annotations

import functools

import torch

from .extension import load_operators


@functools.lru_cache(maxsize=None)
def operator_available() -> bool:
    """True when `halo._C` registers `torch.ops.halo.key_cosines` (a stale build may lack it)."""
    return load_operators({"key_cosines": lambda keys, counts: keys.new_empty(keys.shape[:3])})


def key_cosines_reference(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """float32 [L, Hkv, n]: cos(key, anchor) of every key of `keys` ([L, Hkv, n, D], any float dtype), the anchor
    of (l, h) the sum of the unit vectors of its first `counts[l, h]` keys (int64 [L, Hkv])."""
    keys = keys.float()
    tiny = torch.finfo(torch.float32).tiny
    inverse = keys.norm(dim=-1).clamp_min(tiny).reciprocal()  # [L, Hkv, n]
    held = torch.arange(keys.shape[2], device=keys.device) < counts[..., None]
    anchor = ((inverse * held).unsqueeze(-2) @ keys).squeeze(-2)  # [L, Hkv, D]
    anchor_inverse = anchor.norm(dim=-1, keepdim=True).clamp_min(tiny).reciprocal()
    return (keys @ anchor.unsqueeze(-1)).squeeze(-1) * inverse * anchor_inverse


def key_cosines(keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """`key_cosines_reference` (same arguments); one operator call for float32 keys on the CPU."""
    if keys.device.type == "cpu" and keys.dtype == torch.float32 and keys.shape[2] > 0 and operator_available():
        return torch.ops.halo.key_cosines(keys, counts.to(device="cpu", dtype=torch.int64))
    return key_cosines_reference(keys, counts)


def key_novelty(kv: torch.Tensor, n: int, counts: torch.Tensor | None, per_head: bool) -> torch.Tensor:
    """float32 novelty of each retained slot's key, centred on its row's mean over the held slots (0 on free slots).

    Args:
        kv: [L, 2, Hkv, C, D] K/V buffers (any float dtype); slots 0 .. n - 1 are read.
        n: the retained slots (n_valid).
        counts: int64 held slots per row ([L] per layer, [L * Hkv] per head), or None: one set of n slots for
            all layers.
        per_head: True for per-head memory (one row per KV head of every layer).

    Returns:
        [L * Hkv, n] per head, [L, n] per layer (the mean over the layer's KV heads), [n] for one set (the mean over
        layers and heads). Novelty of a key k at head (l, h) is `-cos(k, a)`, `a` the sum of the unit vectors of
        (l, h)'s held keys, minus the mean of that value over the row's held slots.
    """
    layers, heads = kv.shape[0], kv.shape[2]
    if counts is None:
        counts = torch.full((layers, heads), n, dtype=torch.int64, device=kv.device)
        per_row = None
    else:
        per_row = counts
        counts = counts.view(layers, -1).expand(layers, heads)
    cosine = key_cosines(kv[:, 0, :, :n], counts)  # [L, Hkv, n]
    slot = torch.arange(n, device=kv.device)
    if per_head:
        cosine, held = cosine.reshape(layers * heads, n), slot < per_row[:, None]
    elif per_row is not None:
        cosine, held = cosine.mean(1), slot < per_row[:, None]
    else:
        cosine, held = cosine.mean((0, 1)), slot < n
    held_f = held.float()
    mean = (cosine * held_f).sum(-1, keepdim=True) / held_f.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.where(held, mean - cosine, torch.zeros_like(cosine))
