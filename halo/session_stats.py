"""The counters and timings `Session.stats()` reports, read from the session's parts in O(1) (amortised)."""

from __future__ import annotations


def session_stats(cache, *, marker_source: int, repairs: int, model_seconds: float, repair_seconds: float) -> dict:
    """The session's counters and timings so far.

    Args:
        cache: the session's HaloCache. marker_source: the source code of elision marker tokens.
        repairs: repair diffs applied so far. model_seconds: time in the model's forwards (ModelRunner.seconds).
        repair_seconds: time in repair scheduling and passes (RepairScheduler.seconds).
    Returns:
        in this order: tokens_fed (positions streamed, cache.seen), retained (slots alive, at most the budget; in
        a per-layer memory, the fullest layer's), remembered (tokens some layer holds, markers included: the
        retained slots of a token-level cache; tokens_fed = remembered - markers + evicted - recalled), budget, evicted
        (journal entries of kind "evicted"), recalled (of kind "recalled": tokens brought back by recall),
        archived (tokens in the recall archive, over its retrieval layers; 0 with recall off), markers (elision marker tokens retained), repairs,
        steps (stream forwards), halo_seconds (the cache's own step work), model_seconds, repair_seconds.
    """
    return {
        "tokens_fed": cache.seen,
        "retained": cache.n_valid,
        "remembered": cache.remembered_count(),
        "budget": cache.config.budget,
        "evicted": cache.journal.count("evicted"),
        "recalled": cache.journal.count("recalled"),
        "archived": 0 if cache.archive is None else len(cache.archive),
        "markers": cache.count_source(marker_source),
        "repairs": repairs,
        "steps": cache.steps,
        "halo_seconds": cache.halo_seconds,
        "model_seconds": model_seconds,
        "repair_seconds": repair_seconds,
    }
