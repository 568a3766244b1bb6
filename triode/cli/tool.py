"""``triode tool call ENTRYPOINT TOOL``: call a JavaScript/TypeScript tool, print its JSON result."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..errors import DeadlineExceeded, ToolError, TriodeError
from .common import add_client_options, open_cli_client


def _env_item(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tool", help="call JavaScript/TypeScript tools in warm bun or node workers")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    call = verbs.add_parser("call", help="call TOOL of ENTRYPOINT and print its JSON result")
    call.add_argument("entrypoint", metavar="ENTRYPOINT", help=".js/.ts file whose exports are tools")
    call.add_argument("tool", metavar="TOOL", help="name of the export to call")
    source = call.add_mutually_exclusive_group()
    source.add_argument("--input", metavar="JSON", help="the tool's input as JSON (default: null)")
    source.add_argument("--input-file", metavar="FILE", help="read the input JSON from FILE ('-': stdin)")
    call.add_argument(
        "--runtime", choices=["bun", "node"], help="runtime (default: bun if installed, else node)"
    )
    call.add_argument(
        "--env",
        metavar="KEY=VALUE",
        type=_env_item,
        action="append",
        default=[],
        help="environment variable for the tool (repeatable)",
    )
    call.add_argument(
        "--timeout", type=float, metavar="S", help="seconds before the call is killed (default 60)"
    )
    call.add_argument(
        "--one-shot", action="store_true", help="run in a fresh process, thrown away after the call"
    )
    call.add_argument("--compact", action="store_true", help="print the result on one line")
    add_client_options(call)
    call.set_defaults(func=run_call)

    lst = verbs.add_parser("list", help="list the tools ENTRYPOINT exports")
    lst.add_argument("entrypoint", metavar="ENTRYPOINT")
    lst.add_argument("--runtime", choices=["bun", "node"])
    add_client_options(lst)
    lst.set_defaults(func=run_list)


def _entrypoint(args: argparse.Namespace) -> str:
    # A relative path means one relative to here; the node needs it absolute.
    return os.path.abspath(args.entrypoint)


def _input(args: argparse.Namespace) -> Any:
    if args.input_file:
        text = sys.stdin.read() if args.input_file == "-" else open(args.input_file, encoding="utf-8").read()
    elif args.input is not None:
        text = args.input
    else:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise TriodeError(f"--input is not JSON: {exc}") from None


async def run_call(args: argparse.Namespace) -> int:
    value = _input(args)
    async with open_cli_client(args) as client:
        # Tool errors and timeouts get exit codes of their own (1 with the stack, 124).
        try:
            output = await client.tools.call(
                _entrypoint(args),
                args.tool,
                value,
                runtime=args.runtime,
                env=dict(args.env) or None,
                timeout=args.timeout,
                one_shot=args.one_shot or None,
            )
        except ToolError as exc:
            print(f"triode: {exc}", file=sys.stderr)
            stack = exc.details.get("stack")
            if stack:
                print(stack, file=sys.stderr)
            return 1
        except DeadlineExceeded as exc:
            print(f"triode: {exc}", file=sys.stderr)
            return 124
        except TriodeError as exc:
            print(f"triode: {exc}", file=sys.stderr)
            return 1
    indent = None if args.compact else 2
    print(json.dumps(output, indent=indent, ensure_ascii=False))
    return 0


async def run_list(args: argparse.Namespace) -> int:
    async with open_cli_client(args) as client:
        try:
            tools = await client.tools.list(_entrypoint(args), runtime=args.runtime)
        except TriodeError as exc:
            print(f"triode: {exc}", file=sys.stderr)
            return 1
    for name in tools:
        print(name)
    return 0
