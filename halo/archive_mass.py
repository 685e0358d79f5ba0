"""Archive scoring (reference path): the attention mass archived keys would earn if each were put back.

Recall (halo.recall) asks, for the query rows of a forward, which evicted tokens the model would look at now.
An archived token `a` is scored as if it alone were back in the cache: with `lse[h, t]` the log of the
softmax denominator row t of head h had over the slots it saw, its probability would be

    p_{h,t}(a) = exp(s) / (exp(lse) + exp(s)) = sigmoid(s - lse),   s = scaling * q_{h,t} . k_a

and its mass at head h is normalised like brightness (halo.brightness): `mass[h, a] = sum_t n_t * p_{h,t}(a)`, so
uniform attention reads 1.0 per row. Scoring each token alone keeps the score independent of how many tokens
the archive holds. The retained tokens' mass at each head (`retained_rows`) sets the bar: `pooled_ratio` reads
each archived token's mass over the bar at the head mean, per KV head group or per head. `halo_kernels.archive_mass` is the fused twin of `archive_mass`.
"""

from __future__ import annotations

import torch

# Bound on the [Hq * T, block] fp32 logits the reference materialises at once (elements).
_BLOCK_ELEMENTS = 1 << 22

BAR_QUANTILE = 0.75
"""The bar: this quantile of the mass the retained tokens drew (at a head, or at the head mean)."""


def retained_rows(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """This forward's rows against the retained slots: (lse float32 [Hq, T], mass float32 [Hq, n_past]).

    lse[h, t] is the logsumexp of row t's attention logits at head h over the slots it sees; mass[h, j] =
    sum_t n_t * softmax_{h,t}(j), the mass retained slot j drew at head h in brightness's normalisation
    (n_t = n_past + t + 1 slots seen).

    Args:
        query: [Hq, T, D] this forward's query rows (RoPE applied); key: [Hkv, N, D] the layer's keys, N >= n_past + T
            (row t sees slots 0 .. n_past + t). Hq % Hkv == 0.
    """
    hq, t_rows, d = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    n = n_past + t_rows
    logits = torch.matmul(query.float().reshape(hkv, group * t_rows, d), key[:, :n].float().transpose(1, 2))
    logits = logits.mul_(scaling).view(hq, t_rows, n)
    if t_rows > 1:
        hidden = torch.arange(t_rows, device=key.device)[None, :] > torch.arange(t_rows, device=key.device)[:, None]
        logits[..., n_past:].masked_fill_(hidden, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits[..., :n_past] - lse[..., None])
    mass = torch.einsum("t,htn->hn", row_weights(n_past, t_rows, key.device), probs)
    return lse, mass


def row_weights(n_past: int, t_rows: int, device) -> torch.Tensor:
    """float32 [T]: n_t, the brightness normalisation of row t (n_t = n_past + t + 1 slots seen)."""
    return torch.arange(n_past + 1, n_past + t_rows + 1, device=device, dtype=torch.float32)


def archive_mass(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                 row_lse: torch.Tensor, row_weight: torch.Tensor) -> torch.Tensor:
    """float32 [Hq, A]: `sum_t row_weight[t] * sigmoid(scaling * q_{h,t} . k_a - row_lse[h, t])`, 0 where invalid.

    Args:
        query: [Hq, T, D] query rows (fp16/bf16/fp32); keys: [Hkv, A, D] archived keys (fp16/bf16/fp32),
            Hq % Hkv == 0 (query head h reads key head h // (Hq / Hkv)).
        valid: bool [A] which archive entries hold a token.
        row_lse: float32 [Hq, T] (`retained_rows`); row_weight: float32 [T] (`row_weights`).
    """
    hq, t_rows, d = query.shape
    hkv, entries, _ = keys.shape
    if hq % hkv or keys.shape[2] != d:
        raise ValueError(f"archive_mass: query {tuple(query.shape)} does not fit keys {tuple(keys.shape)}")
    group = hq // hkv
    q = query.float().reshape(hkv, group * t_rows, d)
    lse = row_lse.float().reshape(hkv, group * t_rows, 1)
    weight = row_weight.float()
    mass = torch.zeros(hq, entries, dtype=torch.float32, device=keys.device)
    block = max(1, _BLOCK_ELEMENTS // max(1, hq * t_rows))
    for start in range(0, entries, block):
        stop = min(entries, start + block)
        logits = torch.matmul(q, keys[:, start:stop].float().transpose(1, 2)).mul_(scaling)  # [Hkv, G*T, a]
        probs = torch.sigmoid(logits.sub_(lse)).view(hq, t_rows, stop - start)
        mass[:, start:stop] = torch.einsum("t,hta->ha", weight, probs)
    return mass.masked_fill_(~valid, 0.0)


def pooled_ratio(head_mass: torch.Tensor, retained_mass: torch.Tensor, heads: str, num_kv_heads: int
                 ) -> torch.Tensor:
    """float32 [A]: each archived token's mass over the bar, read at the heads `heads` names.

    "mean": the head-mean mass over the `BAR_QUANTILE` quantile of the retained tokens' head-mean mass (heads
    pooled as brightness pools them). "group" and "each": every head's mass over its own bar (the quantile of
    what the retained tokens drew at that head), averaged over each KV head's query group ("group") or not
    ("each"); the best group or head counts. Bars are at least 1e-6. No host sync.

    Args:
        head_mass: float32 [Hq, A] (`archive_mass`); retained_mass: float32 [Hq, n_past] (`retained_rows`),
            n_past >= 1; heads: one of halo.config.RECALL_HEADS; num_kv_heads divides Hq.
    """
    hq, entries = head_mass.shape
    if hq % num_kv_heads or retained_mass.shape[0] != hq or retained_mass.shape[1] == 0:
        raise ValueError(f"pooled_ratio: head mass {tuple(head_mass.shape)} does not fit retained mass "
                         f"{tuple(retained_mass.shape)} and {num_kv_heads} KV heads")
    if heads == "mean":
        return head_mass.mean(0) / torch.quantile(retained_mass.mean(0), BAR_QUANTILE).clamp(min=1e-6)
    ratio = head_mass / torch.quantile(retained_mass, BAR_QUANTILE, dim=1).clamp(min=1e-6)[:, None]
    if heads == "group":
        return ratio.view(num_kv_heads, hq // num_kv_heads, entries).mean(1).amax(0)
    if heads == "each":
        return ratio.amax(0)
    raise ValueError(f"pooled_ratio: heads must be 'mean', 'group' or 'each', got {heads!r}")
