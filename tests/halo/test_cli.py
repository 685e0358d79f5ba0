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
        {"role": "user", "content": "Tell me about the assert statement in Python. " * 6},
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
