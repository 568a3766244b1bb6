"""The leak checker itself: each kind of leak, made on purpose, must be reported.

A checker that reports nothing passes every test it guards. So each test here leaks
one thing (a task, a system task, an fd, a socket, a child, a zombie, a pipe of an
action's process) and asserts that :func:`no_leaks` names it, then cleans up itself.
"""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from triode import procgroup
from triode.procgroup import open_process_group, proc_stats
from triode.testing import no_leaks

#: Short: nothing leaked here on purpose goes away by itself, so waiting longer proves nothing.
GRACE = 0.2


def _state(pid: int) -> str | None:
    """The process's state letter, read from /proc without the checker's help."""
    return next((p.state for p in proc_stats() if p.pid == pid), None)


async def _wait_for_state(pid: int, state: str) -> None:
    with trio.fail_after(30):
        while _state(pid) != state:  # noqa: ASYNC110 - polling /proc, no event to wait on
            await trio.sleep(0.01)


# -- what must pass ----------------------------------------------------------------------


async def test_a_clean_block_passes(tmp_path) -> None:
    async with no_leaks():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0.01)
            trio.lowlevel.spawn_system_task(trio.sleep, 0.01, name="short-lived system task")
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        with open(tmp_path / "f", "wb") as f:  # noqa: ASYNC230 - a local file, the point is its fd
            f.write(b"x")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
        async with open_process_group(["/bin/sh", "-c", "echo out; echo err >&2"], env={}) as proc:
            await proc.wait()
        await trio.run_process(["true"])


async def test_the_blocks_own_exception_comes_out_as_itself() -> None:
    error = KeyError("mine")
    with pytest.raises(KeyError) as info:
        async with no_leaks(grace=GRACE):
            raise error
    assert info.value is error  # not wrapped, not replaced
    assert not getattr(info.value, "__notes__", None)  # nothing leaked: nothing to say


async def test_a_cancelled_clean_block_is_just_cancelled() -> None:
    with trio.move_on_after(0.01) as scope:
        async with no_leaks(grace=GRACE):
            await trio.sleep_forever()
    assert scope.cancelled_caught


# -- what must be reported ---------------------------------------------------------------


async def test_a_task_left_running_is_reported() -> None:
    # A nursery's tasks cannot outlive it, but a task started in a nursery from outside
    # the block (passed in, as a node's or a connection's nursery is) can.
    async with trio.open_nursery() as outer:
        with pytest.raises(AssertionError, match=r"tasks still alive: .*left-running-on-purpose"):
            async with no_leaks(grace=GRACE):
                outer.start_soon(trio.sleep_forever, name="left-running-on-purpose")
                await trio.testing.wait_all_tasks_blocked()
        outer.cancel_scope.cancel()


async def test_a_system_task_left_running_is_reported() -> None:
    stop = trio.Event()
    try:
        with pytest.raises(AssertionError, match=r"tasks still alive: .*system-task-on-purpose"):
            async with no_leaks(grace=GRACE):
                trio.lowlevel.spawn_system_task(stop.wait, name="system-task-on-purpose")
    finally:
        stop.set()
    await trio.testing.wait_all_tasks_blocked()


async def test_an_fd_left_open_is_reported(tmp_path) -> None:
    path = str(await trio.Path(tmp_path).resolve() / "kept-open")
    fds: list[int] = []
    try:
        with pytest.raises(AssertionError, match="file descriptors still open") as info:
            async with no_leaks(grace=GRACE):
                fds.append(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
        assert f"{fds[0]} -> {path}" in str(info.value)
    finally:
        for fd in fds:
            os.close(fd)


async def test_a_socket_left_open_is_reported() -> None:
    socks: list[socket.socket] = []
    try:
        with pytest.raises(AssertionError, match="file descriptors still open") as info:
            async with no_leaks(grace=GRACE):
                socks.append(socket.socket())
                socks[0].bind(("127.0.0.1", 0))
        assert f"{socks[0].fileno()} -> socket:[" in str(info.value)
    finally:
        for s in socks:
            s.close()


async def test_a_child_process_left_running_is_reported() -> None:
    procs: list[trio.Process] = []
    try:
        with pytest.raises(AssertionError, match="child processes still there") as info:
            async with no_leaks(grace=GRACE):
                procs.append(await trio.lowlevel.open_process(["sleep", "60"]))
        assert f"{procs[0].pid} (" in str(info.value).split("child processes still there")[1]
    finally:
        for proc in procs:
            proc.kill()
            await proc.wait()


async def test_a_zombie_is_reported() -> None:
    """A child that exited and was never reaped is still a leak: its pid stays taken."""
    procs: list[trio.Process] = []
    try:
        with pytest.raises(AssertionError, match="child processes still there") as info:
            async with no_leaks(grace=GRACE):
                procs.append(await trio.lowlevel.open_process(["true"]))
                await _wait_for_state(procs[0].pid, "Z")  # exited; nobody calls wait()
        assert f"{procs[0].pid} (Z)" in str(info.value)
    finally:
        for proc in procs:
            await proc.wait()


async def test_a_pipe_of_an_actions_process_left_open_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if the process group forgot to close the pipes: the process object, still
    referenced, keeps them open, and the checker must see them."""

    async def forget_to_close(proc: trio.Process) -> None:
        await trio.lowlevel.checkpoint()

    monkeypatch.setattr(procgroup, "_close_pipes", forget_to_close)
    kept: list[trio.Process] = []
    try:
        with pytest.raises(AssertionError, match="file descriptors still open") as info:
            async with no_leaks(grace=GRACE):
                async with open_process_group(["/bin/sh", "-c", "echo out"], env={}) as proc:
                    kept.append(proc)
                    await proc.wait()
        for stream in (proc.stdout, proc.stderr):
            assert isinstance(stream, trio.lowlevel.FdStream)
            assert f"{stream.fileno()} -> pipe:[" in str(info.value)
    finally:
        for proc in kept:
            for stream in (proc.stdout, proc.stderr):
                if isinstance(stream, trio.lowlevel.FdStream):
                    stream.close()


async def test_a_block_that_raises_is_checked_and_its_exception_goes_on() -> None:
    fds: list[int] = []
    error = KeyError("mine")
    try:
        with pytest.raises(KeyError) as info:
            async with no_leaks(grace=GRACE):
                fds.extend(os.pipe())
                raise error
        assert info.value is error  # the block's own error, not the leak report
        notes = "\n".join(getattr(info.value, "__notes__", []))
        assert "file descriptors still open" in notes
        assert all(f"{fd} -> pipe:[" in notes for fd in fds), notes
    finally:
        for fd in fds:
            os.close(fd)


async def test_a_cancelled_block_is_checked_and_the_report_is_not_swallowed() -> None:
    """A note on the Cancelled would die with it in the scope that cancelled it."""
    fds: list[int] = []
    try:
        with pytest.raises(AssertionError, match=r"leaked: .*pipe:\[.*the block was cancelled") as info:
            with trio.move_on_after(0.01):
                async with no_leaks(grace=GRACE):
                    fds.extend(os.pipe())
                    await trio.sleep_forever()
        assert isinstance(info.value.__cause__, trio.Cancelled)
    finally:
        for fd in fds:
            os.close(fd)
