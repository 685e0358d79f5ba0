"""`halo chat` driven through run_chat with a fake stdin on the tiny model."""

import io

import pytest

from halo import HaloConfig, Session
from halo.cli import build_parser
from halo.cli.chat import ChatState, run_chat

TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make(tiny_pair, budget=96):
    model, tok = tiny_pair
    return Session(model, tok, HaloConfig(budget=budget, sink_tokens=2, recent_tokens=8, chunk_size=8))


def test_chat_turns_commands_save_and_load(tiny_pair, tmp_path):
    log = tmp_path / "app.log"
    log.write_text("".join(f"12:{i:02d} job {i} done\n" for i in range(20)))
    script = "\n".join([
        "hello there", "/stats", f"/log {log}", "what happened?", "/memory", "/forgotten",
        f"/save {tmp_path / 's.halo'}", "/bogus", "/load", f"/load {tmp_path / 'missing.halo'}",
        f"/load {tmp_path / 's.halo'}", "and now?", "/quit", "never read",
    ]) + "\n"
    out = io.StringIO()
    session = run_chat(make(tiny_pair), io.StringIO(script), out, system="Be brief.", max_new_tokens=6)
    text = out.getvalue()
    assert text.count("[retained ") >= 4 and "/96 | evicted" in text
    assert "tokens_fed" in text and "fed " in text and "log tokens" in text
    assert "tokens forgotten" in text and "saved to" in text and "loaded" in text
    assert "unknown command /bogus" in text and "usage: /load PATH" in text and "error: no saved session" in text
    assert session.cache.n_valid <= 96 and len(session.journal) > 0
    assert "chat" in session.extra and session.extra["chat"]["messages"][-2]["content"] == "what happened?"


def test_chat_uses_the_template_and_feeds_deltas(tiny_pair):
    model, tok = tiny_pair
    old = tok.chat_template
    tok.chat_template = TEMPLATE
    try:
        session = make(tiny_pair, budget=400)
        fed = []
        original = session.feed

        def spy(text, source="user"):
            fed.append((source, text))
            return original(text, source)

        session.feed = spy
        run_chat(session, io.StringIO("hi\nbye\n"), io.StringIO(), system="Be brief.", max_new_tokens=3)
    finally:
        tok.chat_template = old
    assert fed[0] == ("system", "<|system|>Be brief.<|end|>\n")
    assert fed[1] == ("user", "<|user|>hi<|end|>\n<|assistant|>")
    assert fed[2][0] == "assistant" and fed[2][1].startswith("<|end|>")
    assert fed[3] == ("user", "<|user|>bye<|end|>\n<|assistant|>")


def test_chat_state_without_template(tiny_tok):
    state = ChatState(tiny_tok, "sys")
    assert state.system_text() == "sys\n"
    assert state.user_text("hi") == "User: hi\nAssistant:"
    assert state.assistant_done(" yo") == "\n"


def test_chat_help_and_default_system():
    parser = build_parser()
    args = parser.parse_args(["chat", "--budget", "100"])
    assert "[...]" in args.system and args.budget == 100
    with pytest.raises(SystemExit):
        parser.parse_args(["chat", "--help"])
