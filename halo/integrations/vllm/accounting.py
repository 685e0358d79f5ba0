"""The one rule the scheduler and the worker share: how many physical slots a Halo request may hold.

vLLM counts a request's tokens logically (`num_computed_tokens` is the true length, so the scheduler schedules,
stops and streams as usual). Halo culls every request back to its budget after each step, every layer evicting
the same number of slots, so the slots a request may hold are a function of the logical length:

    physical = min(logical, budget)            after every completed step (the scheduler's reservation)
    shift    = logical - physical              tokens evicted so far, at least

The scheduler sizes block allocations from `physical + new tokens`, frees blocks past `ceil(physical /
block_size)` and admits a request by its peak, `min(its length, budget + the largest chunk one step schedules)`
slots, instead of its whole prompt. The worker holds `physical` slots, or fewer when whole words or lines died
(a unit's shortfall, request_memory / unit_cull): it computes slot mappings and sequence lengths from the slots
it holds, the model's positions from `logical`, and cuts its block table to `ceil(physical / block_size)` as the
scheduler does. Neither side needs a message from the other.
"""

from __future__ import annotations


def physical_length(logical: int, budget: int) -> int:
    """Slots the scheduler reserves for a request after a completed step with `logical` tokens computed (the
    most its worker holds)."""
    if logical < 0 or budget <= 0:
        raise ValueError(f"need logical >= 0 and budget > 0, got logical={logical}, budget={budget}")
    return min(logical, budget)


def shift(logical: int, budget: int) -> int:
    """Tokens evicted from a request with `logical` tokens computed: logical - physical."""
    return logical - physical_length(logical, budget)


def blocks_needed(slots: int, block_size: int) -> int:
    """Blocks that hold `slots` slots."""
    return -(-slots // block_size)


def peak_slots(budget: int, chunk: int) -> int:
    """The most slots a request ever holds during a step: `budget` retained plus at most `chunk` new tokens (the
    largest number of tokens one step schedules for it; a decode step adds one). A request shorter than this
    holds at most its own length."""
    if budget <= 0 or chunk <= 0:
        raise ValueError(f"need budget > 0 and chunk > 0, got budget={budget}, chunk={chunk}")
    return budget + chunk
