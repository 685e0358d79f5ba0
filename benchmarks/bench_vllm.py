"""Tokens/s of 8 concurrent requests in vLLM with and without Halo (budget 256, 1k-token prompts).

Runs in the vLLM venv only (`make bench-vllm`; skipped elsewhere). One engine serves both cases: the Halo
engine's requests opt out with `extra_args={"halo": False}`, so the model, the scheduler settings and the
prompts are the same. Each case runs 8 prompts of 1024 tokens of the embedded text, 64 greedy tokens each
(`ignore_eos`). Reported: generated tokens/s and all tokens (prompt + generated)/s per case, and the ratio
halo / plain. With --benchmark-disable (`make test-vllm`) each body runs once on a small workload (8 x 128
prompt tokens, 4 generated) as a smoke test.
"""

import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

import pytest  # noqa: E402

pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from halo.models import embedded_model_dir  # noqa: E402
from halo.text import embedded_text  # noqa: E402

REQUESTS, PROMPT, GENERATED, BUDGET = 8, 1024, 64, 256
_means: dict[str, float] = {}


@pytest.fixture(scope="module")
def engine():
    llm = LLM(model=str(embedded_model_dir()), dtype="float32", enforce_eager=True, max_model_len=2048,
              enable_prefix_caching=False, async_scheduling=False, distributed_executor_backend="uni",
              kv_cache_memory_bytes=512 << 20, max_num_batched_tokens=1024, max_num_seqs=REQUESTS, seed=0,
              additional_config={"halo": {"budget": BUDGET}})
    yield llm
    del llm


@pytest.fixture(scope="module")
def token_ids(engine):
    return engine.get_tokenizer()(embedded_text(), add_special_tokens=False)["input_ids"]


def run_case(benchmark, engine, token_ids, halo: bool) -> None:
    small = benchmark.disabled
    prompt_len, generated = (128, 4) if small else (PROMPT, GENERATED)
    prompts = [TokensPrompt(prompt_token_ids=token_ids[i * prompt_len: (i + 1) * prompt_len])
               for i in range(REQUESTS)]
    params = SamplingParams(max_tokens=generated, temperature=0.0, ignore_eos=True,
                            extra_args=None if halo else {"halo": False})

    def serve():
        outputs = engine.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == generated for o in outputs)

    start = time.perf_counter()
    benchmark.pedantic(serve, rounds=1 if small else 2, iterations=1, warmup_rounds=0 if small else 1)
    name = "halo" if halo else "plain"
    stats = getattr(benchmark, "stats", None)
    seconds = stats.stats.mean if stats is not None and getattr(stats, "stats", None) else time.perf_counter() - start
    benchmark.extra_info.update({"case": name, "requests": REQUESTS, "prompt_tokens": prompt_len,
                                 "generated_tokens": generated, "budget": BUDGET if halo else None,
                                 "generated_tokens_per_s": REQUESTS * generated / seconds,
                                 "all_tokens_per_s": REQUESTS * (prompt_len + generated) / seconds})
    _means[name] = seconds
    print(f"\n[vllm {name}] {REQUESTS} x ({prompt_len} + {generated}) tokens in {seconds:.2f} s: "
          f"{REQUESTS * generated / seconds:.1f} generated tokens/s, "
          f"{REQUESTS * (prompt_len + generated) / seconds:.1f} tokens/s in all")
    if "plain" in _means and "halo" in _means:
        ratio = _means["plain"] / _means["halo"]
        benchmark.extra_info["halo_over_plain_throughput"] = ratio
        print(f"[vllm] halo / plain throughput: {ratio:.2f}")


def bench_vllm_plain(benchmark, engine, token_ids):
    run_case(benchmark, engine, token_ids, halo=False)


def bench_vllm_halo(benchmark, engine, token_ids):
    run_case(benchmark, engine, token_ids, halo=True)
