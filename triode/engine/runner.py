"""Run one command to completion, whatever happens: the process runner under actions.

:func:`run_process` starts argv in its own process group (through
:func:`~triode.procgroup.open_process_group`), reads stdout and stderr
concurrently from the first moment (so a large stdin or a chatty child can never
deadlock on a full pipe; one task watches both pipes and the exit, see
:class:`_ChildWatch`), keeps the head of each up to a cap, and ends in exactly one
way: the leader exited, it was killed by a signal, the timeout passed, the output
cap was hit (when that kills), or it was stopped on request. In every case the whole
group is stopped (SIGTERM, grace, SIGKILL), the leader reaped and both pipes closed
before this returns; a cancelled caller gets the same cleanup, shielded, before
``Cancelled`` goes on up. This is trio's ``run_process(deliver_cancel=...)`` idea
with a group-wide deliver-cancel, plus the part trio leaves to us: a grandchild that
escaped the group while holding our pipes would otherwise keep us waiting for an EOF
that never comes, so after the group is gone the pipes get a short drain period,
then whoever still holds them is killed, and past the drain they are closed unread.

With a ``wrapper`` (a sandbox with a PID namespace, see :mod:`triode.engine.sandbox`)
the command runs inside it; the run ends the same ways, with the stop adapted to the
wrapper (see :mod:`triode.procgroup`). The wrapper exits as soon as the command does,
while its namespace is still being torn down, so the run also waits for the namespace's
init, whose pid the wrapper reports on a pipe of ours, to exit: by then nothing the
command started is left. A command that cannot be run is found before the wrapper starts,
so it still ends with 127 or 126 and triode's own message.
"""

from __future__ import annotations

import errno
import json
import math
import os
import select
import signal
import stat
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack, nullcontext, suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from ..procgroup import DEVNULL, PIPE, Wrapped, group_alive, open_process_group, stop_group

__all__ = ["DEFAULT_OUTPUT_CAP", "DEFAULT_GRACE", "Capture", "ProcessResult", "run_process"]

#: Bytes of stdout (and, separately, of stderr) kept per run unless told otherwise.
DEFAULT_OUTPUT_CAP = 64 * 1024 * 1024
#: Seconds between SIGTERM and SIGKILL.
DEFAULT_GRACE = 5.0
#: Seconds the pipes are read after the group is gone, waiting for EOF.
DEFAULT_DRAIN = 1.0

_READ_SIZE = 64 * 1024
#: The most a wrapper may write about itself on its info pipe.
_INFO_LIMIT = 64 * 1024
_STDIN_CHUNK = 64 * 1024


