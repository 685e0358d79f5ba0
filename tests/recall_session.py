"""Shared by the recall tests: a small recalling session, its text, and the accounting check; a one-ring archive
and a forward to score it with."""

import torch

from halo import HaloConfig, Session, SourcePolicy, default_sources
from halo.archive import RecallArchive

TEXT = ("the quick brown fox jumps over the lazy dog and keeps running far away into the night while "
        "seven small owls count 48213 stars above the quiet river bank. ")
QUESTION = "how many stars did the owls count?"


def recalling(model, tok, **changes):
    """A per-layer session (or per-head: `granularity="head"`) with recall on. Threshold 0 makes every forgotten
    unit a hit (a random tiny model's attention is near uniform), so each user forward recalls: the machinery runs
    on every step."""
    sources = {**default_sources(), "user": SourcePolicy(initial=128.0, decay=1.0, priority=320.0)}
    config = HaloConfig(**{"budget": 40, "sink_tokens": 2, "recent_tokens": 6, "chunk_size": 4, "sources": sources,
                           "granularity": "layer", "recall": True, "recall_threshold": 0.0, "recall_tokens": 6,
                           "recall_context": 2, "recall_grace": 8, **changes})
    return Session(model, tok, config)


def check_accounting(session):
    cache, stats = session.cache, session.stats()
    assert int(cache.layer_counts.max()) <= cache.config.budget  # every row: a layer, or a KV head
    assert stats["remembered"] - stats["markers"] + stats["evicted"] - stats["recalled"] == stats["tokens_fed"]


def one_ring_archive(discount: float, history: int, capacity: int = 4, filled: bool = True) -> RecallArchive:
    """An archive of one ring (layer 1, 2 KV heads of dim 4) holding serials 0-2 (unless not `filled`)."""
    archive = RecallArchive((1,), capacity, num_kv_heads=2, head_dim=4, dtype=torch.float32,
                            device=torch.device("cpu"), discount=discount, history=history)
    if filled:
        s = torch.tensor([0, 1, 2])
        archive.add(1, torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)),
                    {"serials": s, "positions": s + 10, "token_ids": s + 7, "sources": torch.zeros_like(s),
                     "units": torch.full_like(s, -1)})
    return archive


def ring_forward(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded forward for `one_ring_archive`: query [4, 3, 4] and the layer's keys [2, 12, 4]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 4, generator=gen), torch.randn(2, 12, 4, generator=gen)
