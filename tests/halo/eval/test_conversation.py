"""The conversation suite: seeded generation, exact-match scoring, the oracle's budget, rendering, one tiny run."""

import copy
import json
import math

import pytest
from tiny import tiny_llama

from halo.cli import build_parser, main
from halo.config import HaloConfig
from halo.eval.conversation import FACT_KINDS, FLOOD_SHAPES, answer_matches, make_conversations, normalise
from halo.eval.conversation_runner import (CONVERSATION_POLICIES, CONVERSATION_RECORD_KEYS, count_tokens,
                                           format_conversation_table, oracle_feeds, render_feeds, run_conversations)

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_same_seed_same_conversations_and_another_seed_others():
    assert make_conversations(6, seed=3) == make_conversations(6, seed=3)
    assert make_conversations(6, seed=3) != make_conversations(6, seed=4)


def test_every_conversation_states_its_answer_to_the_user_and_asks_last():
    conversations = make_conversations(12, seed=0)
    assert {c.target.kind for c in conversations} == set(FACT_KINDS)
    assert {c.flood for c in conversations} == set(FLOOD_SHAPES)
    for c in conversations:
        roles = [m.role for m in c.messages]
        assert roles[0] == "system" and roles.count("system") == 1
        assert c.messages[-1].role == "user" and c.messages[-1].text == c.target.question
        stated = [m.text for m in c.messages[:-1] if m.role == "user" and c.answer in m.text]
        assert stated == [c.target.statement]
        assert {"assistant", "user"} <= set(roles) and ({"tool", "log"} & set(roles))
        assert len(c.facts) == 3 and len({f.kind for f in c.facts}) == 3 and c.target in c.facts
        assert "Remember it" in c.target.statement  # the asked fact is stated emphatically, distractors in passing
        assert all("Remember" not in f.statement for f in c.facts if f is not c.target)


@pytest.mark.parametrize("reply, answer, expected", [
    (" 52445.", "52445", True),
    ("52445", "52445", True),
    (" 2445", "52445", False),
    (" 524451", "52445", False),
    (" 52445x", "52445", False),
    (' "Marta  Kowalski".', "Marta Kowalski", True),
    (" marta kowalski", "Marta Kowalski", True),
    (" Marta", "Marta Kowalski", False),
    (" **QX-7341** is it", "QX-7341", True),
    (" QX 7341", "QX-7341", False),
    (" lanterns", "lantern", False),
    ("", "lantern", False),
])
def test_answers_are_matched_exactly_after_normalisation(reply, answer, expected):
    assert answer_matches(reply, answer) is expected


def test_normalisation_folds_case_and_spaces_and_strips_leading_quotes():
    assert normalise('  "Hello\n  World" ') == 'hello world"'


@pytest.mark.parametrize("budget", [360, 420, 600])
def test_oracle_memory_fits_the_budget_and_keeps_facts_marker_and_recent_lines(tiny_tok, budget):
    config = HaloConfig(budget=budget, recent_tokens=16)
    for c in make_conversations(3, seed=1, flood_sizes=(600,)):
        feeds = oracle_feeds(tiny_tok, c, config, answer_tokens=10)
        assert count_tokens(tiny_tok, feeds) + 10 <= budget
        text = "".join(f.text for f in feeds)
        assert all(f.statement in text for f in c.facts) and text.rstrip().endswith(c.answer_prefix)
        flood = c.floods[-1]
        kept = [f for f in feeds if f.source == flood.role]
        if kept:  # the marker, then the flood's last lines
            body = kept[0].text.split(config.marker_text, 1)[1]
            assert flood.text.rstrip("\n").endswith(body.rstrip("\n"))
    with pytest.raises(ValueError, match="cannot hold"):
        oracle_feeds(tiny_tok, c, HaloConfig(budget=100, recent_tokens=16))


def test_more_budget_gives_the_oracle_more_recent_lines(tiny_tok):
    c = make_conversations(1, seed=2, flood_sizes=(1000,))[0]
    configs = [HaloConfig(budget=b, recent_tokens=16) for b in (380, 480, 580)]
    sizes = [count_tokens(tiny_tok, oracle_feeds(tiny_tok, c, config)) for config in configs]
    assert sizes[0] < sizes[1] < sizes[2]


