"""The decode loop of `Session.generate`: sample the next token, stop at end-of-sequence, feed it back.

Sampling itself is `halo.sampling`; feeding a token back (one stream forward, its cull, markers and repair) is
the caller's `step`, which returns the logits the next token is sampled from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .sampling import check_sampling, sample


def check_generate(max_new_tokens, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """ValueError naming the first bad setting: max_new_tokens a non-negative int, then the sampling controls
    (halo.sampling.check_sampling)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)


def decode(logits: torch.Tensor | None, step: Callable[[torch.Tensor], torch.Tensor], max_new_tokens: int, *,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           device: torch.device | str = "cpu", eos: set[int] = frozenset(),
           on_token: Callable[[int], object] | None = None) -> list[int]:
    """Generate up to `max_new_tokens` token ids; returns them (an end-of-sequence id is not included).

    Args:
        logits: float [V] logits of the last token of the stream (the first token is sampled from them); None
            (nothing fed yet) raises ValueError.
        step: callable(int64 [1] token) -> float [V]: feeds the token to the stream, returns its logits.
        temperature, top_k, top_p: sampling controls (halo.sampling.sample; temperature 0 is greedy).
        seed: seeds a torch.Generator on `device` for reproducible sampling (None: torch's global generator).
        eos: ids that end generation; such an id is neither fed nor returned.
        on_token: optional callback receiving each new id before it is fed (for streaming).
    """
    if logits is None:
        raise ValueError("generate() needs context: feed() some text first")
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)
        token_id = int(token)
        if token_id in eos:
            break
        out.append(token_id)
        if on_token is not None:
            on_token(token_id)
        logits = step(token.view(1))
    return out
