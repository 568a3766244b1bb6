"""Processes in their own process group, always stopped, reaped and closed.

This is the one place Triode starts a child process. :func:`open_process_group`
starts it in a new session (so it leads a process group that holds its whole tree)
and, however the block is left (normal exit, error, timeout, cancellation), stops
the group: SIGTERM, a grace period, SIGKILL, then the leader is reaped and every
pipe closed, shielded from cancellation so it cannot be skipped. The Go systems this
replaces returned early on cancellation and left readers, pipes and processes behind;
here the cleanup is not a code path someone can forget, it is the end of the block.

A child may be *wrapped*: started through a sandbox (bubblewrap with a PID namespace,
see :mod:`triode.engine.sandbox`) that runs the real command as its grandchild and
exits with its status. Such a wrapper dies at once on SIGTERM and takes its whole
namespace with it (SIGKILL), which would rob the command of its grace period. So for a
wrapped group the SIGTERM goes to every member but the wrapper's own two processes (the
leader and its child, the namespace's init); the SIGKILL after the grace goes to all.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import trio

__all__ = [
    "open_process_group", "stop_group", "kill_group", "group_alive", "proc_stats", "ProcStat", "KILL_WAIT",
    "Wrapped", "kill_groups_working_in",
]

#: How long we wait for a SIGKILLed group to disappear before giving up on it. A
#: process in uninterruptible sleep (D state) can outlive SIGKILL for a while; we
#: do not hang on it forever.
KILL_WAIT = 10.0

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL


class Wrapped:
    """Marks a group whose leader is a sandbox around the command (see the module docstring)."""

    def __init__(self) -> None:
        #: Set by whoever saw the sandbox's PID namespace empty once the leader exited: then
        #: nothing of the group is left, and stopping it need not look through ``/proc``.
        self.emptied = False


class ProcStat(NamedTuple):
    pid: int
    state: str  # R, S, D, Z (zombie), X (dead) ...
    ppid: int
    pgrp: int


def proc_stats() -> Iterator[ProcStat]:
    """Every process on the machine, read from /proc (skipping ones that vanish meanwhile)."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2:
            yield ProcStat(int(entry.name), fields[0].decode(), int(fields[1]), int(fields[2]))


def _members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a group."""
    return [p.pid for p in proc_stats() if p.pgrp == pgid and p.state not in ("Z", "X")]


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a reused pgid owned by someone else
        return False
    return bool(_members(pgid))


def kill_group(pgid: int, sig: int) -> None:
    """Signal every process of the group; one that is already gone is not an error."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_wrapped(pgid: int, sig: int) -> None:
    """Signal the group's members but its leader and the leader's children: the sandbox
    that wraps the command (its outer process and the init of its PID namespace)."""
    for p in proc_stats():
        if p.pgrp == pgid and p.pid != pgid and p.ppid != pgid and p.state not in ("Z", "X"):
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def kill_groups_working_in(root: str | os.PathLike[str]) -> list[int]:
    """SIGKILL the process group of every process whose working directory is in ``root``;
    the groups killed.

    For what a node that was itself killed left running in its work dirs: its children
    start sessions of their own, so nothing signals them when it dies, and a sandbox's
    wrapper (whose working directory is its action's) takes the sandbox's PID namespace
    with it. Our own group is never signalled."""
    top = os.path.realpath(root)
    inside = top.rstrip("/") + "/"
    ours = os.getpgrp()
    killed: list[int] = []
    for p in proc_stats():
        if p.state in ("Z", "X") or p.pgrp in killed or p.pgrp == ours or p.pgrp <= 1:
            continue
        try:
            cwd = os.readlink(f"/proc/{p.pid}/cwd")
        except OSError:  # gone, or not ours to look at
            continue
        if cwd.endswith(" (deleted)"):
            cwd = cwd[: -len(" (deleted)")]
        if cwd == top or cwd.startswith(inside):
            kill_group(p.pgrp, signal.SIGKILL)
            killed.append(p.pgrp)
    return killed


async def _wait_group_gone(pgid: int) -> None:
    delay = 0.001
    while group_alive(pgid):
        await trio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def stop_group(proc: trio.Process, grace: float, *, wrapped: Wrapped | None = None) -> None:
    """SIGTERM the group, wait up to ``grace`` seconds, SIGKILL what is left, reap the leader.

    ``wrapped``: the leader is a sandbox around the command; the SIGTERM spares it (see the
    module docstring). Call it shielded: it must finish even when the caller is being cancelled.
    """
    pgid = proc.pid
    emptied = wrapped is not None and wrapped.emptied and proc.returncode is not None
    if wrapped is not None and proc.returncode is not None and not emptied:
        # The wrapper exited, so its command has: what is left is the init of its namespace
        # and the command's daemons, which end with the command (sandbox.py says why).
        kill_group(pgid, signal.SIGKILL)
    if not emptied and group_alive(pgid):
        if grace > 0:
            if wrapped is not None:
                _signal_wrapped(pgid, signal.SIGTERM)
            else:
                kill_group(pgid, signal.SIGTERM)
            with trio.move_on_after(grace):
                await _wait_group_gone(pgid)
        if group_alive(pgid):
            kill_group(pgid, signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT):
                await _wait_group_gone(pgid)
    if proc.returncode is None:
        # The leader left its group (setsid) or ignored the group signal: kill it by pid.
        try:
            proc.kill()
        except ProcessLookupError:  # pragma: no cover - exited between the check and the kill
            pass
        await proc.wait()


async def _close_pipes(proc: trio.Process) -> None:
    """Close every pipe, then yield once (not once per pipe, as ``aclose`` would)."""
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if isinstance(stream, trio.lowlevel.FdStream):
            stream.close()
        elif stream is not None:  # pragma: no cover - trio gives pipes as FdStreams on Unix
            await stream.aclose()
    await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_process_group(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
    stdin: int | None = DEVNULL,
    stdout: int | None = PIPE,
    stderr: int | None = PIPE,
    grace: float = 5.0,
    wrapped: Wrapped | None = None,
    **options: Any,
) -> AsyncIterator[trio.Process]:
    """Start ``argv`` as the leader of a new session and yield its :class:`trio.Process`.

    ``env`` is the whole environment of the child: nothing of ours leaks into it.
    Leaving the block stops the group (see :func:`stop_group`) and closes the pipes.
    ``wrapped``: ``argv`` starts with a sandbox that runs the command (see the module docstring).
    """
    if not argv:
        raise ValueError("argv must name a program")
    if math.isnan(grace) or grace < 0:
        raise ValueError("grace must be a non-negative number of seconds")
    proc = await trio.lowlevel.open_process(
        list(argv),
        env=dict(env),
        cwd=cwd,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        start_new_session=True,
        close_fds=True,
        **options,
    )
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            try:
                await stop_group(proc, grace, wrapped=wrapped)
            finally:
                await _close_pipes(proc)
