"""`halo demo`: a user fact, a long tool output, the question: Halo's answer beside a baseline's at one budget."""

from __future__ import annotations

import textwrap

from .common import add_config_options, add_model_options, config_from_args, print_stats

_DEFAULT_BUDGET = 192


def add_parser(sub) -> None:
    from ..eval.conversation import FLOOD_SHAPES

    parser = sub.add_parser("demo", help="a fact, a flood of tool output, the question: Halo vs a baseline",
                            description="Tell one conversation twice with the KV cache held at --budget tokens: the "
                            "user states a door code, a long tool output arrives, the user asks for the code. Prints "
                            "Halo's greedy answer beside the baseline's, then what Halo remembered.")
    add_model_options(parser)
    add_config_options(parser)
    parser.add_argument("--flood", choices=FLOOD_SHAPES, default="docs",
                        help="the tool output: documentation lines of the embedded text (docs, as tool; default), "
                        "build-log lines (build, as log) or a JSON result (json, as tool)")
    parser.add_argument("--flood-chars", type=int, default=3000, help="characters of tool output (default 3000)")
    parser.add_argument("--baseline", default="streaming", help="the policy Halo is compared with: streaming "
                        "(default), h2o, tova or random")
    parser.add_argument("--seed", type=int, default=0, help="seed of the story (the code, the flood's content)")
    parser.set_defaults(func=main)


def _clip(text: str, width: int = 100) -> str:
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 3] + "..."


def main(args) -> int:
    from ..eval.runner import eval_config
    from ..models import load_model
    from ..story import make_story, story_tokens, tell

    if args.baseline in ("halo", "full"):
        raise ValueError(f"--baseline must be another evicting policy (streaming, h2o, tova, random), got {args.baseline!r}")
    base = config_from_args(args)
    budget = args.budget or _DEFAULT_BUDGET
    # the protected set every policy shares (sinks, a recent window of min(64, budget / 4)), as `halo eval` does
    config = base.replace(budget=budget, recent_tokens=base.recent_tokens if args.recent is not None
                          else eval_config(budget).recent_tokens)
    model, tokenizer = load_model(args.model, device=args.device)
    story = make_story(tokenizer, flood=args.flood, flood_chars=args.flood_chars, seed=args.seed)
    tokens = story_tokens(tokenizer, story, config)
    print(f"=== the conversation: {tokens} tokens through a {budget}-token KV budget ===")
    for message in story.messages:
        if message.role in ("tool", "log"):
            lines = message.text.count("\n")
            print(f"{message.role:>10}  [{lines} lines, {len(message.text)} characters of output: "
                  f"{_clip(message.text, 60)}]")
        else:
            print(f"{message.role:>10}  {_clip(message.text)}")
    # the baseline runs as published (one token set for all layers): Halo's own options (recall) are Halo's alone
    tellings = [tell(model, tokenizer, story, config, "halo"),
                tell(model, tokenizer, story, config.replace(recall=False), args.baseline)]
    print(f"=== answers (greedy; expected: {story.fact.answer_prefix} {story.fact.answer}) ===")
    for telling in tellings:
        verdict = "correct" if telling.correct else "wrong"
        print(f"{telling.policy:>10}  {story.fact.answer_prefix} {_clip(telling.reply, 60)}   [{verdict}]")
    halo = tellings[0].session
    print(f"=== what halo remembers ({len(halo.memory())} tokens; [...] stands for culled tool lines) ===")
    print(halo.memory_text())
    print("=== stats (halo) ===")
    print_stats(halo.stats())
    return 0
