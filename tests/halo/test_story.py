"""The `halo demo` story (halo.story) and its command, on a tiny random model and in-process tokenizer."""

import pytest

from halo.cli import main
from halo.config import HaloConfig
from halo.eval.conversation import answer_matches
from halo.story import make_story, story_tokens, tell


def test_the_story_is_seeded_and_states_the_fact_before_the_flood_and_asks_last(tiny_tok):
    story = make_story(tiny_tok, flood="build", flood_chars=800, seed=3)
    assert story == make_story(tiny_tok, flood="build", flood_chars=800, seed=3)
    assert story.fact.answer != make_story(tiny_tok, flood="build", flood_chars=800, seed=4).fact.answer
    roles = [m.role for m in story.messages]
    assert roles == ["system", "user", "assistant", "user", "log", "assistant", "user"]
    assert story.fact.answer in story.messages[1].text and story.messages[-1].text == story.fact.question
    assert len(story.messages[4].text) >= 800
    assert story.feeds[-1].source == "assistant" and story.feeds[-1].text.endswith(story.fact.answer_prefix)
    assert [m.role for m in make_story(tiny_tok, flood="docs").messages][4] == "tool"


@pytest.mark.parametrize("kwargs,match", [({"flood": "poem"}, "unknown flood shape"),
                                          ({"flood_chars": 1}, "flood_chars must be")])
def test_bad_story_arguments_name_the_problem(tiny_tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_story(tiny_tok, **kwargs)


@pytest.mark.parametrize("policy", ["halo", "streaming"])
def test_each_telling_holds_the_budget_and_scores_its_reply(tiny_pair, policy):
    model, tok = tiny_pair
    story = make_story(tok, flood="json", flood_chars=2000, seed=1)
    config = HaloConfig(budget=200, recent_tokens=16, sink_tokens=4, chunk_size=32)
    telling = tell(model, tok, story, config, policy, answer_tokens=3)
    stats = telling.session.stats()
    assert story_tokens(tok, story, config) > config.budget  # the flood does not fit
    assert stats["retained"] <= config.budget and stats["evicted"] > 0
    assert telling.policy == policy and telling.correct == answer_matches(telling.reply, story.fact.answer)


def test_demo_command_prints_both_answers_and_halos_memory(tmp_path, tiny_tok, capsys):
    from tiny import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=len(tiny_tok)).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    code = main(["demo", "--model", str(model_dir), "--budget", "200", "--recent", "16", "--chunk", "32",
                 "--flood", "build", "--flood-chars", "2000", "--baseline", "tova"])
    out = capsys.readouterr().out
    assert code == 0
    for heading in ("=== the conversation:", "=== answers (greedy; expected: The door code is",
                    "=== what halo remembers", "=== stats (halo) ==="):
        assert heading in out
    answers = out.split("=== answers")[1].split("=== what halo remembers")[0]
    assert " halo  The door code is" in answers and " tova  The door code is" in answers
    assert "[...]" in out.split("=== what halo remembers")[1]  # culled log lines stand as markers


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_demo_takes_recall_for_halo_and_runs_the_baseline_as_published(tmp_path, tiny_tok, capsys, granularity):
    """`halo demo --recall` (any granularity that recalls): Halo recalls, the token-level baseline does not."""
    from tiny import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(vocab=len(tiny_tok)).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    code = main(["demo", "--model", str(model_dir), "--budget", "200", "--recent", "16", "--chunk", "32",
                 "--flood-chars", "2000", "--granularity", granularity, "--recall", "--rope-positions", "memory"])
    out = capsys.readouterr().out
    assert code == 0 and " streaming  The door code is" in out
    assert "archived" in out.split("=== stats (halo) ===")[1]  # Halo's stats carry the archive


def test_demo_refuses_halo_as_its_own_baseline(capsys):
    assert main(["demo", "--baseline", "halo"]) == 2
    assert "--baseline must be another evicting policy" in capsys.readouterr().err


@pytest.mark.real_model
def test_on_the_embedded_model_halo_remembers_the_code_and_streaming_does_not():
    from halo.eval.runner import eval_config
    from halo.models import ModelNotFoundError, load_model

    try:
        model, tok = load_model()
    except ModelNotFoundError as exc:
        pytest.skip(f"embedded model unavailable: {exc}")
    story = make_story(tok)  # the `make demo` story: docs flood of 3000 characters, seed 0
    config = eval_config(192, chunk=64)
    halo, streaming = tell(model, tok, story, config, "halo"), tell(model, tok, story, config, "streaming")
    assert halo.correct, halo.reply
    assert not streaming.correct, streaming.reply
    assert "[...]" in halo.session.memory_text() and story.fact.answer in halo.session.memory_text()
