"""The process runner: every way a run can end, and nothing left behind after any of them."""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from triode.engine import runner
from triode.engine.runner import run_process
from triode.procgroup import PIPE, group_alive, open_process_group
from triode.testing import child_processes, no_leaks

from .conftest import eventually


def _procs_with(marker: str) -> list[int]:
    """Pids of live processes whose command line contains ``marker`` (anywhere on the box)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def _unique_sleep() -> str:
    """A sleep whose own command line is unique (a shell comment would not survive exec)."""
    return f"300.{os.getpid()}{time.monotonic_ns() % 10**9:09d}"


async def test_exit_code_and_both_streams() -> None:
    async with no_leaks():
        r = await run_process(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (r.exit_code, r.signal, r.timed_out, r.cancelled, r.truncated) == (3, None, False, False, False)
    assert r.stdout.data() == b"out\n"
    assert r.stderr.data() == b"err\n"


async def test_killed_by_signal_is_told_apart_from_exit() -> None:
    r = await run_process(["/bin/sh", "-c", "kill -USR1 $$"])
    assert r.signal == 10 and r.exit_code == 128 + 10 and not r.timed_out


async def test_environment_is_only_what_is_given() -> None:
    os.environ["TRIODE_TEST_SECRET"] = "hunter2"
    try:
        r = await run_process(["/usr/bin/env"])
        assert r.stdout.data() == b""
        r = await run_process(["/usr/bin/env"], env={"A": "1"})
        assert r.stdout.data() == b"A=1\n"
    finally:
        del os.environ["TRIODE_TEST_SECRET"]


async def test_tree_ignoring_sigterm_is_killed_after_timeout_and_grace() -> None:
    marker = _unique_sleep()  # in every sleeper's own command line
    script = (
        f"trap '' TERM; "
        f"for i in 1 2 3; do sh -c 'trap \"\" TERM; exec sleep {marker}' & done; "
        f"wait"
    )
    timeout, grace = 1.0, 0.5
    async with no_leaks():
        start = time.monotonic()
        r = await run_process(["/bin/sh", "-c", script], timeout=timeout, grace=grace)
        took = time.monotonic() - start
    # Killed (SIGKILL, after the grace) rather than waited for: the sleepers ignore SIGTERM
    # and would sleep 300 s. The bounds say so without racing the machine's load: at least
    # the timeout and the whole grace went by, and far less than the sleep.
    assert r.timed_out and r.signal == 9 and not r.cancelled
    assert timeout + grace <= took < 60, took
    assert _procs_with(marker) == []


async def test_output_written_on_sigterm_is_read_through_the_grace_period() -> None:
    # More than a pipe holds, written after the timeout's SIGTERM: unread, the child would
    # block until SIGKILL at the end of the grace period and its exit would be lost.
    script = "trap 'head -c 1048576 /dev/zero; exit 7' TERM; while :; do sleep 0.05; done"
    async with no_leaks():
        start = time.monotonic()
        r = await run_process(["/bin/sh", "-c", script], timeout=0.5, grace=20)
        took = time.monotonic() - start
    assert r.timed_out and r.exit_code == 7 and r.signal is None
    assert r.stdout.total == 1048576
    assert took < 10


@pytest.mark.parametrize("stdin", [None, b"some input"])
async def test_grandchild_that_escapes_the_group_with_our_pipes_does_not_hang(stdin: bytes | None) -> None:
    marker = _unique_sleep()
    # setsid takes the sleeper out of the group; it still holds stdout and stderr. With
    # stdin given, our end of the stdin pipe is already closed when the holders are sought.
    script = f"setsid sleep {marker} & sleep 0.3; echo done"
    async with no_leaks():
        with trio.fail_after(10):
            r = await run_process(["/bin/sh", "-c", script], grace=0.2, drain=0.5, stdin=stdin)
    assert r.exit_code == 0 and r.stdout.data() == b"done\n"
    assert await eventually(lambda: not _procs_with(marker), 2)


async def test_escaped_grandchild_holding_unread_stdin_does_not_hang() -> None:
    marker = _unique_sleep()
    # The sleeper leaves the group with our stdin (never reading it) and not our output
    # pipes, so they reach EOF; stdin is larger than a pipe holds, so feeding it blocks.
    # (fd 3 carries stdin past the shell, which gives a background job /dev/null instead)
    script = f"exec 3<&0; setsid sleep {marker} <&3 3<&- >/dev/null 2>&1 & exec 3<&-; echo done"
    try:
        async with no_leaks():
            with trio.fail_after(10):
                r = await run_process(["/bin/sh", "-c", script], grace=0.2, drain=0.5,
                                      stdin=b"x" * (4 * 1024 * 1024))
        assert r.exit_code == 0 and r.stdout.data() == b"done\n"
        assert await eventually(lambda: not _procs_with(marker), 2)  # killed: it held our pipe
    finally:
        for pid in _procs_with(marker):
            os.kill(pid, 9)


@pytest.mark.parametrize("limit", [None, 0.3])
async def test_runs_without_pidfds(monkeypatch: pytest.MonkeyPatch, limit: float | None) -> None:
    # Where pidfd_open fails (an old kernel, a seccomp filter), the exit is waited for
    # the way trio does it, while one task still reads both pipes.
    def refuse(pid: int, flags: int = 0) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open is not available")

    monkeypatch.setattr(os, "pidfd_open", refuse)
    script = "echo out; echo err >&2; head -c 200000 /dev/zero; sleep 0.5; exit 3"
    async with no_leaks():
        r = await run_process(["/bin/sh", "-c", script], timeout=limit, grace=0.2)
    assert r.stdout.total == 4 + 200000 and r.stderr.data() == b"err\n"
    if limit is None:
        assert (r.exit_code, r.timed_out) == (3, False)
    else:
        assert r.timed_out and r.signal is not None


async def test_background_child_of_a_finished_leader_is_stopped() -> None:
    marker = _unique_sleep()
    async with no_leaks():
        r = await run_process(["/bin/sh", "-c", f"sleep {marker} & echo hi"], grace=0.2)
    assert r.exit_code == 0 and r.stdout.data() == b"hi\n"
    assert _procs_with(marker) == []


async def test_output_flood_is_capped_and_killed_without_deadlock() -> None:
    async with no_leaks():
        with trio.fail_after(30):
            r = await run_process(["yes"], output_cap=256 * 1024, kill_on_cap=True, grace=0.5)
    assert r.output_capped and r.truncated and r.stdout.truncated and not r.stderr.truncated
    assert r.stdout.kept == 256 * 1024
    assert r.stdout.total > 256 * 1024
    assert r.stdout.data() == b"y\n" * (128 * 1024)
    assert r.signal is not None


async def test_output_flood_over_the_cap_is_drained_to_the_end_when_not_killing() -> None:
    # 8 MiB to each stream at once: both must be read concurrently or the child blocks.
    script = "head -c 8388608 /dev/zero; head -c 8388608 /dev/zero >&2; echo tail"
    with trio.fail_after(30):
        r = await run_process(["/bin/sh", "-c", script], output_cap=1024 * 1024)
    assert r.exit_code == 0 and not r.output_capped
    assert r.stdout.truncated and r.stdout.kept == 1024 * 1024
    assert r.stdout.total == 8 * 1024 * 1024 + 5
    assert r.stderr.total == 8 * 1024 * 1024


async def test_non_utf8_output_is_kept_byte_for_byte() -> None:
    data = bytes(range(256)) * 3
    r = await run_process([sys.executable, "-c", f"import sys; sys.stdout.buffer.write({data!r})"])
    assert r.stdout.data() == data


async def test_large_stdin_while_output_flows_back(tmp_path: Path) -> None:
    data = os.urandom(16 * 1024 * 1024)
    with trio.fail_after(60):
        r = await run_process(["cat"], stdin=data, spill_dir=tmp_path)
    assert r.exit_code == 0 and r.stdout.spilled
    assert r.stdout.spill_path is not None
    assert r.stdout.spill_path.read_bytes() == data
    # From a file too, and a child that reads none of it is not an error.
    src = tmp_path / "in"
    src.write_bytes(data[: 4 * 1024 * 1024])
    r = await run_process(["wc", "-c"], stdin=src)
    assert r.stdout.data().strip() == b"4194304"
    r = await run_process(["true"], stdin=data)
    assert r.exit_code == 0


async def test_caller_cancellation_stops_and_reaps_the_group() -> None:
    pgids = []

    async with no_leaks():
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run_forever)
                with trio.fail_after(30):
                    while not (children := child_processes()):  # noqa: ASYNC110 - /proc has no event
                        await trio.sleep(0.01)
                pgids.extend(children)
                scope.cancel()
        assert scope.cancelled_caught
    assert pgids and not any(group_alive(p) for p in pgids)


async def _run_forever() -> None:
    await run_process(["/bin/sh", "-c", "trap '' TERM; sleep 300"], grace=0.2)
    raise AssertionError("the run should have been cancelled")


async def test_stop_event_ends_the_run_as_cancelled() -> None:
    stop = trio.Event()
    async with no_leaks(), trio.open_nursery() as nursery:
        nursery.start_soon(_set_later, stop)
        r = await run_process(["sleep", "300"], stop=stop, grace=0.5)
    assert r.cancelled and not r.timed_out and r.signal == 15


async def _set_later(event: trio.Event) -> None:
    await trio.sleep(0.1)
    event.set()


async def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        await run_process(["true"], timeout=0)
    with pytest.raises(ValueError):
        await run_process([])
    r = await run_process(["/nonexistent/program"])
    assert r.exit_code == 127 and b"/nonexistent/program" in r.stderr.data()
    r = await run_process(["/etc/hostname"])  # not executable
    assert r.exit_code == 126


# -- closed by the code, not by the garbage collector -----------------------------------
#
# A process object or a watch set that nobody references any more has its fds closed by
# the garbage collector as it goes, so a check after the run would pass even if the code
# forgot to close them. These tests keep every such object referenced through the leak
# check: what is not closed explicitly is then still open, and reported.


async def test_the_process_group_closes_the_pipes_itself() -> None:
    async with no_leaks():
        script = "read line; echo $line; echo err >&2"  # stdin is read, never closed by us
        async with open_process_group(["/bin/sh", "-c", script], env={}, stdin=PIPE) as proc:
            assert proc.stdin is not None
            await proc.stdin.send_all(b"in\n")
            with trio.fail_after(30):
                await proc.wait()
        # ``proc`` (and through it each pipe) is still referenced while no_leaks looks.
    assert proc.returncode == 0


@pytest.mark.parametrize("end", ["exit", "timeout", "cancelled caller"])
async def test_a_run_closes_its_pipes_and_its_watch_set_itself(
    monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    procs: list[trio.Process] = []
    watches: list[runner._ChildWatch] = []
    real_open = runner.open_process_group
    started = trio.Event()

    @asynccontextmanager
    async def keep_process(*args: Any, **kwargs: Any) -> AsyncIterator[trio.Process]:
        async with real_open(*args, **kwargs) as proc:
            procs.append(proc)
            started.set()
            yield proc

    class KeptWatch(runner._ChildWatch):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            watches.append(self)

    monkeypatch.setattr(runner, "open_process_group", keep_process)
    monkeypatch.setattr(runner, "_ChildWatch", KeptWatch)
    argv = ["/bin/sh", "-c", "cat; echo err >&2" if end == "exit" else "exec sleep 300"]
    async with no_leaks():
        if end == "cancelled caller":
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(partial(run_process, argv, stdin=b"in", grace=0.2))
                    await started.wait()
                    scope.cancel()
        else:
            r = await run_process(argv, stdin=b"in", grace=0.2, timeout=0.2 if end == "timeout" else None)
            assert r.timed_out == (end == "timeout")
    # Both objects were alive (kept above) through the check: what closed their fds was the run.
    assert len(procs) == 1 and len(watches) == 1
