"""Archive scoring (reference path): the attention mass archived keys would earn if each were put back.

Recall (halo.recall) asks, for the query rows of a forward, which evicted tokens the model would look at now.
An archived token `a` is scored as if it alone were back in the cache: with `lse[h, t]` the log of the
softmax denominator row t of head h had over the slots it saw, its probability would be

    p_{h,t}(a) = exp(s) / (exp(lse) + exp(s)) = sigmoid(s - lse),   s = scaling * q_{h,t} . k_a

and its mass at head h is normalised like brightness (halo.brightness): `mass[h, a] = sum_t n_t * p_{h,t}(a)`, so
uniform attention reads 1.0 per row. Scoring each token alone keeps the score independent of how many tokens
the archive holds. The retained tokens' mass at each head (`retained_rows`, or `retained_lse` then
`retained_mass`) sets the bar (`bars`: its `BAR_QUANTILE` quantile): `ratio_scales` and `pool_heads` read each
archived token's mass over the bar at the head mean, per KV head group or per head, and `archive_ratio` scores
and pools in one call. `halo_kernels` holds the fused twins of `archive_mass`, `archive_ratio`, `retained_lse`
and `retained_mass`.
"""

from __future__ import annotations

import torch

from halo_kernels.checks import check_row_inputs

# Bound on the [Hq * T, block] fp32 logits the reference materialises at once (elements).
_BLOCK_ELEMENTS = 1 << 22

BAR_QUANTILE = 0.75
"""The bar: this quantile of the mass the retained tokens drew (at a head, or at the head mean)."""

BAR_MIN = 1e-6
"""The least a bar can be (a bar divides)."""


def _retained_logits(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int) -> torch.Tensor:
    """float32 [Hq, T, n_past + T]: scaled logits of the rows against the slots, -inf where a row does not see."""
    hq, t_rows, d = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    n = n_past + t_rows
    logits = torch.matmul(query.float().reshape(hkv, group * t_rows, d), key[:, :n].float().transpose(1, 2))
    logits = logits.mul_(scaling).view(hq, t_rows, n)
    if t_rows > 1:
        hidden = torch.arange(t_rows, device=key.device)[None, :] > torch.arange(t_rows, device=key.device)[:, None]
        logits[..., n_past:].masked_fill_(hidden, float("-inf"))
    return logits


def retained_rows(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """This forward's rows against the retained slots: (lse float32 [Hq, T], mass float32 [Hq, n_past]).

    lse[h, t] is the logsumexp of row t's attention logits at head h over the slots it sees; mass[h, j] =
    sum_t n_t * softmax_{h,t}(j), the mass retained slot j drew at head h in brightness's normalisation
    (n_t = n_past + t + 1 slots seen): its mean over heads is the layer's brightness column mass.

    Args:
        query: [Hq, T, D] this forward's query rows (RoPE applied); key: [Hkv, N, D] the layer's keys, N >= n_past + T
            (row t sees slots 0 .. n_past + t). Hq % Hkv == 0.
    """
    logits = _retained_logits(query, key, scaling, n_past)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits[..., :n_past] - lse[..., None])
    mass = torch.einsum("t,htn->hn", row_weights(n_past, query.shape[1], key.device), probs)
    return lse, mass


def retained_lse(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int) -> torch.Tensor:
    """float32 [Hq, T]: `retained_rows`' lse alone (the per-head mass is not formed). `halo_kernels.retained_lse`
    is its fused twin. Arguments as `retained_rows`; ValueError naming a shape, device or n_past that does not fit."""
    check_row_inputs(query, key, n_past)
    return torch.logsumexp(_retained_logits(query, key, scaling, n_past), dim=-1)


def retained_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int, row_lse: torch.Tensor
                  ) -> torch.Tensor:
    """float32 [Hq, n_past]: `retained_rows`' per-head mass from the rows' lse (`retained_lse`): the mass retained
    slot j drew at head h, `sum_t n_t * exp(scaling * q_{h,t} . k_j - lse[h, t])`. `halo_kernels.retained_mass` is
    its fused twin. Arguments as `retained_rows`, with row_lse float32 [Hq, T]."""
    check_row_inputs(query, key, n_past)
    if tuple(row_lse.shape) != tuple(query.shape[:2]):
        raise ValueError(f"retained_mass: row_lse must be [Hq, T] = {list(query.shape[:2])}, got {tuple(row_lse.shape)}")
    probs = torch.exp(_retained_logits(query, key, scaling, n_past)[..., :n_past] - row_lse.float()[..., None])
    return torch.einsum("t,htn->hn", row_weights(n_past, query.shape[1], key.device), probs)


