"""Checks of what callers feed a session: clear errors that name the problem, before any state changes."""

from __future__ import annotations

import torch


def check_token_ids(token_ids, vocab_size: int, device: torch.device) -> None:
    """TypeError/ValueError unless `token_ids` is a non-empty 1-D int64/int32 tensor on the CPU or `device` with
    every id in [0, vocab_size)."""
    if not isinstance(token_ids, torch.Tensor):
        raise TypeError(f"token_ids must be a torch.Tensor, got {type(token_ids).__name__}")
    if token_ids.dim() != 1 or token_ids.numel() == 0:
        raise ValueError(f"token_ids must be a non-empty 1-D tensor, got shape {tuple(token_ids.shape)}")
    if token_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_ids must be int64 (or int32), got {token_ids.dtype}")
    if token_ids.device.type not in ("cpu", device.type):
        raise ValueError(f"token_ids are on device {token_ids.device}; the model is on {device}")
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id out of range [0, {vocab_size}): got min {low}, max {high}")


def check_pinned_fits(config, pinned_tokens: int, source: str, count: int) -> None:
    """ValueError when `count` more tokens of `source`, if it is pinned, would leave the budget below the protected
    set (pinned tokens + sinks + recent window)."""
    if not config.sources[source].pinned:
        return
    if pinned_tokens + count + config.sink_tokens + config.recent_tokens > config.budget:
        raise ValueError(f"budget ({config.budget}) is below the protected set this would make: {pinned_tokens} "
                         f"pinned + {count} new pinned '{source}' tokens + {config.sink_tokens} sinks + "
                         f"{config.recent_tokens} recent")


def check_key_states(key_states: torch.Tensor, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                     device: torch.device) -> int:
    """ValueError unless a layer's key states [1, Hkv, rows, D] fit a HaloCache's buffers; returns rows."""
    b, hkv, rows, d = key_states.shape
    if b != 1:
        raise ValueError(f"HaloCache holds one conversation (batch size 1); got batch size {b}")
    if hkv != num_kv_heads or d != head_dim:
        raise ValueError(f"key states of shape {tuple(key_states.shape)} do not match the cache's "
                         f"{num_kv_heads} KV heads of dim {head_dim}")
    if key_states.dtype != dtype or key_states.device != device:
        raise ValueError(f"key states are {key_states.dtype} on {key_states.device}; the cache holds "
                         f"{dtype} on {device}")
    return rows
