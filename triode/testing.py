"""Test helpers that check the structured-concurrency guarantee: nothing outlives its block.

Use :func:`no_leaks` around anything that starts tasks, opens files or sockets, or
spawns processes. On the way out, however the block ends (an exception included), it
asserts that every task, file descriptor and child process that appeared inside the
block is gone. Resources are given a short grace period to go, since the kernel closes
some things (zombies being reaped by a watcher, sockets in TIME_WAIT are not fds) a
moment after the code that ended them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from .concurrency import only_cancelled
from .procgroup import proc_stats

__all__ = ["Snapshot", "snapshot", "no_leaks", "child_processes", "open_fds", "live_tasks", "procs_with"]


def live_tasks() -> set[trio.lowlevel.Task]:
    """Every task in this trio run, from the root down."""
    found: set[trio.lowlevel.Task] = set()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None or task in found:
            continue
        found.add(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return found


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what they point at."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:  # the fd listdir itself used, closed by now
            continue
    return fds


def child_processes() -> dict[int, str]:
    """Descendants of this process (children, grandchildren, zombies too) with their state."""
    stats = list(proc_stats())
    out: dict[int, str] = {}
    frontier = [os.getpid()]
    while frontier:
        parent = frontier.pop()
        for p in stats:
            if p.ppid == parent and p.pid not in out:
                out[p.pid] = p.state
                frontier.append(p.pid)
    return out


def procs_with(text: str) -> list[int]:
    """Live processes (zombies aside) whose command line has ``text``, wherever they are:
    for what left our tree (a daemon reparented to init) and :func:`child_processes` misses."""
    found = []
    for p in proc_stats():
        if p.state in ("Z", "X"):
            continue
        try:
            with open(f"/proc/{p.pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(p.pid)
        except OSError:
            continue
    return found


@dataclass
class Snapshot:
    tasks: set[trio.lowlevel.Task]
    fds: dict[int, str]
    children: dict[int, str]

    def leaks_since(self, before: Snapshot) -> list[str]:
        problems = []
        new_tasks = self.tasks - before.tasks
        if new_tasks:
            problems.append("tasks still alive: " + ", ".join(sorted(t.name for t in new_tasks)))
        new_fds = {fd: target for fd, target in self.fds.items() if before.fds.get(fd) != target}
        if new_fds:
            problems.append("file descriptors still open: " + ", ".join(
                f"{fd} -> {target}" for fd, target in sorted(new_fds.items())))
        new_children = {pid: st for pid, st in self.children.items() if pid not in before.children}
        if new_children:
            problems.append("child processes still there: " + ", ".join(
                f"{pid} ({st})" for pid, st in sorted(new_children.items())))
        return problems


def snapshot() -> Snapshot:
    """Tasks (needs a running trio), fds and child processes right now."""
    return Snapshot(live_tasks(), open_fds(), child_processes())


async def _leaks_after(before: Snapshot, grace: float) -> list[str]:
    """What is still there of what appeared since ``before``, after up to ``grace`` seconds.

    Shielded: a block left by cancellation is checked all the same (the wait is bounded).
    """
    with trio.CancelScope(shield=True):
        with trio.move_on_after(grace):
            while snapshot().leaks_since(before):  # noqa: ASYNC110 - the kernel has no event for "fd closed"
                await trio.sleep(0.02)
    return snapshot().leaks_since(before)


@asynccontextmanager
async def no_leaks(grace: float = 2.0) -> AsyncIterator[None]:
    """Assert that whatever the block started is gone when it ends, however it ends.

    Only things that appeared inside the block count; the calling task and anything
    that existed before are ignored. Waits up to ``grace`` seconds for the kernel to
    catch up before failing with a list of what leaked.

    The check also runs when the block raises. The block's own exception then goes on
    as itself, with the leak report attached as a note (``__notes__``), so the error that
    explains the failure is not hidden by its consequence. The one exception is a block
    left by cancellation alone: a ``Cancelled`` is absorbed by the scope that cancelled
    it, and a note on it would never be seen, so the leak report is raised instead (an
    ``AssertionError`` whose ``__cause__`` is the ``Cancelled``).
    """
    before = snapshot()
    try:
        yield
    except GeneratorExit:
        raise  # the generator is being closed, not a block ending: nothing to check against
    except BaseException as exc:
        problems = await _leaks_after(before, grace)
        if problems:
            report = "leaked: " + "; ".join(problems)
            if only_cancelled(exc):
                raise AssertionError(report + " (the block was cancelled)") from exc
            exc.add_note(f"triode.testing.no_leaks: {report}")
        raise
    problems = await _leaks_after(before, grace)
    if problems:
        raise AssertionError("leaked: " + "; ".join(problems))
