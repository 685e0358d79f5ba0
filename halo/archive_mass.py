"""Archive scoring (reference path): the attention mass archived keys would earn if each were put back.

Recall (halo.recall) asks, for the query rows of a forward, which evicted tokens the model would look at now.
An archived token `a` is scored as if it alone were back in the cache: with `lse[h, t]` the log of the
softmax denominator row t of head h had over the slots it saw, its probability would be

    p_{h,t}(a) = exp(s) / (exp(lse) + exp(s)) = sigmoid(s - lse),   s = scaling * q_{h,t} . k_a

and its mass is normalised like brightness (halo.brightness): `mass[a] = sum_t n_t * mean_h p_{h,t}(a)`, so
uniform attention reads 1.0 per row. Scoring each token alone keeps the score independent of how many
tokens the archive holds. `halo_kernels.archive_mass` is the fused twin of `archive_mass`.
"""

from __future__ import annotations

import torch

# Bound on the [Hq * T, block] fp32 logits the reference materialises at once (elements).
_BLOCK_ELEMENTS = 1 << 22


def retained_row_lse(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int) -> torch.Tensor:
    """float32 [Hq, T]: logsumexp of each query row's attention logits over the slots it sees.

    Args:
        query: [Hq, T, D] this forward's query rows (RoPE applied); key: [Hkv, N, D] the layer's keys, N >= n_past + T
            (row t sees slots 0 .. n_past + t). Hq % Hkv == 0.
    """
    hq, t_rows, d = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    n = n_past + t_rows
    logits = torch.matmul(query.float().reshape(hkv, group * t_rows, d), key[:, :n].float().transpose(1, 2))
    logits = logits.mul_(scaling).view(hkv, group, t_rows, n)
    if t_rows > 1:
        hidden = torch.arange(t_rows, device=key.device)[None, :] > torch.arange(t_rows, device=key.device)[:, None]
        logits[..., n_past:].masked_fill_(hidden, float("-inf"))
    return torch.logsumexp(logits, dim=-1).reshape(hq, t_rows)


def row_weights(n_past: int, t_rows: int, hq: int, device) -> torch.Tensor:
    """float32 [T]: n_t / Hq, the brightness normalisation of row t (n_t = n_past + t + 1 slots seen)."""
    return torch.arange(n_past + 1, n_past + t_rows + 1, device=device, dtype=torch.float32) / hq


def archive_mass(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                 row_lse: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """float32 [A]: `sum_t row_weight[t] * sum_h sigmoid(scaling * q_{h,t} . k_a - row_lse[h, t])`, 0 where invalid.

    Args:
        query: [Hq, T, D] query rows (fp16/bf16/fp32); keys: [Hkv, A, D] archived keys (fp16/bf16/fp32),
            Hq % Hkv == 0 (query head h reads key head h // (Hq / Hkv)).
        valid: bool [A] which archive entries hold a token.
        row_lse: float32 [Hq, T] (`retained_row_lse`); row_weight: float32 [T] (`row_weights`).
    """
    hq, t_rows, d = query.shape
    hkv, entries, _ = keys.shape
    if hq % hkv or keys.shape[2] != d:
        raise ValueError(f"archive_mass: query {tuple(query.shape)} does not fit keys {tuple(keys.shape)}")
    group = hq // hkv
    q = query.float().reshape(hkv, group * t_rows, d)
    lse = row_lse.float().reshape(hkv, group * t_rows, 1)
    weight = row_weight.float().repeat(group)  # rows ordered (g, t)
    mass = torch.zeros(entries, dtype=torch.float32, device=keys.device)
    block = max(1, _BLOCK_ELEMENTS // max(1, hq * t_rows))
    for start in range(0, entries, block):
        stop = min(entries, start + block)
        logits = torch.matmul(q, keys[:, start:stop].float().transpose(1, 2)).mul_(scaling)  # [Hkv, G*T, a]
        probs = torch.sigmoid(logits.sub_(lse))
        mass[start:stop] = torch.matmul(weight, probs).sum(dim=0)
    return mass.masked_fill_(~valid, 0.0)
