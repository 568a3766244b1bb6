"""``triode run``: run a command as a cached action, as if it ran here.

The current directory is the action's input root: ``--input`` paths are uploaded from
it, ``--output`` paths are written back into it, and the command's stdout, stderr and
exit code become ours (124 when it timed out, as ``timeout(1)`` does). The environment
is clean: only ``--env`` settings, and a fixed default PATH, so the same command has the
same action digest (and shares cache entries) on every machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import trio

from ..client.actions import write_outputs
from ..errors import InvalidArgument, MissingInputs
from ..model.action import Action
from ..model.digest import Digest
from ..model.result import ExecuteOutcome
from .common import add_client_options, open_cli_client

__all__ = ["register", "run", "DEFAULT_PATH", "TIMEOUT_EXIT"]

log = logging.getLogger("triode.run")

#: PATH of an action unless ``--env PATH=...`` sets another: the same on every machine.
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Our exit code when the action timed out (as timeout(1)).
TIMEOUT_EXIT = 124


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a command as a cached action",
        description="Run CMD as a cached action with the current directory as its input root. "
        "Its stdout/stderr become ours, --output paths are written back here, and the exit code "
        f"is the command's ({TIMEOUT_EXIT} when it timed out).",
    )
    p.add_argument("--timeout", type=float, metavar="S", help="seconds before the command's process "
                   "group is stopped (SIGTERM, grace, SIGKILL)")
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="file or directory (recursively) the command reads, relative to here (repeatable)")
    p.add_argument("--output", action="append", default=[], metavar="PATH",
                   help="file or directory the command writes, copied back here (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="K=V",
                   help=f"set a variable (K alone copies ours); the default is only PATH={DEFAULT_PATH}")
    p.add_argument("--no-cache", action="store_true",
                   help="neither look the action up in the cache nor store its result")
    p.add_argument("--result-json", metavar="FILE", type=Path,
                   help="write the action digest, exit code, cached, timings, outputs ... as JSON")
    add_client_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARG...")
    p.set_defaults(func=run, error_exit=125)


def parse_env(items: list[str]) -> dict[str, str]:
    env = {"PATH": DEFAULT_PATH}
    for item in items:
        name, sep, value = item.partition("=")
        if not name:
            raise InvalidArgument(f"--env {item!r}: expected NAME=VALUE or NAME")
        if not sep:
            if name not in os.environ:
                raise InvalidArgument(f"--env {name}: not set in this environment; give NAME=VALUE")
            value = os.environ[name]
        env[name] = value
    return env


async def run(args: argparse.Namespace) -> int:
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidArgument("no command given: triode run [OPTIONS] -- CMD ARG...")
    cwd = Path.cwd()
    env = parse_env(args.env)
    async with open_cli_client(args) as client:
        for attempt in range(2):
            local = await client.upload_inputs(cwd, args.input)
            action = Action(
                argv=tuple(argv),
                env=env,
                inputs=local.inputs,
                directories=tuple(local.directories),
                outputs=tuple(args.output),
                timeout=args.timeout,
                do_not_cache=args.no_cache,
            )
            try:
                outcome = await client.execute(action, skip_cache=args.no_cache)
                break
            except MissingInputs:
                if attempt:  # uploaded, then evicted before the run twice in a row
                    raise
                log.info("inputs went missing between upload and execute; uploading again")
        result = outcome.result
        if outcome.cached:
            log.info("action %s: cache hit (it ran on %s)", outcome.action_digest, result.node)
        else:
            log.info("action %s: ran on %s in %.3fs", outcome.action_digest, result.node,
                     result.timings.running)
        await _copy_blob(client.cas, result.stdout.digest, sys.stdout)
        await _copy_blob(client.cas, result.stderr.digest, sys.stderr)
        written = await write_outputs(client.cas, result, cwd)
    for name, captured in (("stdout", result.stdout), ("stderr", result.stderr)):
        if captured.truncated:
            print(f"triode: the command's {name} was cut at the node's output cap", file=sys.stderr)
    if result.missing_outputs:
        print(f"triode: outputs not produced: {', '.join(result.missing_outputs)}", file=sys.stderr)
    if result.timed_out:
        print(f"triode: the command timed out after {args.timeout}s and was killed", file=sys.stderr)
    if args.result_json is not None:
        summary = _summary(outcome, written)
        args.result_json.write_text(json.dumps(summary, indent=2) + "\n")
    if result.timed_out:
        return TIMEOUT_EXIT
    return result.exit_code


async def _copy_blob(cas: Any, digest: Digest, stream: Any) -> None:
    if digest.size == 0:
        return
    out = stream.buffer
    async with cas.open_read(digest) as chunks:
        async for chunk in chunks:
            await trio.to_thread.run_sync(out.write, chunk)
    await trio.to_thread.run_sync(out.flush)


def _summary(outcome: ExecuteOutcome, written: list[str]) -> dict[str, Any]:
    """What ``--result-json`` writes (digests as ``HASH/SIZE``)."""
    result = outcome.result
    return {
        "action_digest": str(outcome.action_digest),
        "exit_code": result.exit_code,
        "signal": result.signal,
        "cached": outcome.cached,
        "timed_out": result.timed_out,
        "node": result.node,
        "timings": result.timings.to_wire(),
        "executed_at": result.executed_at,
        "stdout": {"digest": str(result.stdout.digest), "truncated": result.stdout.truncated},
        "stderr": {"digest": str(result.stderr.digest), "truncated": result.stderr.truncated},
        "outputs": {
            "files": [{"path": f.path, "digest": str(f.digest), "executable": f.executable}
                      for f in result.output_files],
            "symlinks": [s.to_wire() for s in result.output_symlinks],
            "directories": [d.path for d in result.output_directories],
            "missing": list(result.missing_outputs),
            "written": written,
        },
    }
