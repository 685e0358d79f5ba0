"""Shared by the recall tests: a small recalling session, its text, and the accounting check."""

from halo import HaloConfig, Session, SourcePolicy, default_sources

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
