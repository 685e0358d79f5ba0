"""Column mass of one request's query rows inside vLLM: the semantics of `halo.brightness.attention_column_mass`,
computed for the shapes serving sees.

* The decode rows of a step (T = 1 per request) go to `decode_column_mass_batch`: one batched softmax(qK^T)
  over every decoding request's keys, padded to the longest and masked past each request's own (the runner
  gathers those keys in one index, `paged_kv.batch_keys`), instead of one call and one key gather per request
  and layer. A single decode row through `column_mass` goes to `halo.decode_mass.attention_column_mass`: the
  C++ operator of `halo._C` when it is built (the HF path's CPU decode op), else the PyTorch reference.
* A prefill chunk (T > 1) goes to `causal_column_mass`: query rows in blocks, each block multiplied only with
  the keys its rows can see (`n_past + the block's last row + 1`), the causal mask applied to the block's
  square of new columns alone. The reference multiplies every row with every key and masks `[rows, T]` after;
  for a 1024-token chunk with nothing retained before it, half of that matrix is hidden, and it is the largest
  Halo cost of a prefill (docs/serving.md, Measured).

Both agree with the reference within float32 rounding (the sums run in another order). `reference=True`
(HaloConfig.kernels == "reference") runs the reference itself.
"""

from __future__ import annotations

import torch

from halo import decode_mass
from halo.brightness import attention_column_mass as reference_column_mass
from halo_kernels.checks import check_mass_inputs

ROWS_PER_BLOCK = 128
"""Query rows per block of a prefill chunk (fastest of 64 / 128 / 256 for 1024-token chunks on 1-2 CPU cores)."""


def column_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int, mass: torch.Tensor,
                reference: bool = False) -> None:
    """Add `sum_t n_t * mean_h p_{h,t}[j]` to `mass[j]` for j < n_past + T (in place).

    Args:
        query: [Hq, T, D] this step's query rows (RoPE applied); key: [Hkv, N, D], N >= n_past + T, the request's
        keys in slot order, this step's last; scaling: softmax scale; n_past: slots held before this step;
        mass: float32 [C], C >= n_past + T; reference: run `halo.brightness.attention_column_mass` itself.
    """
    if reference:
        reference_column_mass(query, key, scaling, n_past, mass)
    elif query.shape[1] == 1:
        decode_mass.attention_column_mass(query, key, scaling, n_past, mass)
    else:
        causal_column_mass(query, key, scaling, n_past, mass)


def causal_column_mass(query: torch.Tensor, key: torch.Tensor, scaling: float, n_past: int, mass: torch.Tensor,
                       rows_per_block: int = ROWS_PER_BLOCK) -> None:
    """`halo.brightness.attention_column_mass` (no last-row mass) by query blocks over the keys they see.

    Block rows `start .. stop - 1` see slots `0 .. n_past + stop - 1`; within that range only the block's square
    of new slots `n_past + start ..` is masked (row i sees new slot s iff s <= i). Every row weighs its
    probabilities by its own `n_t / Hq` with `n_t = n_past + t + 1`. Shapes as in `column_mass`; float32 math
    whatever the K/V dtype; no matrix larger than [Hq, rows_per_block, n_past + T] is built.
    """
    check_mass_inputs(query, key, n_past, mass)
    hq, t_rows, dim = query.shape
    hkv = key.shape[0]
    group = hq // hkv
    queries = query.float().reshape(hkv, group, t_rows, dim)
    keys = key[:, : n_past + t_rows].float()
    for start in range(0, t_rows, rows_per_block):
        stop = min(t_rows, start + rows_per_block)
        rows, visible = stop - start, n_past + stop
        block = queries[:, :, start:stop].reshape(hkv, group * rows, dim)
        logits = torch.matmul(block, keys[:, :visible].transpose(1, 2)).mul_(scaling)  # [Hkv, G * rows, visible]
        square = logits.view(hkv, group, rows, visible)[..., n_past + start:]  # [Hkv, G, rows, rows]
        square.masked_fill_(torch.ones(rows, rows, dtype=torch.bool, device=key.device).triu_(1), float("-inf"))
        probs = torch.softmax(logits.view(hkv * group * rows, visible), dim=-1)
        weight = torch.arange(n_past + start + 1, n_past + stop + 1, dtype=torch.float32, device=key.device) / hq
        mass[:visible] += torch.mv(probs.t(), weight.repeat(hkv * group))


def decode_column_mass_batch(query: torch.Tensor, key_blocks: torch.Tensor, scaling: float, lengths: torch.Tensor
                             ) -> torch.Tensor:
    """float32 [R, nb * block_size]: each request's decode-row column mass, `(n_r / Hq) * sum_h p_h[j]` for
    j < n_r, 0 past: request r's row is `column_mass` of its one query row over its first n_r keys.

    Args:
        query: [R, Hq, D] one query row per request; key_blocks: [R, nb, Hkv, D, block_size] each request's keys
        by block, as `paged_kv.batch_key_blocks` gives them (slots at or past n_r are ignored, whatever they
        hold); scaling: softmax scale; lengths: int64 [R] n_r (slots held + 1), 1 <= n_r <= nb * block_size.
    The logits are taken block by block (no copy of the keys into one matrix), then laid out [R, Hkv, G, N].
    """
    count, hq, dim = query.shape
    _, nb, hkv, _, size = key_blocks.shape
    group, width = hq // hkv, nb * size
    queries = query.float().reshape(count, 1, hkv, group, dim)
    logits = torch.matmul(queries, key_blocks.float()).mul_(scaling)  # [R, nb, Hkv, G, bs]
    logits = logits.permute(0, 2, 3, 1, 4).reshape(count, hkv, group, width)
    hidden = torch.arange(width, device=query.device)[None, :] >= lengths.to(query.device)[:, None]  # [R, N]
    logits.masked_fill_(hidden[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.sum(dim=(1, 2)).mul_((lengths.to(torch.float32) / hq).to(query.device)[:, None])
