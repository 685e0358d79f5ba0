import json
import subprocess
import sys

import pytest

from halo.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    out = capsys.readouterr().out
    for flag in ("--budget", "--text", "--generate", "--journal", "--model"):
        assert flag in out


@pytest.mark.real_model
def test_run_streams_a_transcript_and_writes_the_journal(tmp_path):
    transcript = tmp_path / "chat.json"
    transcript.write_text(json.dumps([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Tell me about the assert statement in Python. " * 20},
    ]))
    journal = tmp_path / "journal.jsonl"
    code = main(["run", "--text", str(transcript), "--budget", "48", "--recent", "8", "--chunk", "16",
                 "--journal", str(journal), "--generate", "4", "--quiet"])
    assert code == 0
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert entries and {"position", "token_id", "source", "brightness", "step"} <= set(entries[0])
    assert all(e["source"] == "user" for e in entries)  # the pinned system prompt never dies


def test_bad_arguments_exit_with_a_message(tmp_path):
    result = subprocess.run([sys.executable, "-m", "halo", "run", "--text", str(tmp_path / "missing.txt")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no such text file" in result.stderr
    result = subprocess.run([sys.executable, "-m", "halo", "run", "--budget", "8"], capture_output=True, text=True)
    assert result.returncode == 2 and "protected set" in result.stderr


def test_run_writes_html_png_and_a_loadable_save(tmp_path, tiny_tok):
    from tiny import tiny_llama

    from halo import Session
    model_dir = tmp_path / "tiny"
    model = tiny_llama(vocab=len(tiny_tok))
    model.save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    text = tmp_path / "log.txt"
    text.write_text("".join(f"step {i}: loss {1.0 / (i + 1):.3f}\n" for i in range(30)))
    out = {name: tmp_path / name for name in ("m.html", "m.png", "s.halo")}
    code = main(["run", "--model", str(model_dir), "--text", str(text), "--source", "log", "--budget", "48",
                 "--recent", "8", "--chunk", "8", "--max-tokens", "0", "--quiet", "--html", str(out["m.html"]),
                 "--png", str(out["m.png"]), "--save", str(out["s.halo"])])
    assert code == 0
    page = out["m.html"].read_text()
    assert page.startswith("<!DOCTYPE html>") and "[...]" in page
    assert out["m.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    restored = Session.load(out["s.halo"], model, tiny_tok, check_name=False)
    assert restored.cache.n_valid <= 48 and len(restored.journal.evicted) > 0
