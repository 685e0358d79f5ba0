"""The plugin as vLLM loads it by default: entry point, engine core and worker in subprocesses, Halo switched on
by `HALO_VLLM_CONFIG`, reports fetched by name through collective_rpc. Runs a child Python (vLLM's default
multiprocessing, untouched by the in-process settings of test_vllm.py)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from halo.models import embedded_model_dir  # noqa: E402

CHILD = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from halo.integrations.vllm import reports
from halo.integrations.vllm.reports import report_for
from halo.text import embedded_text

if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=1024, enable_prefix_caching=False,
              async_scheduling=False, kv_cache_memory_bytes=128 << 20, max_num_batched_tokens=64, max_num_seqs=4)
    ids = llm.get_tokenizer()(embedded_text(), add_special_tokens=False)["input_ids"]
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids[:200]), TokensPrompt(prompt_token_ids=ids[300:370])],
                        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), use_tqdm=False)
    found = reports(llm)
    rows = [dict(prompt=len(o.prompt_token_ids), generated=len(o.outputs[0].token_ids),
                 **{k: report_for(found, o.request_id)[k] for k in ("fed", "retained", "remembered", "evicted")})
            for o in outs]
    print("HALO-RESULT " + json.dumps(rows))
"""


def test_default_multiprocess_engine_with_env_config():
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env["HALO_VLLM_CONFIG"] = json.dumps({"budget": 64, "recent_tokens": 16})
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    done = subprocess.run([sys.executable, "-c", CHILD, str(embedded_model_dir())], env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("HALO-RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    for row in json.loads(lines[-1][len("HALO-RESULT "):]):
        fed = row["prompt"] + row["generated"] - 1
        # words die whole: a layer count may stay below the budget by less than the longest word (24 tokens)
        assert row["fed"] == fed and min(fed, 64) - 24 < row["retained"] <= min(fed, 64)
        assert row["remembered"] + row["evicted"] == fed
