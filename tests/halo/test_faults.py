"""Every public entry point rejects bad input with a clear error and leaves the session usable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from halo import HaloConfig, Session, default_sources
from tiny import tiny_llama

CONFIG = dict(budget=48, sink_tokens=2, recent_tokens=8, chunk_size=8)


def usable(session):
    before = session.cache.seen
    session.feed("still works fine")
    session.generate(2)
    assert session.cache.seen > before and session.cache.n_valid <= session.config.budget


@pytest.fixture
def session(tiny_pair):
    model, tok = tiny_pair
    s = Session(model, tok, HaloConfig(**CONFIG))
    s.feed("Be brief.", source="system")
    s.feed("The quick brown fox jumps over the lazy dog. " * 3)
    return s


@pytest.mark.parametrize("call, error, match", [
    (lambda s: s.feed(""), ValueError, "empty"),
    (lambda s: s.feed(None), TypeError, "str"),
    (lambda s: s.feed(b"bytes"), TypeError, "str"),
    (lambda s: s.feed("hi", source="nobody"), ValueError, "unknown source"),
    (lambda s: s.feed("word " * 60, source="system"), ValueError, "protected set"),
    (lambda s: s.feed_ids([1, 2]), TypeError, "Tensor"),
    (lambda s: s.feed_ids(torch.tensor([[1, 2]])), ValueError, "1-D"),
    (lambda s: s.feed_ids(torch.tensor([], dtype=torch.int64)), ValueError, "non-empty"),
    (lambda s: s.feed_ids(torch.tensor([1.0, 2.0])), ValueError, "int64"),
    (lambda s: s.feed_ids(torch.tensor([1, 10_000])), ValueError, "out of range"),
    (lambda s: s.feed_ids(torch.tensor([-1])), ValueError, "out of range"),
    (lambda s: s.feed_ids(torch.tensor([1, 2], device="meta")), ValueError, "device"),
    (lambda s: s.feed_ids(torch.tensor([1]), source="nobody"), ValueError, "unknown source"),
    (lambda s: s.generate(-1), ValueError, "max_new_tokens"),
    (lambda s: s.generate(2, temperature=-1.0), ValueError, "sampling"),
    (lambda s: s.generate(2, top_p=1.5), ValueError, "sampling"),
    (lambda s: s.generate(2, source="nobody"), ValueError, "unknown source"),
    (lambda s: s.save(Path("/")), ValueError, "directory"),
])
def test_bad_input_is_refused_and_the_session_survives(session, call, error, match):
    state = (session.cache.seen, session.cache.n_valid, len(session.journal), session.pinned_tokens)
    with pytest.raises(error, match=match):
        call(session)
    assert state == (session.cache.seen, session.cache.n_valid, len(session.journal), session.pinned_tokens)
    usable(session)


@pytest.mark.parametrize("changes, match", [
    (dict(budget=0), "budget"), (dict(budget=-5), "budget"), (dict(budget=10), "protected set"),
    (dict(chunk_size=0), "chunk_size"), (dict(recent_tokens=-1), "recent_tokens"), (dict(alpha=float("nan")), "alpha"),
    (dict(sources={"user": None}), "SourcePolicy|marker"), (dict(kernels="fast"), "kernels"),
])
def test_bad_config_is_refused(changes, match):
    with pytest.raises(ValueError, match=match):
        HaloConfig(**(CONFIG | changes))


def test_generate_needs_context(tiny_pair):
    model, tok = tiny_pair
    s = Session(model, tok, HaloConfig(**CONFIG))
    with pytest.raises(ValueError, match="feed"):
        s.generate(3)
    usable(s)


def test_bad_save_files_and_other_models(session, tmp_path):
    model, tok = session.model, session.tokenizer
    path = session.save(tmp_path / "s.halo")
    data = path.read_bytes()
    (tmp_path / "t.halo").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        Session.load(tmp_path / "t.halo", model, tok)
    with pytest.raises(ValueError, match="num_layers"):
        Session.load(path, tiny_llama(vocab=len(tok), layers=1), tok)
    usable(session)
    usable(Session.load(path, model, tok))


def test_cli_config_file_and_flag_override(tmp_path):
    from halo.cli import build_parser
    from halo.cli.common import config_from_args

    toml = tmp_path / "halo.toml"
    toml.write_text('budget = 300\nrecent_tokens = 16\n[sources.log]\ndecay = 5.0\n[sources.build]\ninitial = 90.0\n')
    args = build_parser().parse_args(["run", "--config", str(toml), "--recent", "20"])
    config = config_from_args(args)
    assert config.budget == 300 and config.recent_tokens == 20
    assert config.sources["log"].decay == 5.0 and config.sources["log"].initial == default_sources()["log"].initial
    assert config.sources["build"].initial == 90.0
    toml.write_text("budgett = 3\n")
    with pytest.raises(ValueError, match="unknown config keys"):
        config_from_args(build_parser().parse_args(["run", "--config", str(toml)]))
    toml.write_text("budget = [\n")
    with pytest.raises(ValueError, match="invalid TOML"):
        config_from_args(build_parser().parse_args(["run", "--config", str(toml)]))


def test_killed_run_leaves_a_whole_line_journal(tiny_tok, tmp_path):
    model_dir = tmp_path / "tiny-model"
    tiny_llama(vocab=len(tiny_tok)).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    from halo.text import embedded_text

    text = embedded_text(max_chars=400_000).encode("ascii", "ignore").decode()
    (tmp_path / "big.txt").write_text(text)
    journal = tmp_path / "journal.jsonl"
    cmd = [sys.executable, "-m", "halo", "run", "--model", str(model_dir), "--text", str(tmp_path / "big.txt"),
           "--budget", "48", "--sinks", "2", "--recent", "8", "--chunk", "8", "--step", "8", "--max-tokens", "0",
           "--journal", str(journal), "--quiet", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"TRITON_INTERPRET": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if journal.exists() and journal.stat().st_size > 20_000:
                break
            if proc.poll() is not None:
                pytest.fail(f"halo run ended early: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        else:
            pytest.fail("journal did not grow in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    raw = journal.read_text()
    assert raw.endswith("\n")
    entries = [json.loads(line) for line in raw.splitlines()]  # every line parses
    ids = tiny_tok(text, add_special_tokens=False)["input_ids"]
    positions = [e["position"] for e in entries]
    assert len(set(positions)) == len(positions)  # each position dies once
    for e in entries:
        assert e["source"] == "user" and 0 <= e["brightness"] <= 255
        assert e["position"] >= 2  # sinks never die
        assert ids[e["position"]] == e["token_id"]  # a real token that was fed at that position
