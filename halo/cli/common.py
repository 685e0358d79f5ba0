"""Options and helpers shared by subcommands: model choice and the engine configuration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..config import HaloConfig


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub name or local folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    defaults = HaloConfig()
    parser.add_argument("--budget", type=int, default=defaults.budget, help=f"tokens kept in the KV cache (default {defaults.budget})")
    parser.add_argument("--sinks", type=int, default=defaults.sink_tokens, help=f"attention-sink tokens always kept (default {defaults.sink_tokens})")
    parser.add_argument("--recent", type=int, default=defaults.recent_tokens, help=f"grace window of newest tokens always kept (default {defaults.recent_tokens})")
    parser.add_argument("--chunk", type=int, default=defaults.chunk_size, help=f"most tokens per forward when feeding (default {defaults.chunk_size})")
    parser.add_argument("--dark-bias", type=float, default=defaults.dark_bias, help=f"weight of the dark-neighbourhood term in the cull score (default {defaults.dark_bias})")
    parser.add_argument("--cull-threshold", type=float, default=None, help="brightness at which tokens die of neglect even under budget (default: off)")
    parser.add_argument("--reference", action="store_true", help="force the plain-PyTorch reference path (no fused kernels)")


def config_from_args(args) -> HaloConfig:
    return HaloConfig(budget=args.budget, sink_tokens=args.sinks, recent_tokens=args.recent, chunk_size=args.chunk,
                      dark_bias=args.dark_bias, cull_threshold=args.cull_threshold,
                      kernels="reference" if args.reference else "auto")


def read_transcript(path: Path) -> list[tuple[str, str]]:
    """(source, text) pairs from a text file (one `user` message) or a JSON/JSONL chat transcript.

    A transcript is a list of {"role": ..., "content": ...} objects; roles map to sources of the same name.
    """
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        messages = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        messages = json.loads(raw)
    else:
        return [("user", raw)]
    try:
        return [(m["role"], m["content"]) for m in messages]
    except (TypeError, KeyError) as err:
        raise ValueError(f"{path}: a transcript is a list of {{'role', 'content'}} objects ({err})") from None
