"""The ``triode`` command. Each subcommand lives in its own module with a ``register``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from ..errors import TriodeError
from . import bench, cas, node, ping, run, status, tool

__all__ = ["main"]

#: Subcommand modules, in the order ``triode --help`` lists them. Each has
#: ``register(subparsers)`` which sets ``func``: an async function of the parsed args
#: returning the exit code.
COMMANDS = [node, ping, cas, run, bench, tool, status]


#: Exit code when triode itself fails (cannot reach the node, bad input). 1 is kept for a
#: plain "no" (a digest missing, a blob not found); ``triode run`` uses 125 instead, as
#: timeout(1) does, so that its own failures never look like the command's exit code.
ERROR_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triode", description="A structured-concurrency execution engine for Trio."
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        # A few commands (bench) run their own trio loops per measurement.
        code = args.func(args) if getattr(args, "sync", False) else trio.run(args.func, args)
    except KeyboardInterrupt:
        return 130
    except (TriodeError, OSError) as exc:
        print(f"triode: {exc}", file=sys.stderr)
        return getattr(args, "error_exit", ERROR_EXIT)
    return int(code or 0)
