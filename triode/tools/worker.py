"""One warm worker: a bun or node process serving calls to one entrypoint's tools.

The process is started with :func:`open_process_group` by :func:`run_worker`, a task
that owns it from start to reap; callers borrow the :class:`Worker` (one at a time) and
talk to it over the channel. Any call that does not end in a clean answer (timeout,
cancellation, an oversized or malformed reply, the process dying) kills the whole
process group before the call returns or raises, so the next caller never meets a
worker in an unknown state.

File descriptors, as the worker sees them: 0 is the request pipe; 1 and 2 are both
the log pipe, which a task here drains into a bounded tail; the reply pipe is a
separate fd handed over with ``pass_fds`` whose number is on the command line. That
is the "dup the real stdout, point fd 1 at stderr" arrangement done at spawn time: a
tool writing to stdout by any means (console, process.stdout, fs.writeSync(1)) lands
in the log and cannot corrupt a reply.

A worker may run in a sandbox (``WorkerSpec.sandbox``; the node gives its workers the
sandbox its actions run in): a wrapper that runs the runtime as its grandchild in a
PID namespace and exits with its status. The group is then stopped as a wrapped one
(:class:`~triode.procgroup.Wrapped`), a status of 128 + N reads as signal N, and the
memory that recycles a worker is the runtime's own, not the wrapper's.
"""

from __future__ import annotations

import logging
import math
import os
import select
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..errors import (
    Cancelled,
    DeadlineExceeded,
    ProcessExit,
    ProtocolError,
    RuntimeMissing,
    ToolError,
    ToolNotFound,
    TriodeError,
)
from ..procgroup import KILL_WAIT, Wrapped, kill_group, open_process_group, proc_stats
from .protocol import FrameDecoder, LoadFailure, Result, encode_call, parse_hello, parse_result
from .runtimes import HOW_TO_GET, Runtime

__all__ = ["Sandboxer", "WorkerSpec", "Worker", "run_worker"]

log = logging.getLogger("triode.tools")

#: How long we wait, once a worker's process has ended, for the last of its log.
LOG_WAIT = 1.0
READ_SIZE = 64 * 1024
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

#: Given a worker's argv and working directory, the argv that runs it in a sandbox: a
#: wrapper that runs it as its grandchild (in a PID namespace, so nothing it starts
#: outlives it) and exits with its status, 128 + N for signal N (bubblewrap does).
Sandboxer = Callable[[Sequence[str], Path], list[str]]


@dataclass(frozen=True)
class WorkerSpec:
    """Everything needed to start identical workers for one (runtime, entrypoint, env)."""

    runtime: Runtime
    entrypoint: Path
    env: Mapping[str, str]
    max_output: int = 16 * 1024 * 1024
    start_timeout: float = 30.0
    grace: float = 2.0
    stderr_tail: int = 8192
    sandbox: Sandboxer | None = None

    @property
    def label(self) -> str:
        return f"{self.runtime.name}:{self.entrypoint}"


