"""Decode step with recall on and 10k archived tokens vs the same per-layer step without recall (issue 14).

Two pairs, each reported as a ratio in the same run (CPU, SmolLM2-135M, budget 512):
- `recall-step-10k`: recall as configured by default (decode steps of the assistant do not score the archive; an
  evicted token's key goes into the archive). Target <= 1.10x.
- `recall-scored-step-10k`: every decode step scores the 10k archived keys at the retrieval layers (`assistant` in
  recall_sources; the threshold is set out of reach so that no recall forward runs: this is the scoring's cost).
The archive is filled through `RecallArchive.add` with random keys (feeding 10k real tokens would take minutes).
"""

import pytest
import torch

from halo import HaloConfig, Session, load_model
from halo.models import ModelNotFoundError

BUDGET = 512
ARCHIVED = 10_000
ROUNDS = 30


@pytest.fixture(scope="module")
def smollm_pair():
    try:
        return load_model()
    except ModelNotFoundError as exc:
        pytest.skip(f"embedded model unavailable: {exc}")


def _session(model, tok, **recall) -> Session:
    config = HaloConfig(budget=BUDGET, recent_tokens=64, chunk_size=64, granularity="layer", **recall)
    session = Session(model, tok, config)
    g = torch.Generator().manual_seed(0)
    session.feed_ids(torch.randint(100, 40000, (BUDGET + 64,), generator=g), "user")
    archive = session.cache.archive
    if archive is not None:
        heads, dim = session.cache.num_kv_heads, session.cache.head_dim
        serials = torch.arange(ARCHIVED)  # below next_serial is not needed for scoring; positions are in the past
        for layer in archive.layers:
            archive.add(layer, torch.randn(heads, ARCHIVED, dim, generator=g).to(session.device),
                        {"serials": serials, "positions": serials % BUDGET, "token_ids": serials + 100,
                         "sources": torch.zeros_like(serials), "units": torch.full_like(serials, -1)})
        assert len(archive) >= ARCHIVED * len(archive.layers) * 0.9
    return session


def _bench(benchmark, session):
    token = torch.tensor([42])

    def step():
        session.step(token, "assistant")

    with torch.inference_mode():
        benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=3)
    for layer in range(session.cache.num_layers):
        assert session.cache.layer_length(layer) <= BUDGET


@pytest.mark.parametrize("role", ["reference", "halo"])
def bench_recall_decode_step(benchmark, smollm_pair, record_ratio, role):
    model, tok = smollm_pair
    session = _session(model, tok, **({"recall": True, "recall_capacity": ARCHIVED} if role == "halo" else {}))
    _bench(benchmark, session)
    record_ratio(benchmark, "recall-step-10k", role)


@pytest.mark.parametrize("role", ["reference", "halo"])
def bench_recall_scored_decode_step(benchmark, smollm_pair, record_ratio, role):
    model, tok = smollm_pair
    recall = {"recall": True, "recall_capacity": ARCHIVED, "recall_sources": ("user", "tool", "assistant"),
              "recall_min_rows": 1, "recall_threshold": 1e9}
    session = _session(model, tok, **(recall if role == "halo" else {}))
    _bench(benchmark, session)
    if role == "halo":
        assert session.recall.events == 0  # scored every step, nothing out-shone the bar of 1e9
    record_ratio(benchmark, "recall-scored-step-10k", role)
