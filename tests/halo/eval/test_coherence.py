"""Coherence (halo.eval.coherence): the host model's perplexity of what a session remembers."""

import math

import pytest
import torch

from halo import HaloConfig, Session
from halo.eval.coherence import memory_perplexity, session_coherence
from tiny import tiny_llama


def _plain_perplexity(ids: torch.Tensor) -> float:
    """The same model (same seed), never switched to Halo's attention: exp of the mean next-token loss."""
    model = tiny_llama(seed=2)
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, ids[1:])))


def test_perplexity_of_the_ids_read_from_scratch_dropping_unknown_ones():
    model = tiny_llama(seed=2)
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    with_unknown = torch.cat([ids[:10], torch.tensor([-1, -1]), ids[10:]])
    assert memory_perplexity(model, with_unknown) == pytest.approx(_plain_perplexity(ids), rel=1e-5)


def test_too_few_tokens_read_nan_and_bad_shapes_name_the_problem():
    model = tiny_llama(seed=2)
    assert math.isnan(memory_perplexity(model, torch.tensor([5, -1])))
    with pytest.raises(ValueError, match="1-D"):
        memory_perplexity(model, torch.zeros(2, 3, dtype=torch.int64))


def test_a_session_is_scored_on_its_retained_tokens_in_position_order(tiny_tok):
    model = tiny_llama(seed=2)
    session = Session(model, tiny_tok, HaloConfig(budget=24, recent_tokens=4, sink_tokens=2, chunk_size=8))
    ids = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(3))
    session.feed_ids(ids)
    memory = session.memory().token_ids
    assert memory.numel() == 24  # culled: the memory has holes
    assert session_coherence(session) == pytest.approx(_plain_perplexity(memory), rel=1e-5)
    # scoring reads the memory and changes nothing
    assert torch.equal(session.memory().token_ids, memory) and session.stats()["tokens_fed"] == 60