class Worker:
    """A started worker. Only :func:`run_worker` makes one; a pool lends it to one caller at a time."""

    def __init__(self, spec: WorkerSpec, proc: trio.Process, channel: trio.lowlevel.FdStream) -> None:
        self.spec = spec
        self.proc = proc
        #: The process group's leader (the sandbox's wrapper, when there is one).
        self.pid = proc.pid
        #: The runtime's own process, found once it said it is ready (its memory is
        #: what recycles it); the leader when there is no sandbox.
        self.runtime_pid = proc.pid
        self.tools: tuple[str, ...] = ()
        self.calls = 0
        #: trio time it last went back to its pool's idle set.
        self.idle_since = 0.0
        self.log_bytes = 0
        #: The tool left it in a state that should not be reused (an uncaught error).
        self.spent = False
        self._channel = channel
        self._decoder = FrameDecoder(spec.max_output)
        self._tail = bytearray()
        self._busy = False
        self._broken = False
        self._kill_requested = False
        self._stop_requested = trio.Event()
        #: Set when a stop is requested or the process ends: what the owner task waits for.
        self._wake = trio.Event()
        self._log_done = trio.Event()
        self.stopped = trio.Event()

    # -- state -----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        """Serving a call right now."""
        return self._busy

    @property
    def usable(self) -> bool:
        """Alive, answering, and not asked to stop."""
        return not (self._broken or self._stop_requested.is_set() or self.stopped.is_set())

    def idle_check(self) -> bool:
        """Whether an idle worker can take a call: still running, nothing unexpected on its channel.

        Data or end-of-file waiting on an idle channel means the process died, or a leftover
        timer wrote to the channel, between calls; either way it is not to be trusted.
        """
        if not self.usable or self.proc.poll() is not None:
            return False
        poller = select.poll()  # poll, not select: the fd may be over FD_SETSIZE
        try:
            poller.register(self._channel.fileno(), select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def rss(self) -> int | None:
        """Resident memory of the worker process in bytes (None once it is gone)."""
        try:
            fd = os.open(f"/proc/{self.runtime_pid}/statm", os.O_RDONLY)
            try:
                fields = os.read(fd, 256).split()
            finally:
                os.close(fd)
            return int(fields[1]) * PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return None

    def stderr_tail(self) -> str:
        return bytes(self._tail).decode("utf-8", "replace")

    def retire(self) -> None:
        """Stop when convenient: close its stdin, let it exit, then the group is stopped."""
        self._stop_requested.set()
        self._wake.set()

    def kill(self) -> None:
        """Stop now: SIGKILL the whole process group."""
        self._broken = True
        self._kill_requested = True
        self._stop_requested.set()
        self._wake.set()
        kill_group(self.pid, signal.SIGKILL)

    async def wait_stopped(self) -> None:
        """Wait, shielded and bounded, until the group is reaped and the log drained."""
        with trio.CancelScope(shield=True), trio.move_on_after(self.spec.grace + KILL_WAIT + LOG_WAIT + 1):
            await self.stopped.wait()

    # -- a call ----------------------------------------------------------------------------

    async def call(
        self,
        tool: str,
        input_json: bytes,
        timeout: float | None,  # noqa: ASYNC109 - a timeout that kills the worker, unlike a scope
        *,
        total: float | None = None,
    ) -> Any:
        """Run one tool call; on anything but a clean answer the worker is killed first.

        ``timeout`` is what is left of the call's ``total`` timeout (shown in the error).
        """
        if self._busy:
            raise RuntimeError("a worker serves one call at a time")
        if not self.usable:
            raise Cancelled(f"the worker for {self.spec.label} was stopped")
        if tool not in self.tools:
            raise _not_found(self.spec.entrypoint, tool, self.tools)
        self._busy = True
        self.calls += 1
        call_id = self.calls
        clean = False
        try:
            with trio.move_on_after(math.inf if timeout is None else timeout) as scope:
                result = await self._exchange(call_id, tool, input_json)
            if scope.cancelled_caught:
                raise DeadlineExceeded(
                    f"tool {tool} of {self.spec.entrypoint} did not answer within {total or timeout}s; "
                    f"its worker (pid {self.pid}) was killed and will be replaced",
                    tool=tool,
                    timeout=total or timeout,
                )
            clean = True
        finally:
            self._busy = False
            if self.proc.returncode is not None:
                self._wake.set()  # it exited while busy: let its owner reap it now
            if not clean:
                self.kill()
                await self.wait_stopped()
        return self._outcome(tool, result)

    async def _exchange(self, call_id: int, tool: str, input_json: bytes) -> Result:
        try:
            await self.proc.stdin.send_all(encode_call(call_id, tool, input_json))  # type: ignore[union-attr]
            while True:
                data = await self._channel.receive_some(READ_SIZE)
                if not data:
                    return await self._ended(tool)
                messages = self._decoder.feed(data)
                if messages:
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return await self._ended(tool)
        if len(messages) > 1 or self._decoder.buffered:
            raise ProtocolError(
                f"the worker for {self.spec.entrypoint} sent more than one reply to call {call_id}; "
                "something other than the harness wrote to its channel"
            )
        return parse_result(messages[0], call_id)

    async def _ended(self, tool: str) -> Result:
        """The channel closed mid-call: the pool is closing, or the process died."""
        if self._stop_requested.is_set():
            raise Cancelled(f"the tool pool was closed during the call to {tool}", tool=tool)
        with trio.move_on_after(self.spec.grace):
            await self.proc.wait()
        self.kill()
        await self.wait_stopped()
        raise _process_exit(self, f"the worker for {self.spec.entrypoint} ended during the call to {tool}")

    def _outcome(self, tool: str, result: Result) -> Any:
        if result.ok:
            return result.output
        if result.not_found:
            raise _not_found(self.spec.entrypoint, tool, result.tools)
        if result.recycle:
            self.spent = True
        err = result.error
        raise ToolError(
            f"tool {tool} threw {err['name'] or 'Error'}: {err['message']}",
            tool=tool,
            name=err["name"],
            error_message=err["message"],
            stack=err["stack"],
        )

    # -- the owner's side --------------------------------------------------------------------

    async def _watch_exit(self) -> None:
        await self.proc.wait()
        self._wake.set()

    async def _drain_log(self) -> None:
        """Keep the log pipe empty (a chatty tool must never block) and keep its tail."""
        stream = self.proc.stdout
        assert stream is not None
        cap = self.spec.stderr_tail
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            while True:
                data = await stream.receive_some(READ_SIZE)
                if not data:
                    break
                self.log_bytes += len(data)
                self._tail += data
                if len(self._tail) > cap:
                    del self._tail[: len(self._tail) - cap]
                if debug:
                    log.debug(
                        "[%s pid %d] %s", self.spec.label, self.pid, data.decode("utf-8", "replace").rstrip()
                    )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self._log_done.set()

    async def _handshake(self) -> None:
        """Wait for the worker's first message: its tools, or why the entrypoint did not load."""
        try:
            with trio.fail_after(self.spec.start_timeout):
                messages: list[dict[str, Any]] = []
                while not messages:
                    data = await self._channel.receive_some(READ_SIZE)
                    if not data:
                        with trio.move_on_after(self.spec.grace):
                            await self.proc.wait()
                        with trio.move_on_after(LOG_WAIT):
                            await self._log_done.wait()
                        raise _process_exit(
                            self, f"the worker for {self.spec.entrypoint} exited while starting"
                        )
                    messages = self._decoder.feed(data)
        except trio.TooSlowError:
            raise DeadlineExceeded(
                f"the worker for {self.spec.entrypoint} did not start within {self.spec.start_timeout}s",
                timeout=self.spec.start_timeout,
            ) from None
        hello = parse_hello(messages[0])
        if isinstance(hello, LoadFailure):
            err = hello.error
            if hello.kind == "typescript":
                raise RuntimeMissing(err["message"], runtime=self.spec.runtime.name)
            raise ToolError(
                f"{self.spec.entrypoint} failed to load under {self.spec.runtime.name}: "
                f"{err['name'] or 'Error'}: {err['message']}",
                name=err["name"],
                error_message=err["message"],
                stack=err["stack"],
            )
        self.tools = hello.tools
        if self.spec.sandbox is not None:
            self.runtime_pid = _wrapped_command(self.pid) or self.pid

    async def _serve(self, on_started: Callable[[Worker], None]) -> TriodeError | None:
        """Start, report, then wait to be stopped; returns the start failure, if any."""
        error: TriodeError | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._drain_log)
            try:
                await self._handshake()
            except TriodeError as exc:
                error = exc
                self.kill()
            else:
                on_started(self)
                nursery.start_soon(self._watch_exit)
                while not self._stop_requested.is_set():
                    await self._wake.wait()
                    self._wake = trio.Event()
                    if self.proc.returncode is not None and not self._busy:
                        # It died between calls (a leftover timer exited it): reap it now,
                        # not when someone next wants it.
                        self._broken = True
                        break
                if not self._kill_requested:
                    # Closing stdin is the harness's signal to exit, whatever timers a tool left.
                    await self.proc.stdin.aclose()  # type: ignore[union-attr]
                    with trio.move_on_after(self.spec.grace):
                        await self.proc.wait()
                kill_group(self.pid, signal.SIGKILL)
            with trio.move_on_after(LOG_WAIT):
                await self._log_done.wait()
            nursery.cancel_scope.cancel()
        return error