def test_without_a_template_messages_are_plain_role_lines(tiny_tok):
    c = make_conversations(1, seed=0)[0]
    feeds = render_feeds(tiny_tok, list(c.messages), c.answer_prefix)
    assert [f.source for f in feeds] == [m.role for m in c.messages] + ["assistant"]
    assert feeds[1].text == f"user: {c.messages[1].text}\n"
    assert feeds[-1].text == f"assistant: {c.answer_prefix}"


def test_with_a_template_each_message_feeds_its_share_of_the_rendering(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = CHATML
    c = make_conversations(2, seed=0)[1]  # a build log: source log, template role tool
    feeds = render_feeds(tok, list(c.messages), c.answer_prefix)
    assert [f.source for f in feeds] == [m.role for m in c.messages] + ["assistant"]
    dicts = [{"role": "tool" if m.role == "log" else m.role, "content": m.text} for m in c.messages]
    whole = tok.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True)
    assert "".join(f.text for f in feeds) == whole + c.answer_prefix
    assert feeds[-1].text == "<|im_start|>assistant\n" + c.answer_prefix
    assert any(f.source == "log" and f.text.startswith("<|im_start|>tool\n") for f in feeds)


def test_a_template_that_refuses_a_role_falls_back_to_plain_lines(tiny_tok):
    tok = copy.deepcopy(tiny_tok)
    tok.chat_template = "{% if messages[-1]['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}" + CHATML
    c = make_conversations(1, seed=0)[0]
    assert render_feeds(tok, list(c.messages), c.answer_prefix)[0].text == f"system: {c.messages[0].text}\n"


def test_suite_on_a_tiny_model_gives_one_record_per_policy_and_budget(tiny_tok):
    tok = tiny_tok
    model = tiny_llama(vocab=len(tok), layers=1, heads=2, kv_heads=1, hidden=32)
    budgets = ["300", "360"]
    records = run_conversations(model, tok, count=1, budgets=budgets, seed=0, chunk=128, flood_sizes=(100,),
                                answer_tokens=3, progress=False)
    c = make_conversations(1, seed=0, flood_sizes=(100,))[0]
    length = count_tokens(tok, render_feeds(tok, list(c.messages), c.answer_prefix))
    expected = [(p, int(b)) for b in budgets for p in CONVERSATION_POLICIES]
    assert [(r["policy"], r["budget"]) for r in records] == expected
    for r in records:
        assert tuple(r) == CONVERSATION_RECORD_KEYS
        assert r["total"] == 1 and r["answered"] == sum(x["correct"] for x in r["replies"])
        assert r["score"] == r["answered"] / r["total"]
        reply = r["replies"][0]
        assert r["coherence"] == reply["coherence"] and math.isfinite(reply["coherence"]) and reply["coherence"] > 1
        if r["policy"] == "oracle":
            assert reply["tokens"] <= r["budget"]
        elif r["policy"] != "full":
            assert reply["tokens"] >= length > r["budget"]  # the whole conversation went through the budget
    full = [r for r in records if r["policy"] == "full"]
    assert full[0]["replies"] == full[1]["replies"]  # run once, reported at every budget
    json.loads(json.dumps(records))
    table = format_conversation_table(records)
    assert "| halo | 300 |" in table and "| oracle | 360 |" in table


def test_eval_cli_has_the_conversation_suite(capsys):
    args = build_parser().parse_args(["eval", "--suite", "conversation", "--conversations", "2", "--budget", "160,256"])
    assert args.suite == "conversation" and args.conversations == 2 and args.budget == ["160", "256"]
    assert build_parser().parse_args(["eval"]).suite == "essays"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--help"])
    out = capsys.readouterr().out
    for flag in ("--suite", "--conversations", "--flood-chars", "--chunk"):
        assert flag in out
    assert main(["eval", "--suite", "conversation", "--plot", "x.png"]) == 2  # before any model is loaded
    assert "--plot belongs to --suite essays" in capsys.readouterr().err
