"""The one rule the scheduler and the worker share: how many physical slots a Halo request holds.

vLLM counts a request's tokens logically (`num_computed_tokens` is the true length, so the scheduler schedules,
stops and streams as usual). Halo culls every request back to its budget after each step, every layer evicting
the same number of slots, so the physical length is a function of the logical one:

    physical = min(logical, budget)            after every completed step
    shift    = logical - physical              tokens evicted so far (RoPE positions are slot + shift only
                                               before the first eviction; afterwards they are stored per slot)

The scheduler sizes block allocations from `physical + new tokens`, frees blocks past `ceil(physical /
block_size)` and admits a request by its peak, `min(its length, budget + the largest chunk one step schedules)`
slots, instead of its whole prompt; the worker computes slot mappings and sequence lengths from `physical`, and the
model's positions from `logical`. Neither side needs a message from the other.
"""

from __future__ import annotations


def physical_length(logical: int, budget: int) -> int:
    """Slots a request holds after a completed step with `logical` tokens computed."""
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
