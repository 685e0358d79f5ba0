"""Retained rows for recall: each query row's logsumexp over the slots it sees, and the mass each retained slot
drew at each head. Recall (halo.archive) scores archived keys against the first and reads hits against bars taken
from the second. No new kernels, no host sync:

- `retained_lse` (twin of `halo.archive_mass.retained_lse`) is pass 1 of the column mass (`column_mass.row_stats`
  with LSE set: the online-softmax running max and sum over the causally visible keys, merged when the keys are
  split), writing `(m + log2 l) * ln 2` per row instead of the column-mass coefficients.
- `retained_mass` (twin of `halo.archive_mass.retained_mass`) is the archive-mass kernel (`archive_mass.launch`)
  with SOFTMAX set over the retained keys: `exp(s - lse)` in place of the sigmoid, [Hq, n_past] out.
The head-mean of `retained_mass` is the layer's brightness column mass, which a step has already computed.
"""

from __future__ import annotations

import torch

from ._common import check_device
from .archive_mass import launch
from .column_mass import check_rows, row_stats


def retained_lse(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int) -> torch.Tensor:
    """float32 [Hq, T]: each query row's logsumexp over the slots it sees (`halo.archive_mass.retained_lse`).

    Pass 1 of the column mass alone (one launch, two when the keys are split), no host sync: the softmax
    denominators recall scores archived keys against.

    Args:
        query: [Hq, T, D] fp16/bf16/fp32 rows (any strides), RoPE applied; key: [Hkv, N, D] of the same dtype,
            N >= n_past + T (row t sees slots 0 .. n_past + t); Hq % Hkv == 0; scaling: softmax scale;
            n_past: retained slots before the rows (host int).
    Raises ValueError naming the problem (shape, dtype, device, n_past).
    """
    check_rows("retained_lse", query, key, n_past)
    hq, t_rows, _ = query.shape
    hkv = key.shape[0]
    if t_rows == 0:
        return torch.empty(hq, 0, dtype=torch.float32, device=key.device)
    lse = row_stats(query, key, scaling, n_past, lse=True)[1]
    # kernel rows are kvh-major, then t, then the head within its group
    return lse.view(hkv, t_rows, hq // hkv).transpose(1, 2).reshape(hq, t_rows)


def retained_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int, row_lse: torch.Tensor
                  ) -> torch.Tensor:
    """float32 [Hq, n_past]: `sum_t n_t * softmax_{h,t}(j)`, the mass retained slot j drew at head h from these rows
    (`halo.archive_mass.retained_mass`), with n_t = n_past + t + 1. One launch, no host sync.

    Args:
        query, key, scaling, n_past: as `retained_lse` (only the first n_past keys are read: every row sees them);
        row_lse: float32 [Hq, T], the rows' logsumexp (`retained_lse`), any strides.
    Raises ValueError naming the problem (shape, dtype, device, n_past).
    """
    check_rows("retained_mass", query, key, n_past)
    hq, t_rows, _ = query.shape
    if not isinstance(row_lse, torch.Tensor) or row_lse.dtype != torch.float32 or tuple(row_lse.shape) != (hq, t_rows):
        raise ValueError(f"retained_mass: row_lse must be a float32 [Hq, T] = [{hq}, {t_rows}] tensor, got "
                         f"{getattr(row_lse, 'dtype', type(row_lse).__name__)} {tuple(getattr(row_lse, 'shape', ()))}")
    check_device("retained_mass", key=key, row_lse=row_lse)
    weight = torch.arange(n_past + 1, n_past + t_rows + 1, device=key.device, dtype=torch.float32)
    return launch(query, key[:, :n_past], None, scaling, row_lse, weight, softmax=True)


__all__ = ["retained_lse", "retained_mass"]