def bars(values: torch.Tensor, quantile: float = BAR_QUANTILE, minimum: float = BAR_MIN) -> torch.Tensor:
    """float32 [...]: the `quantile` quantile of float32 [..., n] along its last dim (n >= 1), at least `minimum`.

    `torch.quantile`'s linear interpolation, read with two `kthvalue` selections instead of a full sort.
    `halo_kernels.bars` is its fused twin (one launch for every row, no sort and no selection call).
    """
    n = values.shape[-1] if values.dim() else 0
    if n == 0 or not 0.0 <= quantile <= 1.0:
        raise ValueError(f"bars: values need at least one entry along the last dim and the quantile must lie in "
                         f"[0, 1], got shape {tuple(values.shape)} and {quantile}")
    rank = quantile * (n - 1)
    below = min(int(rank), n - 1)
    low = values.kthvalue(below + 1, dim=-1).values
    if below + 1 < n and rank > below:
        low = torch.lerp(low, values.kthvalue(below + 2, dim=-1).values, rank - below)
    return low.clamp(min=minimum)


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


def ratio_scales(retained_mass: torch.Tensor, heads: str) -> torch.Tensor:
    """float32 [Hq]: the factor that turns a head's mass into its share of a ratio over the bar (`pool_heads`).

    "mean": 1 / (Hq * bar) with bar the `BAR_QUANTILE` quantile of the retained tokens' head-mean mass (heads
    pooled as brightness pools them: summed, the scaled masses give the head-mean mass over that bar). "group"
    and "each": 1 / bar_h, the quantile of what the retained tokens drew at head h. Bars are at least 1e-6.

    Args:
        retained_mass: float32 [Hq, n_past] (`retained_rows`), n_past >= 1; heads: one of halo.config.RECALL_HEADS.
    """
    hq, n_past = retained_mass.shape
    if n_past == 0:
        raise ValueError("ratio_scales: the retained mass has no slots (n_past must be at least 1)")
    if heads == "mean":
        return (1.0 / (hq * bars(retained_mass.mean(0)))).expand(hq)
    if heads in ("group", "each"):
        return 1.0 / bars(retained_mass)
    raise ValueError(f"heads must be 'mean', 'group' or 'each', got {heads!r}")


def pool_heads(scaled_mass: torch.Tensor, heads: str, num_kv_heads: int) -> torch.Tensor:
    """float32 [A] from float32 [Hq, A] masses already scaled by `ratio_scales`: their sum over heads ("mean"), the
    best KV head group's mean ("group") or the best head ("each")."""
    hq, entries = scaled_mass.shape
    if num_kv_heads < 1 or hq % num_kv_heads:
        raise ValueError(f"pool_heads: {hq} query heads do not form groups of {num_kv_heads} KV heads")
    if heads == "mean":
        return scaled_mass.sum(0)
    if heads == "group":
        return scaled_mass.view(num_kv_heads, hq // num_kv_heads, entries).mean(1).amax(0)
    if heads == "each":
        return scaled_mass.amax(0)
    raise ValueError(f"heads must be 'mean', 'group' or 'each', got {heads!r}")


def archive_ratio(query: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float,
                  row_lse: torch.Tensor, row_weight: torch.Tensor, head_scale: torch.Tensor, heads: str
                  ) -> torch.Tensor:
    """float32 [A]: `pool_heads(archive_mass(...) * head_scale[:, None], heads, Hkv)`, 0 where invalid: each archived
    token's score, read at the heads `heads` names (`halo_kernels.archive_ratio` computes it in the same launch as
    the mass, without the [Hq, A] intermediate).

    Args:
        query, keys, valid, scaling, row_lse, row_weight: as `archive_mass`; head_scale: float32 [Hq] (e.g.
        `ratio_scales(...) * floor`); heads: "mean", "group" or "each".
    """
    if head_scale.shape != (query.shape[0],):
        raise ValueError(f"archive_ratio: head_scale must be float32 [Hq] = [{query.shape[0]}], got "
                         f"{tuple(head_scale.shape)}")
    head_mass = archive_mass(query, keys, valid, scaling, row_lse, row_weight)
    return pool_heads(head_mass * head_scale.float()[:, None], heads, keys.shape[0]).masked_fill_(~valid, 0.0)
