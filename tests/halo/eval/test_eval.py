"""The evaluator: fact planting, recall scoring, record schema, CLI, and one real run on SmolLM2."""

import json
import math
import random

import pytest
import torch

from halo.cli import build_parser
from halo.eval import RECORD_KEYS, evaluate, fact_text, format_table, make_key, parse_budget, plant_fact, plot, recalled
from halo.eval.coherence import memory_perplexity
from halo.text import embedded_text


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_fact_is_planted_at_a_line_boundary_at_the_asked_depth(tiny_tok, depth):
    ids = tiny_tok(embedded_text(max_chars=6000), add_special_tokens=False)["input_ids"][:400]
    key = make_key(random.Random(1))
    planted = plant_fact(tiny_tok, ids, depth, key)
    fact = tiny_tok(fact_text(key), add_special_tokens=False)["input_ids"]
    assert planted.ids[planted.start:planted.end] == fact
    assert planted.ids[: planted.start] + planted.ids[planted.end:] == ids
    assert abs(planted.actual_depth - depth) <= 0.06
    assert tiny_tok.decode(planted.ids[: planted.start]).endswith("\n")
    assert key in tiny_tok.decode(planted.ids[planted.start:planted.end])


def test_keys_are_seeded_five_digit_numbers_and_recall_is_exact():
    keys = [make_key(random.Random(7)) for _ in range(2)]
    assert keys[0] == keys[1] and len(keys[0]) == 5 and keys[0].isdigit()
    assert recalled(" 48213. Remember", "48213")
    assert not recalled(" 4821", "48213") and not recalled(" 148213", "48213") and not recalled(" none", "48213")


def test_budget_specs():
    assert parse_budget("256") == 256 and parse_budget("1/4") * 8 == 2 and parse_budget("0.125") * 8 == 1
    with pytest.raises(ValueError):
        parse_budget("3/2")


def test_records_have_a_stable_schema(tiny_pair, tmp_path):
    model, tok = tiny_pair
    text = embedded_text(max_chars=1500)
    records = evaluate(model, tok, [text], budgets=["20"], policies=["full", "streaming", "halo"], depths=(0.5,),
                       max_tokens=36, recent=4, sinks=2, recall_chunk=8, progress=False)
    assert [r["policy"] for r in records] == ["full", "streaming", "halo"]
    for r in records:
        assert tuple(r) == RECORD_KEYS
        assert r["budget"] == 20 and r["tokens"] == 36 and set(r["recall"]) == {"0.5"}
        assert math.isfinite(r["ppl"]) and r["halo_seconds"] >= 0 and r["model_seconds"] > 0
        assert math.isfinite(r["coherence"]) and r["coherence"] > 1.0
    assert records[0]["ppl_ratio"] == 1.0
    # full's memory is the whole text (36 tokens), read from scratch: coherence is its perplexity
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:36])
    assert records[0]["coherence"] == pytest.approx(memory_perplexity(model, ids), rel=1e-5)
    assert records[1]["coherence"] != records[0]["coherence"]  # streaming's memory has a hole
    # sampled along the run every 25 fed tokens (full: from the start; the others: once at the budget): here at 25
    assert records[0]["coherence_run"] == pytest.approx(memory_perplexity(model, ids[:25]), rel=1e-5)
    assert all(math.isfinite(r["coherence_run"]) and r["coherence_run"] > 1.0 for r in records)
    json.loads(json.dumps(records))
    assert "| streaming | 20 |" in format_table(records)
    plot(records, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_eval_subcommand_is_registered(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    out = capsys.readouterr().out
    for flag in ("--budget", "--policies", "--text", "--json", "--plot", "--seed", "--max-tokens", "--depths", "--set"):
        assert flag in out


def test_set_reads_config_fields_as_toml_and_refuses_the_rest(capsys):
    from halo.cli.eval import _overrides

    args = build_parser().parse_args(["eval", "--set", "repair_margin=1.5", "--set", "repair_rerank=none",
                                      "--set", "repair_guidance=hard", "--set", "recall_layers=[0.5]"])
    assert _overrides(args) == {"repair_margin": 1.5, "repair_rerank": None, "repair_guidance": "hard",
                                "recall_layers": (0.5,)}
    refused = (("nope=1", "HaloConfig field"), ("budget=9", "evaluator's own flags"), ("repair_margin", "KEY=VALUE"))
    for bad, why in refused:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["eval", "--set", bad])
        assert why in capsys.readouterr().err
    for bad, why in (("repair_margin=abc", "wrong type"), ("repair_guidance=loud", "repair_guidance")):
        with pytest.raises(ValueError, match=why):
            _overrides(build_parser().parse_args(["eval", "--set", bad]))


@pytest.mark.real_model
def test_smollm2_full_perplexity_is_sane_and_every_policy_runs():
    from halo import load_model

    model, tok = load_model()
    records = evaluate(model, tok, [embedded_text(max_chars=4000)], budgets=["32"], depths=(0.5,), max_tokens=64,
                       recent=8, recall_chunk=32, progress=False)
    assert [r["policy"] for r in records] == ["full", "streaming", "h2o", "tova", "random", "h2o-layer", "tova-layer",
                                              "halo-token", "halo"]
    assert math.isfinite(records[0]["ppl"]) and records[0]["ppl"] < 100
    assert records[0]["recall"]["0.5"] == 1.0
    assert all(math.isfinite(r["ppl"]) for r in records)


def test_repair_rows_run_the_same_policy_with_self_repair(tiny_pair):
    from halo.eval.runner import _session, eval_config
    model, tok = tiny_pair
    plain = _session(model, tok, eval_config(32), "halo", 0)
    repaired = _session(model, tok, eval_config(32), "halo+repair", 0)
    assert plain.config.repair is None and repaired.config.repair == "self"
    assert type(plain.cache.policy) is type(repaired.cache.policy)
    import pytest
    with pytest.raises(ValueError, match="unknown policy"):
        _session(model, tok, eval_config(32), "lru+repair", 0)
