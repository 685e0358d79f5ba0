"""The `halo` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import logging
import sys

from . import chat as _chat
from . import demo as _demo
from . import eval as _eval
from . import run as _run

SUBCOMMANDS = [_demo, _run, _chat, _eval]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="halo", description="Halo Weave: a fixed-budget KV cache where tokens "
                                     "live by the attention they earn.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"halo {args.command}: error: {err}", file=sys.stderr)
        return 2
