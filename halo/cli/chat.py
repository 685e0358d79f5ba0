"""`halo chat`: talk to a model whose KV cache is held at a fixed budget.

The loop itself is `run_chat(session, stdin, stdout)` (testable with any model); `main` only loads the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_SYSTEM = ("You are a helpful assistant. Tool and log output you see has been filtered by the tools: "
                  "a line `[...]` marks lines they left out.")

HELP = """commands:
  /memory          show the remembered text
  /forgotten       show what was forgotten (in position order)
  /recalled        show what recall brought back (with --recall)
  /stats           show counters
  /log PATH        feed a log file (as source `log`)
  /save PATH       save the session
  /load PATH       load a saved session
  /quit            leave (end of input does too)"""


def add_parser(sub) -> None:
    from .common import add_config_options, add_model_options

    parser = sub.add_parser("chat", help="interactive chat at a fixed KV budget",
                            description="Chat with a model whose KV cache is held at --budget tokens. Replies stream "
                            "token by token; a status line shows retained/budget, evictions and repairs.\n\n" + HELP,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    add_config_options(parser)
    parser.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt (pinned); '' for none")
    parser.add_argument("--log", type=Path, action="append", default=[], metavar="FILE",
                        help="feed this log file (source `log`) before the first turn; repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="longest reply (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.set_defaults(func=main)


class ChatState:
    """Tracks what of the chat-template rendering has been fed, so each turn feeds only its delta."""

    def __init__(self, tokenizer, system: str | None):
        self.tokenizer = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.rendered = ""  # template rendering of `messages` as fed so far

    def _render(self, messages, prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def system_text(self) -> str | None:
        if not self.messages:
            return None
        if not self.templated:
            return self.messages[0]["content"] + "\n"
        self.rendered = self._render(self.messages, False)
        return self.rendered

    def user_text(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        if not self.templated:
            return f"User: {text}\nAssistant:"
        full = self._render(self.messages, True)
        delta = full[len(self.rendered):] if full.startswith(self.rendered) else full
        self.rendered = full
        return delta

    def assistant_done(self, reply: str) -> str:
        """Text to feed after the reply (the template's end-of-turn), as source assistant."""
        self.messages.append({"role": "assistant", "content": reply})
        if not self.templated:
            return "\n"
        full = self._render(self.messages, False)
        fed = self.rendered + reply
        delta = full[len(fed):] if full.startswith(fed) else ""
        self.rendered = full if full.startswith(fed) else fed
        return delta

    def to_dict(self) -> dict:
        return {"messages": self.messages, "rendered": self.rendered}

    def restore(self, data: dict) -> None:
        self.messages = list(data.get("messages", self.messages))
        self.rendered = str(data.get("rendered", self.rendered))


def status_line(session) -> str:
    s = session.stats()
    recalled = f" | recalled {s['recalled']}" if session.recall is not None else ""
    return f"[retained {s['retained']}/{s['budget']} | evicted {s['evicted']}{recalled} | repairs {s['repairs']}]"


def recalled_text(session) -> str:
    """What recall brought back: one line per recall (the step, then the text in position order)."""
    if session.recall is None:
        return "(recall is off: start with --recall)"
    by_step: dict[int, list] = {}
    for entry in session.journal.entries:
        if entry.kind == "recalled":
            by_step.setdefault(entry.step, []).append(entry)
    lines = [f"({sum(len(v) for v in by_step.values())} tokens recalled in {len(by_step)} recalls)"]
    for step, entries in by_step.items():
        entries.sort(key=lambda e: e.position)
        lines.append(f"step {step}: {session.tokenizer.decode([e.token_id for e in entries])!r}")
    return "\n".join(lines)


def run_chat(session, stdin, stdout, *, system: str | None = DEFAULT_SYSTEM, logs=(), max_new_tokens: int = 256,
             temperature: float = 0.0, seed: int | None = None, prompt: str = "> ", load_session=None):
    """Read lines from `stdin` until /quit or end of input; write replies and status to `stdout`.

    Args:
        session: a fresh Session (or one loaded with `Session.load`).
        logs: log files to feed before the first turn.
        load_session: callable(path) -> Session for /load (default: Session.load on the same model/tokenizer).
    Returns:
        the session at the end (it may differ from the one given after /load).
    """
    from ..session import Session

    def say(text: str = "", end: str = "\n") -> None:
        stdout.write(text + end)
        stdout.flush()

    state = ChatState(session.tokenizer, system)
    saved = getattr(session, "extra", None) or {}
    if "chat" in saved:
        state.restore(saved["chat"])
    elif session.cache.seen == 0 and (text := state.system_text()):
        session.feed(text, source="system")
    if load_session is None:
        def load_session(path):
            return Session.load(path, session.model, session.tokenizer)

    def feed_log(path) -> None:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            raise ValueError(f"log file {path} is empty")
        if not text.endswith("\n"):
            text += "\n"
        count = session.feed(text, source="log")
        say(f"(fed {count} log tokens from {path}) {status_line(session)}")

    for path in logs:
        feed_log(path)
    while True:
        stdout.write(prompt)
        stdout.flush()
        line = stdin.readline()
        if not line:
            say()
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            arg = arg.strip()
            try:
                if command == "/quit":
                    break
                elif command == "/memory":
                    say(session.memory_text())
                elif command == "/forgotten":
                    entries = sorted(session.journal.evicted, key=lambda e: e.position)
                    say(f"({len(entries)} tokens forgotten)")
                    say(session.tokenizer.decode([e.token_id for e in entries]))
                elif command == "/recalled":
                    say(recalled_text(session))
                elif command == "/stats":
                    for key, value in session.stats().items():
                        say(f"{key:>14}: {value:.3f}" if isinstance(value, float) else f"{key:>14}: {value}")
                elif command == "/save":
                    if not arg:
                        raise ValueError("usage: /save PATH")
                    session.save(arg, extra={"chat": state.to_dict()})
                    say(f"(saved to {arg})")
                elif command == "/load":
                    if not arg:
                        raise ValueError("usage: /load PATH")
                    loaded = load_session(arg)
                    session = loaded
                    state = ChatState(session.tokenizer, None)
                    state.restore((getattr(session, "extra", None) or {}).get("chat", {}))
                    say(f"(loaded {arg}) {status_line(session)}")
                elif command == "/log":
                    if not arg:
                        raise ValueError("usage: /log PATH")
                    feed_log(arg)
                elif command in ("/help", "/?"):
                    say(HELP)
                else:
                    say(f"unknown command {command}\n{HELP}")
            except (ValueError, OSError) as err:
                say(f"error: {err}")
            continue
        try:
            session.feed(state.user_text(line), source="user")
        except ValueError as err:
            state.messages.pop()
            say(f"error: {err}")
            continue
        ids: list[int] = []
        shown = ""

        def on_token(token_id: int) -> None:
            nonlocal shown
            ids.append(token_id)
            text = session.tokenizer.decode(ids)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                return
            stdout.write(text[len(shown):])
            stdout.flush()
            shown = text

        reply = session.generate(max_new_tokens, temperature=temperature, seed=seed, on_token=on_token)
        if len(reply) > len(shown):
            stdout.write(reply[len(shown):])
        say()
        end = state.assistant_done(reply)
        if end:
            session.feed(end, source="assistant")
        say(status_line(session))
    return session


def main(args) -> int:
    import sys

    from ..models import load_model
    from ..session import Session
    from .common import config_from_args

    config = config_from_args(args)
    for path in args.log:
        if not path.is_file():
            raise FileNotFoundError(f"no such log file: {path}")
    model, tokenizer = load_model(args.model, device=args.device)
    session = Session(model, tokenizer, config)
    run_chat(session, sys.stdin, sys.stdout, system=args.system or None, logs=args.log,
             max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    return 0
