"""Sampling the next token from logits: greedy, temperature, top-k and top-p (nucleus)."""

from __future__ import annotations

import torch


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the bad setting: temperature >= 0, top_k >= 1, 0 < top_p <= 1."""
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 1):
        raise ValueError(f"bad sampling settings: temperature={temperature}, top_k={top_k}, top_p={top_p}")


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """int64 scalar tensor on the logits' device: the next token from logits [V] (greedy when temperature is 0)."""
    if temperature == 0:
        return torch.argmax(logits)
    scores = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(scores, min(top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_scores, -1) > top_p
        scores[order[drop]] = float("-inf")
    probs = torch.softmax(scores, -1)
    return torch.multinomial(probs, 1, generator=generator)[0]


def eos_ids(tokenizer, model) -> set[int]:
    """The end-of-sequence ids of the tokenizer and the model's generation config."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids
