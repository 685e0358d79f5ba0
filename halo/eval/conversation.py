"""Generated conversations for the conversation suite: facts stated by the user, floods of tool and log output,
assistant turns, distractor facts, and a question about one fact last.

A conversation is a list of `Message`s (role = the Session source it is fed as: system, user, assistant, tool,
log). The user states three facts of different kinds: the asked one emphatically (`Remember it.`, the value said
twice) and two distractors in passing; two before a first flood of output and one between it and a second flood
(documentation lines from the embedded text, build-log lines, or a JSON tool result). Each flood is asked for by
the user and summed up by the assistant, each fact is acknowledged by the assistant, and last the user asks about
one fact. The reply is read after `answer_prefix` (fed as the start of the assistant's answer) and scored by
`answer_matches`. Everything comes from a seeded `random.Random` and the embedded text: the same seed gives the
same conversations.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

SYSTEM_PROMPT = ("You are a helpful assistant with a perfect memory. Answer with the exact value the user gave. "
                 "A line [...] marks tool or log lines left out.")
"""The system prompt of every conversation (fed as `system`: pinned)."""

FACT_KINDS = ("number", "name", "code", "instruction")
"""Kinds of facts: a 5-digit number, a person's name, an identifier code, an instruction naming a word."""

FLOOD_SHAPES = ("docs", "build", "json")
"""Shapes of flood: documentation lines (tool), build-log lines (log), a pretty-printed JSON result (tool)."""

FLOOD_SIZES = (400, 800, 1200)
"""Default total characters of flood per conversation (about 150 to 750 tokens for SmolLM2's tokenizer)."""

_FIRST = ("Marta", "Jonas", "Priya", "Tomasz", "Aiko", "Lucas", "Fatima", "Oskar", "Elena", "Rafael", "Ingrid", "Kwame")
_LAST = ("Kowalski", "Lindqvist", "Okafor", "Moreau", "Tanaka", "Brennan", "Haddad", "Novak", "Ferreira", "Sato")
_WORDS = ("lantern", "harbor", "velvet", "meadow", "copper", "falcon", "orchid", "glacier", "saffron", "timber",
          "compass", "marble")

_SUBJECTS = {
    "number": ("pass key", "door code", "order number", "locker number"),
    "name": ("manager", "landlord", "dentist", "neighbour"),
    "code": ("ticket code", "invoice code", "license code", "tracking code"),
    "instruction": ("magic word", "safe word", "secret word", "word of the day"),
}


@dataclass(frozen=True)
class Message:
    """One turn: `role` is the Session source it is fed as (system, user, assistant, tool, log)."""

    role: str
    text: str


@dataclass(frozen=True)
class Fact:
    """A fact the user states: `statement` says it, `question` asks it, the answer is `answer_prefix answer`."""

    kind: str
    subject: str
    answer: str
    statement: str
    question: str
    answer_prefix: str


@dataclass(frozen=True)
class Conversation:
    """A generated conversation: `messages` end with the question (a user message); `target` is the asked fact,
    `facts` every fact stated (target and distractors, in the order stated), `flood` the flood's shape and
    `flood_chars` its total size."""

    index: int
    messages: tuple[Message, ...]
    target: Fact
    facts: tuple[Fact, ...]
    flood: str
    flood_chars: int

    @property
    def answer(self) -> str:
        return self.target.answer

    @property
    def floods(self) -> list[Message]:
        """The tool and log messages, in order."""
        return [m for m in self.messages if m.role in ("tool", "log")]

    @property
    def answer_prefix(self) -> str:
        return self.target.answer_prefix


def fact_value(kind: str, rng: random.Random) -> str:
    """A fresh value of `kind`: 5 digits, a first and last name, two letters-dash-four digits, or a word."""
    if kind == "number":
        return str(rng.randint(10000, 99999))
    if kind == "name":
        return f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    if kind == "code":
        letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
        return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randint(1000, 9999)}"
    if kind == "instruction":
        return rng.choice(_WORDS)
    raise ValueError(f"unknown fact kind {kind!r}; kinds: {', '.join(FACT_KINDS)}")


def make_fact(kind: str, subject: str, rng: random.Random, *, emphatic: bool = True) -> Fact:
    """A fact of `kind` about `subject` with a fresh value from `rng`.

    An emphatic statement asks to remember the value and repeats it (how a user states what matters); a plain
    one says it once in passing (distractors)."""
    value = fact_value(kind, rng)
    question, prefix = f"What is the {subject}?", f"The {subject} is"
    if kind == "name":
        question, prefix = f"What is my {subject}'s name?", f"Your {subject}'s name is"
        claim, again = f"My {subject}'s name is {value}.", f" Remember it: {value}."
    elif kind == "instruction":
        claim, again = f"When I ask for the {subject}, answer {value}.", f" Remember it: the {subject} is {value}."
    else:
        claim, again = f"The {subject} is {value}.", f" Remember it. {value} is the {subject}."
    return Fact(kind, subject, value, claim + again if emphatic else claim, question, prefix)


def pick_facts(kind: str, rng: random.Random) -> tuple[Fact, list[Fact]]:
    """The target fact of `kind` (stated emphatically) and two distractor facts of two other kinds, stated in
    passing (every fact has its own subject and its own answer shape)."""
    others = rng.sample([k for k in FACT_KINDS if k != kind], 2)
    target = make_fact(kind, rng.choice(_SUBJECTS[kind]), rng)
    return target, [make_fact(other, rng.choice(_SUBJECTS[other]), rng, emphatic=False) for other in others]


def docs_flood(chars: int, rng: random.Random, lines: list[str]) -> str:
    """A contiguous run of documentation lines from the embedded text, about `chars` long."""
    start = rng.randrange(max(1, len(lines) - 400))
    return _take_lines(lines[start:], chars)


def build_flood(chars: int, rng: random.Random) -> str:
    """Build-log-like lines (compile steps, warnings, test results, downloads), about `chars` long."""
    modules = ("net", "http", "cache", "io", "auth", "sched", "util", "db")
    seconds = rng.randint(8 * 3600, 17 * 3600)
    out: list[str] = []
    while sum(len(line) + 1 for line in out) < chars:
        seconds += rng.randint(0, 3)
        stamp = f"[{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}]"
        module = rng.choice(modules)
        kind = rng.random()
        if kind < 0.45:
            line = f"{stamp} CC src/{module}/{module}_{rng.randint(1, 99)}.c -> build/{module}_{rng.randint(1, 99)}.o"
        elif kind < 0.6:
            line = (f"{stamp} warning: unused variable 'tmp{rng.randint(0, 9)}' in {module}_parse "
                    f"(src/{module}/parser.c:{rng.randint(10, 999)})")
        elif kind < 0.85:
            test = rng.choice(("open", "close", "retry", "evict"))
            line = f"{stamp} [ OK ] test_{module}_{test} ({rng.randint(1, 999)} ms)"
        else:
            version = f"{rng.randint(1, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
            line = f"{stamp} Downloading {module}lib-{version}.tar.gz ({rng.randint(1, 90)}.{rng.randint(0, 9)} MB)"
        out.append(line)
    return "\n".join(out) + "\n"


def json_flood(chars: int, rng: random.Random) -> str:
    """A pretty-printed JSON tool result (a list of records, one key per line), about `chars` long."""
    records = []
    text = ""
    while len(text) < chars:
        records.append({"id": rng.randint(1000, 99999), "name": f"{rng.choice(_WORDS)}-{rng.randint(1, 99)}",
                        "status": rng.choice(("ok", "pending", "failed")), "size": rng.randint(1, 99999),
                        "updated": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"})
        text = json.dumps({"results": records}, indent=1)
    return text + "\n"


def _take_lines(lines: list[str], chars: int) -> str:
    out: list[str] = []
    size = 0
    for line in lines:
        if size >= chars:
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out) + "\n"


_FLOOD_TURNS = {
    "docs": ("tool", "Look up the language reference for me.", "That was the reference text; ask about any part."),
    "build": ("log", "Run the build and show me the log.", "The build finished; every test passed."),
    "json": ("tool", "Query the job database.", "Here are the job records from the database."),
}


def flood_turns(shape: str, chars: int, rng: random.Random, doc_lines: list[str]) -> list[Message]:
    """The user's request, the flood output (source tool or log) and the assistant's summary."""
    role, request, summary = _FLOOD_TURNS[shape]
    if shape == "docs":
        body = docs_flood(chars, rng, doc_lines)
    elif shape == "build":
        body = build_flood(chars, rng)
    else:
        body = json_flood(chars, rng)
    return [Message("user", request), Message(role, body), Message("assistant", summary)]


def fact_turns(fact: Fact) -> list[Message]:
    """The user stating `fact` and the assistant acknowledging it."""
    return [Message("user", fact.statement), Message("assistant", f"Noted: the {fact.subject}.")]


def make_conversation(index: int, rng: random.Random, *, flood_chars: int, shape: str, kind: str,
                      doc_lines: list[str]) -> Conversation:
    """One conversation: system, two fact turns, a first flood, a third fact turn, a second flood, the question.

    The target sits at a random one of the three fact slots; the two floods split `flood_chars` at random.
    """
    target, distractors = pick_facts(kind, rng)
    facts = [target, *distractors]
    rng.shuffle(facts)
    first = rng.randint(flood_chars // 4, 3 * flood_chars // 4)
    messages = [Message("system", SYSTEM_PROMPT)]
    messages += fact_turns(facts[0]) + fact_turns(facts[1])
    messages += flood_turns(shape, first, rng, doc_lines)
    messages += fact_turns(facts[2])
    messages += flood_turns(shape, flood_chars - first, rng, doc_lines)
    messages.append(Message("user", target.question))
    return Conversation(index, tuple(messages), target, tuple(facts), shape, flood_chars)


def make_conversations(count: int, seed: int = 0, *, flood_sizes=FLOOD_SIZES) -> list[Conversation]:
    """`count` conversations from `seed`. Asked kinds and flood shapes cycle, and sizes cycle out of step with the
    shapes, so that every kind, shape and size appears and each shape meets every size."""
    from ..text import embedded_text

    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    sizes = [int(size) for size in flood_sizes]
    if not sizes or min(sizes) < 2:
        raise ValueError(f"flood sizes must be >= 2 characters, got {flood_sizes}")
    doc_lines = embedded_text().splitlines()
    rng = random.Random(seed)
    shapes = len(FLOOD_SHAPES)
    return [make_conversation(i, rng, flood_chars=sizes[(i + i // shapes) % len(sizes)], shape=FLOOD_SHAPES[i % shapes],
                              kind=FACT_KINDS[i % len(FACT_KINDS)], doc_lines=doc_lines) for i in range(count)]


def normalise(text: str) -> str:
    """Case-folded, whitespace runs made single spaces, leading spaces, quotes and markup (`"'*`) stripped."""
    return re.sub(r"\s+", " ", text).strip().lstrip("\"'*` ").casefold()


def answer_matches(reply: str, answer: str) -> bool:
    """Exact match: the normalised reply starts with the normalised answer and the next character (if any) is not
    a letter or digit. `52445.` matches 52445; `2445`, `524451` and `52445x` do not; case is ignored."""
    got, want = normalise(reply), normalise(answer)
    return got.startswith(want) and not got[len(want):len(want) + 1].isalnum()
