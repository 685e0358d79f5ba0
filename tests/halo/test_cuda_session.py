"""A Session on CUDA runs every default path the CPU suite covers (word units, per-layer culls, markers, recall,
memory positions) and keeps what the same session keeps on the CPU.

The CPU suite runs these paths on CPU tensors only; a CUDA-only gap (an op without a CUDA kernel for a dtype, a
tensor left on the wrong device) shows here. Both runs use the same float32 weights; CUDA's reductions may order
sums differently, so a near tie can cull another token: the retained sets must agree on at least 90% of their
tokens, and each run's own budget and accounting must be exact.
"""

import pytest
import torch

from tiny import tiny_llama
from halo import HaloConfig, Session, SourcePolicy, default_sources

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FACT = "my locker code is 48213 and the owls count stars above the quiet river bank. "
LOG = "2026-11-22 worker 3 processed batch 7 ok\n"
QUESTION = "what is my locker code?"

CONFIGS = {
    "default": {},
    "token": {"granularity": "token"},
    "head": {"granularity": "head"},
    "recall": {"recall": True, "recall_threshold": 0.0},
    "recall-memory-positions": {"recall": True, "recall_threshold": 0.0, "rope_positions": "memory"},
    "head-recall-memory-positions": {"granularity": "head", "recall": True, "recall_threshold": 0.0,
                                     "rope_positions": "memory"},
    "head-value-weight": {"granularity": "head", "value_weight": 2.0},
}


def run(model, tok, changes: dict) -> Session:
    sources = {**default_sources(), "user": SourcePolicy(initial=128.0, decay=1.0, priority=320.0)}
    config = HaloConfig(**{"budget": 48, "sink_tokens": 2, "recent_tokens": 6, "chunk_size": 8, "sources": sources,
                           **changes})
    session = Session(model, tok, config)
    session.feed("you are a helpful assistant.\n", "system")
    for _ in range(2):
        session.feed(FACT, "user")
        session.feed(LOG * 6, "tool")
    session.feed(QUESTION, "user")
    session.generate(6, stop_on_eos=False)
    return session


def check_accounting(session: Session) -> None:
    cache, stats = session.cache, session.stats()
    for layer in range(cache.num_layers):
        assert cache.layer_length(layer) <= session.config.budget
    assert stats["remembered"] - stats["markers"] + stats["evicted"] - stats["recalled"] == stats["tokens_fed"]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_session_on_cuda_keeps_what_the_cpu_session_keeps(tiny_tok, name):
    cpu_model = tiny_llama(layers=3, vocab=len(tiny_tok))
    gpu_model = tiny_llama(layers=3, vocab=len(tiny_tok)).cuda()
    cpu, gpu = run(cpu_model, tiny_tok, CONFIGS[name]), run(gpu_model, tiny_tok, CONFIGS[name])
    assert gpu.cache.device.type == "cuda"
    for session in (cpu, gpu):
        check_accounting(session)
    assert gpu.stats()["tokens_fed"] == cpu.stats()["tokens_fed"]
    if CONFIGS[name].get("recall"):
        assert gpu.stats()["archived"] > 0
    kept_cpu = set(cpu.memory().positions.tolist())
    kept_gpu = set(gpu.memory().positions.tolist())
    assert len(kept_cpu & kept_gpu) >= 0.9 * max(len(kept_cpu), len(kept_gpu)), (
        f"{name}: CUDA kept {sorted(kept_gpu - kept_cpu)} where the CPU kept {sorted(kept_cpu - kept_gpu)}")