def _not_found(entrypoint: Path, tool: str, tools: tuple[str, ...]) -> ToolNotFound:
    return ToolNotFound(
        f"{entrypoint} has no tool {tool!r}; it exports: {', '.join(tools) or 'nothing'}",
        tool=tool,
        available=list(tools),
    )


def _wrapped_command(leader: int) -> int | None:
    """The pid of the command a sandbox's wrapper runs (the wrapper's grandchild), if any."""
    group = [p for p in proc_stats() if p.pgrp == leader and p.state not in ("Z", "X")]
    inits = {p.pid for p in group if p.ppid == leader}
    return next((p.pid for p in group if p.ppid in inits), None)


def _process_exit(worker: Worker, what: str) -> ProcessExit:
    code = worker.proc.returncode
    sig = -code if code is not None and code < 0 else None
    if worker.spec.sandbox is not None and code is not None and 128 < code < 128 + signal.NSIG:
        sig = code - 128  # the sandbox reports a signalled command as a shell does
    exit_code = code if code is not None and code >= 0 and sig is None else None
    how = (
        f"with code {exit_code}"
        if exit_code is not None
        else f"on signal {sig}"
        if sig
        else "(still running)"
    )
    tail = worker.stderr_tail()
    shown = tail[-2000:].strip()
    return ProcessExit(
        f"{what}: it exited {how}" + (f"; its stderr ends with:\n{shown}" if shown else ""),
        exit_code=exit_code,
        signal=sig,
        stderr_tail=tail,
    )


