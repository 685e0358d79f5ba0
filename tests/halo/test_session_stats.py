"""halo.session_stats: the keys Session.stats() reports, in order, read from the parts."""

from halo import HaloConfig, Session
from halo.session_stats import session_stats

KEYS = ["tokens_fed", "retained", "remembered", "budget", "evicted", "recalled", "archived", "markers", "repairs",
        "steps", "halo_seconds", "model_seconds", "repair_seconds"]


def test_stats_read_the_cache_and_the_given_counters(tiny_pair):
    model, tok = tiny_pair
    session = Session(model, tok, HaloConfig(budget=40, sink_tokens=2, recent_tokens=8, chunk_size=8))
    session.feed("".join(f"12:{i:02d} worker {i % 3} ok\n" for i in range(12)), source="log")
    stats = session_stats(session.cache, marker_source=session.markers.source_code, repairs=2, model_seconds=1.5,
                          repair_seconds=0.25)
    assert list(stats) == KEYS
    assert stats["tokens_fed"] == session.cache.seen and stats["retained"] == session.cache.n_valid <= 40
    assert stats["evicted"] == len(session.journal.evicted) > 0 and stats["markers"] > 0
    assert (stats["repairs"], stats["model_seconds"], stats["repair_seconds"]) == (2, 1.5, 0.25)
    assert list(session.stats()) == KEYS and session.stats()["model_seconds"] == session.model_seconds > 0
