"""Coherence of a memory: how fluently the host model reads what a session remembers.

The remembered tokens (`Session.memory()`, position order: what `memory_text()` renders, holes closed up and
elision markers in place) are read once by the host model from scratch, in a plain forward with contiguous
positions and no Halo cache, and scored by their perplexity: lower reads more fluently. Culling carves holes
into the text; repair (`+repair`) exists to mend them, and this is the number that says whether it does.
"""

from __future__ import annotations

import math

import torch


def memory_perplexity(model, token_ids: torch.Tensor) -> float:
    """Perplexity of `token_ids` (int64 [n], n >= 2; unknown ids, -1, are dropped) read by `model` from scratch.

    Every token after the first is predicted from the ones before it. NaN when fewer than 2 known tokens remain.
    """
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids must be a 1-D tensor, got shape {tuple(token_ids.shape)}")
    ids = token_ids[token_ids >= 0].to(torch.int64)
    if ids.numel() < 2:
        return float("nan")
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(input_ids=ids[None].to(device), use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[1:].to(device), reduction="mean")
    return math.exp(float(nll))


def session_coherence(session) -> float:
    """Perplexity of what `session` remembers, read by its own model (see `memory_perplexity`)."""
    return memory_perplexity(session.model, session.memory().token_ids)