class Capture:
    """The kept head of one output stream: in memory, spilled to a file past ``memory_limit``.

    Counts every byte the process wrote (``total``) but keeps at most ``cap``; the pipe
    is read to the end regardless, so a process over the cap is never blocked on it.
    """

    def __init__(self, cap: int, *, spill_path: Path | None = None, memory_limit: int = 1024 * 1024) -> None:
        if cap < 0:
            raise ValueError("output cap must be >= 0")
        self.cap = cap
        self.total = 0
        self.spill_path = spill_path
        self._memory_limit = memory_limit if spill_path is not None else cap
        self._buffer = bytearray()
        self._spill_fd: int | None = None
        self._spilled = False
        self._kept = 0

    @property
    def kept(self) -> int:
        return self._kept

    @property
    def truncated(self) -> bool:
        return self.total > self.cap

    @property
    def spilled(self) -> bool:
        """Whether the kept bytes are in :attr:`spill_path` rather than in memory."""
        return self._spilled

    def data(self) -> bytes:
        """The kept bytes, when they were small enough to stay in memory."""
        if self.spilled:
            raise RuntimeError(f"output was spilled to {self.spill_path}; read it from there")
        return bytes(self._buffer)

    async def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.cap - self._kept
        if room <= 0:
            return
        chunk = chunk[:room]
        if self._spill_fd is None and len(self._buffer) + len(chunk) <= self._memory_limit:
            self._buffer += chunk
        else:
            await self._spill(chunk)
        self._kept += len(chunk)

    async def _spill(self, chunk: bytes) -> None:
        assert self.spill_path is not None
        if self._spill_fd is None:
            self._spilled = True
            self.spill_path.parent.mkdir(exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            self._spill_fd = os.open(self.spill_path, flags, 0o600)
            pending = bytes(self._buffer) + chunk
            self._buffer = bytearray()
        else:
            pending = chunk
        fd = self._spill_fd
        await trio.to_thread.run_sync(_write_all, fd, pending)

    def close(self) -> None:
        """Close the spill file (the file itself stays for the caller to store)."""
        if self._spill_fd is not None:
            fd, self._spill_fd = self._spill_fd, None
            os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass(frozen=True)
class ProcessResult:
    """How a run ended. Exactly one of: exited, signalled, timed out, capped, cancelled."""

    #: The exit status; ``128 + signal`` when a signal ended it, as a shell reports it.
    exit_code: int
    #: The signal that ended the leader, or None when it exited by itself.
    signal: int | None
    #: The timeout passed and we stopped the group.
    timed_out: bool
    #: The output cap was passed and ``kill_on_cap`` stopped the group.
    output_capped: bool
    #: ``stop`` was set and we stopped the group.
    cancelled: bool
    stdout: Capture
    stderr: Capture
    #: Seconds from start to the leader's end (before the group was stopped).
    duration: float

    @property
    def truncated(self) -> bool:
        return self.stdout.truncated or self.stderr.truncated


async def run_process(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    stdin: bytes | Path | None = None,
    timeout: float | None = None,  # noqa: ASYNC109 - ends in a result (timed_out), not an exception
    grace: float = DEFAULT_GRACE,
    output_cap: int = DEFAULT_OUTPUT_CAP,
    kill_on_cap: bool = False,
    spill_dir: Path | None = None,
    stop: trio.Event | None = None,
    drain: float = DEFAULT_DRAIN,
    wrapper: Callable[[int], Sequence[str]] | None = None,
) -> ProcessResult:
    """Run ``argv`` to its end and return how it ended; never leaves a process or pipe behind.

    ``env`` is the child's whole environment; None means an empty one (never ours: the
    node's environment holds its secrets). ``stdin`` is bytes or a file streamed in.
    ``spill_dir`` lets captured output past 1 MiB go to files there instead of memory
    (created when first needed).
    Setting ``stop`` ends the run with ``cancelled=True``; cancelling the caller ends it
    the same way and then raises ``Cancelled``. ``wrapper`` runs argv inside a sandbox:
    called with the number of a pipe's fd it returns the argv prefix (bubblewrap's, with
    ``--info-fd`` that fd, where it writes ``{"child-pid": N}``: its namespace's init).
    The wrapper exits with the command's status (``128 + N`` when signal N ended it, read
    back as that signal).
    """
    if timeout is not None and (math.isnan(timeout) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    out = Capture(output_cap, spill_path=spill_dir / "stdout" if spill_dir else None)
    err = Capture(output_cap, spill_path=spill_dir / "stderr" if spill_dir else None)
    ended = {"cap": False, "stop": False}
    env = dict(env or {})
    info: int | None = None  # the read end of the wrapper's info pipe
    wrapped = Wrapped() if wrapper is not None else None
    try:
        async with AsyncExitStack() as stack:
            try:
                prefix: Sequence[str] = ()
                info_write: int | None = None
                if wrapper is not None:
                    # The wrapper would report a missing program as its own failure (exit 1):
                    # look for it first, as the kernel will, to end as an unwrapped run does.
                    _check_runnable(argv[0], env, cwd)
                    info, info_write = os.pipe()
                    prefix = wrapper(info_write)
                try:
                    proc = await stack.enter_async_context(open_process_group(
                        [*prefix, *argv], env=env, cwd=cwd, stdin=PIPE if stdin is not None else DEVNULL,
                        stdout=PIPE, stderr=PIPE, grace=grace, wrapped=wrapped,
                        pass_fds=() if info_write is None else (info_write,),
                    ))
                finally:
                    if info_write is not None:
                        os.close(info_write)  # the child has its own
            except OSError as exc:
                # As a shell reports it: 127 when there is no such program, 126 when it
                # cannot be executed; the reason goes to stderr.
                await err.feed(f"triode: cannot run {argv[0]!r}: {exc.strerror or exc}\n".encode())
                code = 127 if exc.errno == errno.ENOENT else 126
                return ProcessResult(code, None, False, False, False, out, err, 0.0)
            start = trio.current_time()
            waiting = trio.CancelScope(deadline=start + timeout if timeout is not None else math.inf)

            def cap_hit() -> None:
                if kill_on_cap and not ended["cap"]:
                    ended["cap"] = True
                    waiting.cancel()

            # Noted now: by the time it is needed, stdin may be closed (fileno() is -1).
            stdin_inode = os.fstat(_fileno(proc.stdin)).st_ino if proc.stdin is not None else None
            assert proc.stdout is not None and proc.stderr is not None
            with _ChildWatch(proc, out, err, info) as watch:
                async with trio.open_nursery() if stdin is not None else nullcontext() as feeder:
                    if feeder is not None:
                        assert proc.stdin is not None and stdin is not None
                        feeder.start_soon(_feed_stdin, proc.stdin, stdin)
                    try:
                        if stop is None:
                            with waiting:
                                await watch.until_exit(cap_hit)
                        else:
                            async with trio.open_nursery() as control:
                                control.start_soon(_watch_stop, stop, waiting, ended)
                                with waiting:
                                    await watch.until_exit(cap_hit)
                                control.cancel_scope.cancel()
                        duration = trio.current_time() - start
                    finally:
                        # However the wait ended (the caller's cancellation too): stop what is
                        # left of the group now, reading the pipes meanwhile, then let them
                        # reach EOF, killing any writer that left the group and keeps them open.
                        with trio.CancelScope(shield=True):
                            await _stop_group_reading(proc, grace, watch, wrapped)
                            if not watch.at_eof:
                                await _drain(watch, drain, stdin_inode)
                        if feeder is not None:
                            if feeder.child_tasks and stdin_inode is not None:
                                # Still writing with the group gone: the reader left the group.
                                _kill_holders({stdin_inode})
                            feeder.cancel_scope.cancel()  # the run is over: unread stdin no longer matters
                    timed_out = waiting.cancelled_caught and not ended["cap"] and not ended["stop"]
    finally:
        out.close()
        err.close()
        if info is not None:
            os.close(info)
    returncode = proc.returncode
    assert returncode is not None
    sig = -returncode if returncode < 0 else None
    if wrapper is not None and 128 < returncode < 128 + signal.NSIG:
        sig = returncode - 128  # the sandbox reports a signalled command as a shell does
    return ProcessResult(
        exit_code=128 + sig if sig is not None else returncode,
        signal=sig,
        timed_out=timed_out,
        output_capped=ended["cap"],
        cancelled=ended["stop"],
        stdout=out,
        stderr=err,
        duration=duration,
    )


class _ChildWatch:
    """The leader's exit and both output pipes, watched through one epoll set of our own.

    One task waits on the set's fd (trio waits on an epoll fd as on any other) and
    reads whichever pipe is ready, instead of a reader task per pipe plus a task
    waiting for the exit: a short command then costs the event loop one wake-up
    where it cost several (docs/design.md has the figures). The set is level-triggered,
    so whatever one pass leaves unread wakes the next. The exit is seen through a
    pidfd of our own; reaping still goes through ``proc.returncode``. Linux only, as
    the rest of the runner (``/proc``) already is.

    With ``info`` (a wrapper's info pipe, see :func:`run_process`) the set also reads
    the pid of the wrapper's init and watches that process through a pidfd too: the
    run is over once it has exited, which it does only when its namespace is empty
    (:attr:`sandbox_gone`; a look at ``/proc`` for the group is then not needed).
    """

    def __init__(self, proc: trio.Process, out: Capture, err: Capture, info: int | None = None) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self._proc = proc
        self._epoll = select.epoll()
        self._pidfd: int | None = None
        self._reaped = False
        #: Pipe fd -> where its bytes go, for each pipe not yet at EOF.
        self._pipes = {_fileno(proc.stdout): out, _fileno(proc.stderr): err}
        #: The wrapper's info pipe until its EOF, what it said, and a pidfd of its init.
        self._info = info
        self._said = bytearray()
        self._init: int | None = None
        #: Whether the wrapper's init has exited (so its PID namespace is empty).
        self.sandbox_gone = False
        try:
            for fd in self._pipes:
                self._epoll.register(fd, select.EPOLLIN)
            if info is not None:
                self._epoll.register(info, select.EPOLLIN)
            try:
                self._pidfd = os.pidfd_open(proc.pid)
            except OSError:  # an old kernel, a seccomp filter, out of fds: see until_exit
                pass
            else:
                self._epoll.register(self._pidfd, select.EPOLLIN)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> _ChildWatch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def at_eof(self) -> bool:
        return not self._pipes

    @property
    def pipe_fds(self) -> list[int]:
        return list(self._pipes)

    async def until_exit(self, on_cap: Callable[[], None]) -> None:
        """Capture output until the leader has exited and been reaped (and a wrapper's
        init has exited, when it said which process that is)."""
        if self._pidfd is None:
            # No pidfd of our own: trio's wait (which has fallbacks of its own) beside a reader.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.until_eof, on_cap)
                await self._proc.wait()
                nursery.cancel_scope.cancel()
            self._reaped = True
        while not self._reaped or self._info is not None or self._init is not None:
            await self._step(on_cap)

    async def until_eof(self, on_cap: Callable[[], None] | None = None) -> None:
        """Capture output until both pipes are at EOF."""
        while self._pipes:
            await self._step(on_cap)

    async def _step(self, on_cap: Callable[[], None] | None) -> None:
        await trio.lowlevel.wait_readable(self._epoll.fileno())
        for fd, _ in self._epoll.poll(0):
            if fd == self._pidfd:
                if self._proc.returncode is not None:  # reaped now
                    self._reaped = True
                    self._forget(fd)
                    self._pidfd = None
                    self._end_sandbox()
                continue
            if fd == self._info:
                self._read_info(fd)
                continue
            if fd == self._init:
                self._forget(fd)
                self._init = None
                self.sandbox_gone = True
                continue
            capture = self._pipes.get(fd)
            if capture is None:
                continue
            try:
                chunk = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            if not chunk:
                del self._pipes[fd]
                self._epoll.unregister(fd)
                continue
            await capture.feed(chunk)
            if capture.truncated and on_cap is not None:
                on_cap()

    def _read_info(self, fd: int) -> None:
        chunk = os.read(fd, _READ_SIZE)
        if chunk:
            if len(self._said) < _INFO_LIMIT:
                self._said += chunk
            return
        self._epoll.unregister(fd)  # at EOF; the fd itself is run_process's to close
        self._info = None
        try:
            pid = json.loads(self._said)["child-pid"]
        except (ValueError, KeyError, TypeError):
            return  # it said nothing we can use (it failed early): the group is looked at instead
        if type(pid) is not int or pid <= 0:
            return
        try:
            init = os.pidfd_open(pid)
        except ProcessLookupError:  # exited and reaped already: its namespace is gone
            self.sandbox_gone = True
            return
        except OSError:
            return
        if _pgrp_of(pid) not in (self._proc.pid, None):  # its pid was taken since: it is long gone
            os.close(init)
            self.sandbox_gone = True
            return
        self._init = init
        self._epoll.register(init, select.EPOLLIN)
        if self._reaped:
            self._end_sandbox()

    def _end_sandbox(self) -> None:
        """The wrapper exited, so its command has: SIGKILL the namespace's init, which
        would otherwise wait for every daemon the command left, and the kernel empties the
        namespace. (bwrap's ``--die-with-parent`` did this, at a price: see sandbox.py.)"""
        if self._init is not None:
            with suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._init, signal.SIGKILL)

    def _forget(self, pidfd: int) -> None:
        # Unregister before closing: closing alone left the set reporting the old fd
        # (on Linux 6.18 a pidfd's file can outlive our fd, and epoll follows the file).
        self._epoll.unregister(pidfd)
        os.close(pidfd)

    def close(self) -> None:
        """Close the set and the pidfds; the pipes themselves are the process group's (and
        the info pipe run_process's) to close."""
        for fd in (self._pidfd, self._init):
            if fd is not None:
                os.close(fd)
        self._pidfd = self._init = None
        if not self._epoll.closed:
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()


def _pgrp_of(pid: int) -> int | None:
    """The process group of ``pid`` (None when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    fields = stat_line[stat_line.rfind(b")") + 2 :].split()
    return int(fields[2]) if len(fields) > 2 else None


def _fileno(stream: trio.abc.SendStream | trio.abc.ReceiveStream) -> int:
    """The fd of one of a process's pipes (trio makes them FdStreams on Unix)."""
    assert isinstance(stream, trio.lowlevel.FdStream)
    return stream.fileno()


async def _feed_stdin(stream: trio.abc.SendStream, data: bytes | Path) -> None:
    """Write stdin; a child that exits (or closes stdin) without reading it all is not an error."""
    try:
        if isinstance(data, Path):
            async with await trio.open_file(data, "rb") as f:
                while chunk := await f.read(_STDIN_CHUNK):
                    await stream.send_all(chunk)
        else:
            view = memoryview(data)
            for i in range(0, len(view), _STDIN_CHUNK):
                await stream.send_all(view[i : i + _STDIN_CHUNK])
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _watch_stop(stop: trio.Event, waiting: trio.CancelScope, ended: dict[str, bool]) -> None:
    await stop.wait()
    ended["stop"] = True
    waiting.cancel()


async def _stop_group_reading(
    proc: trio.Process, grace: float, watch: _ChildWatch, wrapped: Wrapped | None
) -> None:
    """:func:`stop_group`, reading the pipes meanwhile: a child that writes its last words
    on SIGTERM must not block on a full pipe until the SIGKILL at the end of the grace."""
    if wrapped is not None and watch.sandbox_gone:
        wrapped.emptied = True  # (and the group's own stop at the end need not look either)
    if proc.returncode is not None and (watch.sandbox_gone or not group_alive(proc.pid)):
        return  # the usual end: the leader exited and left nothing behind
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch.until_eof)
        await stop_group(proc, grace, wrapped=wrapped)
        nursery.cancel_scope.cancel()