async def run_worker(
    spec: WorkerSpec, *, task_status: trio.TaskStatus[Worker] = trio.TASK_STATUS_IGNORED
) -> None:
    """Start a worker, hand it over with ``task_status.started``, serve until it is stopped.

    Start failures (no runtime, the entrypoint fails to load, a crash, a timeout) are
    raised to whoever awaits ``nursery.start``. Once started this never raises (except
    trio.Cancelled when its nursery is cancelled), so a broken worker cannot take its
    pool down with it. Whatever happens, the process group is killed and reaped and all
    three pipes closed before this returns.
    """
    read_fd, write_fd = os.pipe()
    worker: Worker | None = None
    started = False

    def on_started(value: Worker) -> None:
        nonlocal started
        started = True
        task_status.started(value)

    try:
        argv = spec.runtime.argv(spec.entrypoint, write_fd)
        wrapped = None
        if spec.sandbox is not None:
            argv = spec.sandbox(argv, spec.entrypoint.parent)
            wrapped = Wrapped()
        try:
            async with open_process_group(
                argv,
                env=spec.env,
                cwd=spec.entrypoint.parent,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                pass_fds=(write_fd,),
                grace=spec.grace,
                wrapped=wrapped,
            ) as proc:
                os.close(write_fd)
                write_fd = -1
                channel = trio.lowlevel.FdStream(read_fd)
                read_fd = -1
                async with channel:
                    worker = Worker(spec, proc, channel)
                    error = await worker._serve(on_started)
        except OSError as exc:
            if worker is not None:  # not a failure to start the runtime
                raise
            raise RuntimeMissing(
                f"cannot start {spec.runtime.name} ({spec.runtime.executable}): {exc.strerror or exc}; "
                f"{HOW_TO_GET[spec.runtime.name]}",
                runtime=spec.runtime.name,
            ) from None
        if error is not None:
            raise error
    except Exception:
        if started:
            log.exception("tool worker for %s failed after it started", spec.label)
            return
        raise
    finally:
        for fd in (read_fd, write_fd):
            if fd >= 0:
                os.close(fd)
        if worker is not None:
            worker.stopped.set()
