"""Argument checks shared by the kernels and their PyTorch reference twins (imports only torch)."""

from __future__ import annotations

import torch


def check_mass_inputs(query: torch.Tensor, key: torch.Tensor, n_past: int, mass: torch.Tensor) -> None:
    """ValueError naming the problem when the arguments of attention_column_mass (either twin) do not fit."""
    check_row_inputs(query, key, n_past)
    hq, t, _ = query.shape
    if mass.dtype != torch.float32 or mass.dim() != 1 or mass.numel() < n_past + t:
        raise ValueError(f"mass must be a float32 vector of at least {n_past + t} slots, got {mass.dtype} {tuple(mass.shape)}")
    if mass.device != key.device:  # query and key: checked above
        raise ValueError(f"device mismatch: query {query.device}, key {key.device}, mass {mass.device}")


def check_row_inputs(query: torch.Tensor, key: torch.Tensor, n_past: int) -> None:
    """ValueError naming the problem when query rows [Hq, T, D] and keys [Hkv, N, D] with n_past retained slots
    before the rows do not fit (shapes, GQA grouping, n_past out of range, devices)."""
    if not isinstance(query, torch.Tensor) or not isinstance(key, torch.Tensor):
        raise ValueError("query and key must be tensors")
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"query must be [Hq, T, D] and key [Hkv, N, D]; got {tuple(query.shape)} and {tuple(key.shape)}")
    hq, t, d = query.shape
    hkv, n, dk = key.shape
    if d != dk:
        raise ValueError(f"head dim mismatch: query has {d}, key has {dk}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key heads ({hkv})")
    if n_past < 0 or n_past + t > n:
        raise ValueError(f"n_past ({n_past}) + rows ({t}) exceeds the {n} key slots")
    if query.device != key.device:
        raise ValueError(f"device mismatch: query {query.device}, key {key.device}")