def _check_runnable(program: str, env: Mapping[str, str], cwd: str | os.PathLike[str] | None) -> None:
    """Raise the OSError that exec would for ``program`` (searched on the child's PATH, as
    execvp does), or return: ENOENT when there is none, EACCES when it is not executable."""
    here = os.fspath(cwd) if cwd is not None else "."
    if "/" in program:
        candidates = [os.path.join(here, program)]  # (an absolute program stays as it is)
    else:
        candidates = [os.path.join(here, d or ".", program) for d in os.get_exec_path(dict(env))]
    denied = False
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and os.access(path, os.X_OK):
            return
        denied = True
    if denied:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), program)
    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), program)


async def _drain(watch: _ChildWatch, drain: float, stdin_inode: int | None) -> None:
    """Give the pipes ``drain`` seconds to reach EOF, killing whoever holds them half way.

    The group is gone by now, so a writer still holding a pipe escaped it (setsid,
    double fork). It was started by us all the same: it is killed, not waited for.
    What it writes meanwhile is captured; past ``drain`` the pipes are closed unread.
    """
    with trio.move_on_after(drain / 2):
        await watch.until_eof()
    if watch.at_eof:
        return
    inodes = {os.fstat(fd).st_ino for fd in watch.pipe_fds}
    if stdin_inode is not None:
        inodes.add(stdin_inode)
    _kill_holders(inodes)
    with trio.move_on_after(drain / 2):
        await watch.until_eof()


def _kill_holders(inodes: set[int]) -> None:
    """SIGKILL every other process holding one of these pipes: started by us, escaped from
    the group, and keeping a pipe of a finished run open. Killed, not waited for."""
    for pid in _pipe_holders(inodes):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _pipe_holders(inodes: set[int]) -> list[int]:
    """Processes other than us with an fd on one of these pipes."""
    targets = {f"pipe:[{ino}]" for ino in inodes}
    me = os.getpid()
    holders = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in targets:
                    holders.append(int(entry))
                    break
            except OSError:
                continue
    return holders
