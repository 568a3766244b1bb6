"""Warm worker pools, one per (runtime, entrypoint, env), living in one nursery.

``async with open_tool_pool() as pool: await pool.call(entrypoint, tool, input)``.
Each distinct (runtime, entrypoint, env) gets a set of at most ``size`` workers; a call
waits (first come, first served, the wait bounded by ``max_waiting``) for one of them,
starting it if none is idle. A worker goes back to the idle set after a clean answer
and is retired after ``max_calls`` calls, past ``max_rss`` bytes of memory, when the
entrypoint file changed, or when its tool left it broken. Leaving the block stops
every worker: no process outlives the pool.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from ..concurrency import open_service_nursery
from ..errors import (
    Cancelled,
    DeadlineExceeded,
    ResourceExhausted,
    RuntimeMissing,
    ToolError,
    TriodeError,
)
from .runtimes import find_runtime
from .validation import (
    encode_input,
    validate_entrypoint,
    validate_env,
    validate_runtime,
    validate_timeout,
    validate_tool_id,
)
from .worker import Sandboxer, Worker, WorkerSpec, run_worker

__all__ = ["ToolPoolConfig", "ToolPool", "open_tool_pool", "worker_env"]

log = logging.getLogger("triode.tools")

MiB = 1024 * 1024


@dataclass(frozen=True)
class ToolPoolConfig:
    """How many workers, how long, how much: every limit of a tool pool."""

    #: Warm workers per (runtime, entrypoint, env): also how many calls run at once there.
    size: int = 2
    #: Runtime when a call names none: "bun" or "node"; None picks bun when it is installed.
    runtime: str | None = None
    #: Seconds a call may take when it gives no timeout (None: no limit).
    timeout: float | None = 60.0
    #: Recycle a worker after this many calls.
    max_calls: int = 1000
    #: Recycle a worker whose resident memory passed this many bytes after a call.
    max_rss: int = 512 * MiB
    #: Largest JSON output (bytes) a tool may return; over it the worker is killed. Kept
    #: under the wire's frame limit (8 MiB), so a result that is allowed can also be sent.
    max_output: int = 7 * MiB
    #: Largest JSON input (bytes) a call may send (also under the frame limit).
    max_input: int = 7 * MiB
    #: Seconds a worker may take to load its entrypoint and say it is ready.
    start_timeout: float = 30.0
    #: Seconds a retiring worker gets to exit before its group is killed.
    grace: float = 2.0
    #: Seconds a warm worker may sit idle before it is stopped (None: kept until the pool closes).
    idle_timeout: float | None = 300.0
    #: A fresh process for every call, thrown away after it (isolation over speed).
    one_shot: bool = False
    #: Callers that may wait for a worker of one pool before new ones are refused.
    max_waiting: int = 1000
    #: Distinct (runtime, entrypoint, env) pools kept; idle ones are closed past this.
    max_pools: int = 64
    #: Bytes of a worker's stderr kept for error reports.
    stderr_tail: int = 8192
    #: Variables every worker gets (validated like a call's env), under the call's own.
    env: Mapping[str, str] = field(default_factory=dict)
    #: Runs each worker in a sandbox (see :data:`~triode.tools.worker.Sandboxer`); None: workers
    #: are plain children of this process, in a process group of their own.
    sandbox: Sandboxer | None = None
    #: One line for people: how workers are isolated (``info()`` shows it).
    isolation: str = "none: workers are this process's children, in process groups of their own"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError("size must be at least 1")
        if self.runtime is not None:
            validate_runtime(self.runtime)
        validate_timeout(self.timeout)
        validate_timeout(self.idle_timeout)
        for name in ("max_calls", "max_rss", "max_output", "max_input", "max_waiting", "max_pools"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        validate_env(self.env)


def worker_env(extra: Mapping[str, str]) -> dict[str, str]:
    """A clean environment for a worker: a PATH, a HOME, a UTF-8 locale, and ``extra``."""
    env = {
        "PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME") or "/",
        "LANG": "C.UTF-8",
    }
    if os.environ.get("TMPDIR"):
        env["TMPDIR"] = os.environ["TMPDIR"]
    env.update(extra)
    return env


_Key = tuple[str, Path, tuple[tuple[str, str], ...]]


class _WorkerSet:
    """The workers of one (runtime, entrypoint, env), and the slots that bound its calls."""

    def __init__(self, pool: ToolPool, spec: WorkerSpec) -> None:
        self.pool = pool
        self.spec = spec
        self.slots = trio.Semaphore(pool.config.size)
        self.idle: list[Worker] = []
        self.workers: set[Worker] = set()
        self.waiting = 0
        self.calls = 0
        self._stamp = self._file_stamp()

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.spec.entrypoint)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    @property
    def busy(self) -> bool:
        return self.waiting > 0 or self.slots.value < self.pool.config.size

    def live(self) -> list[Worker]:
        self.workers = {w for w in self.workers if not w.stopped.is_set()}
        return list(self.workers)

    @asynccontextmanager
    async def slot(self, deadline: float = math.inf) -> AsyncIterator[None]:
        config = self.pool.config
        if self.slots.value == 0 and self.waiting >= config.max_waiting:
            raise ResourceExhausted(
                f"{config.max_waiting} calls already wait for a worker of {self.spec.label}",
                retry_after=1.0,
            )
        self.waiting += 1
        try:
            with trio.move_on_at(deadline) as scope:
                await self.slots.acquire()
        finally:
            self.waiting -= 1
        if scope.cancelled_caught:
            raise DeadlineExceeded(
                f"no worker of {self.spec.label} was free before the call's timeout "
                f"({config.size} busy, {self.waiting} waiting); raise the pool size or the timeout"
            )
        try:
            yield
        finally:
            self.slots.release()

    async def start(self) -> Worker:
        if self.pool.closed:
            raise Cancelled("the tool pool is closed")
        try:
            worker: Worker = await self.pool._nursery.start(run_worker, self.spec)
        except RuntimeError as exc:  # the nursery stopped taking tasks: the pool is closing
            raise Cancelled(f"the tool pool is closed: {exc}") from None
        self.live()  # forget workers that have stopped (one-shot ones stop after every call)
        self.workers.add(worker)
        self.pool.started += 1
        return worker

    def take_idle(self) -> Worker | None:
        stamp = self._file_stamp()
        if stamp != self._stamp:  # the entrypoint changed on disk: old workers run old code
            self._stamp = stamp
            for worker in self.idle:
                worker.retire()
            self.idle.clear()
        while self.idle:
            worker = self.idle.pop()
            if worker.idle_check():
                return worker
            worker.kill()
            self.pool.replaced += 1
        return None

    def put_back(self, worker: Worker) -> None:
        config = self.pool.config
        if not worker.usable:
            self.pool.replaced += 1
            return
        if self.pool.closed or worker.spent or worker.calls >= config.max_calls:
            worker.retire()
            self.pool.recycled += 1
            return
        rss = worker.rss()
        if rss is None or rss > config.max_rss:
            log.info("recycling worker %d of %s: %s bytes resident", worker.pid, self.spec.label, rss)
            worker.retire()
            self.pool.recycled += 1
            return
        worker.idle_since = trio.current_time()
        self.idle.append(worker)

    def retire_idle(self, before: float) -> None:
        """Stop the workers idle since before ``before``."""
        for worker in [w for w in self.idle if w.idle_since < before]:
            self.idle.remove(worker)
            worker.retire()
            self.pool.recycled += 1

    async def start_by(self, deadline: float) -> Worker:
        with trio.move_on_at(deadline) as scope:
            return await self.start()
        assert scope.cancelled_caught
        raise DeadlineExceeded(f"the call's timeout passed while a worker of {self.spec.label} was starting")

    async def call(self, tool: str, input_json: bytes, timeout: float | None, one_shot: bool) -> Any:  # noqa: ASYNC109
        """One call; ``timeout`` covers all of it: waiting for a worker, starting one, running."""
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        async with self.slot(deadline):
            self.calls += 1
            worker = (None if one_shot else self.take_idle()) or await self.start_by(deadline)
            try:
                left = None if timeout is None else deadline - trio.current_time()
                if left is not None and left <= 0:
                    raise DeadlineExceeded(f"the call's timeout passed before {tool} could start")
                return await worker.call(tool, input_json, left, total=timeout)
            finally:
                if one_shot:
                    worker.kill()
                    await worker.wait_stopped()
                else:
                    self.put_back(worker)

    async def tools(self) -> tuple[str, ...]:
        async with self.slot():
            worker = self.take_idle() or await self.start()
            try:
                return worker.tools
            finally:
                self.put_back(worker)

    def close(self) -> None:
        for worker in self.live():
            worker.retire()
        self.idle.clear()


class ToolPool:
    """Calls tools in warm workers. Get one from :func:`open_tool_pool`."""

    def __init__(self, config: ToolPoolConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self._nursery = nursery
        self._sets: OrderedDict[_Key, _WorkerSet] = OrderedDict()
        self._base_env = validate_env(config.env)
        self._default_runtime: str | None = None
        self._resolved: dict[str, Path] = {}
        self.closed = False
        self.calls = 0
        self.failures = 0
        self.started = 0
        self.replaced = 0
        self.recycled = 0

    def default_runtime(self) -> str:
        if self.config.runtime is not None:
            return self.config.runtime
        if self._default_runtime is None:
            try:
                find_runtime("bun")
                self._default_runtime = "bun"
            except RuntimeMissing:
                self._default_runtime = "node"
        return self._default_runtime

    def _entrypoint(self, entrypoint: Any) -> Path:
        """The validated entrypoint, resolved once per spelling (a warm call skips realpath).

        A file that disappears later is still caught: its worker set sees the stamp change.
        """
        key = os.fspath(entrypoint) if isinstance(entrypoint, (str, os.PathLike)) else None
        found = self._resolved.get(key) if key is not None else None
        if found is None:
            found = validate_entrypoint(entrypoint)
            if len(self._resolved) >= 4096:
                self._resolved.clear()
            self._resolved[key] = found  # type: ignore[index]
        return found

    def _set_for(self, entrypoint: Any, runtime: str | None, env: Mapping[str, str] | None) -> _WorkerSet:
        if self.closed:
            raise Cancelled("the tool pool is closed")
        path = self._entrypoint(entrypoint)
        name = validate_runtime(runtime) if runtime is not None else self.default_runtime()
        call_env = validate_env(env)
        key: _Key = (name, path, tuple(sorted(call_env.items())))
        found = self._sets.get(key)
        if found is not None:
            self._sets.move_to_end(key)
            return found
        found = _WorkerSet(
            self,
            WorkerSpec(
                runtime=find_runtime(name),
                entrypoint=path,
                env=worker_env({**self._base_env, **call_env}),
                max_output=self.config.max_output,
                start_timeout=self.config.start_timeout,
                grace=self.config.grace,
                stderr_tail=self.config.stderr_tail,
                sandbox=self.config.sandbox,
            ),
        )
        if len(self._sets) >= self.config.max_pools:
            self._evict()
        self._sets[key] = found
        return found

    def _evict(self) -> None:
        for key, workers in self._sets.items():  # least recently used first
            if not workers.busy:
                workers.close()
                del self._sets[key]
                return
        raise ResourceExhausted(
            f"{len(self._sets)} tool pools (runtime, entrypoint, env) are busy; the limit is "
            f"{self.config.max_pools}",
            retry_after=1.0,
        )

    async def call(
        self,
        entrypoint: str | os.PathLike[str],
        tool: str,
        input: Any = None,
        *,
        runtime: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - enforced on the node, which kills the worker
        one_shot: bool | None = None,
    ) -> Any:
        """Call ``tool`` of ``entrypoint`` with JSON ``input``; returns its JSON result.

        ``timeout`` (seconds) defaults to the pool's; the call's ``env`` adds variables
        for the tool (a distinct env gets workers of its own). Raises ToolNotFound,
        ToolError, DeadlineExceeded, ProcessExit, OutputTooLarge, ProtocolError,
        RuntimeMissing, InvalidArgument; trio.Cancelled if the caller is cancelled (the
        worker is killed first).
        """
        validate_tool_id(tool)
        timeout = validate_timeout(timeout) if timeout is not None else self.config.timeout
        input_json = encode_input(input, self.config.max_input)
        workers = self._set_for(entrypoint, runtime, env)
        self.calls += 1
        isolated = self.config.one_shot if one_shot is None else one_shot
        try:
            return await workers.call(tool, input_json, timeout, isolated)
        except (TriodeError, trio.Cancelled) as exc:
            if not isinstance(exc, ToolError):
                self.failures += 1
            raise

    async def list_tools(
        self,
        entrypoint: str | os.PathLike[str],
        *,
        runtime: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> list[str]:
        """The tools ``entrypoint`` exports (starting a worker if none is warm)."""
        return list(await self._set_for(entrypoint, runtime, env).tools())

    async def warm(
        self,
        entrypoint: str | os.PathLike[str],
        *,
        runtime: str | None = None,
        env: Mapping[str, str] | None = None,
        count: int | None = None,
    ) -> None:
        """Start workers ahead of the first calls (up to ``size``), so those find them warm."""
        workers = self._set_for(entrypoint, runtime, env)
        want = min(count or self.config.size, self.config.size)
        while len(workers.live()) < want:
            workers.idle.append(await workers.start())

    async def _reap_idle(self, idle_timeout: float) -> None:
        """Stop workers nobody used for ``idle_timeout`` seconds (a task in the pool's nursery)."""
        while True:
            await trio.sleep(min(idle_timeout / 2, 30.0))
            before = trio.current_time() - idle_timeout
            for workers in list(self._sets.values()):
                workers.retire_idle(before)

    def workers(self) -> list[Worker]:
        """Every running worker (for status and tests)."""
        return [w for s in self._sets.values() for w in s.live()]

    def info(self) -> dict[str, Any]:
        return {
            "size": self.config.size,
            "isolated": self.config.sandbox is not None,
            "isolation_detail": self.config.isolation,
            "calls": self.calls,
            "failures": self.failures,
            "workers_started": self.started,
            "workers_replaced": self.replaced,
            "workers_recycled": self.recycled,
            "pools": [
                {
                    "runtime": key[0],
                    "entrypoint": str(key[1]),
                    "env": sorted(k for k, _ in key[2]),
                    "workers": len(s.live()),
                    "idle": len(s.idle),
                    "waiting": s.waiting,
                    "calls": s.calls,
                }
                for key, s in self._sets.items()
            ],
        }

    def close(self) -> None:
        """Refuse new calls and retire every worker (leaving the block also kills them)."""
        self.closed = True
        for workers in self._sets.values():
            workers.close()


@asynccontextmanager
async def open_tool_pool(config: ToolPoolConfig | None = None, **options: Any) -> AsyncIterator[ToolPool]:
    """A pool of tool workers that lives exactly as long as the block.

    Pass a :class:`ToolPoolConfig` or its fields as keywords (``size=4, runtime="node"``).
    Leaving the block stops every worker process group, reaps it and closes its pipes.
    """
    if config is None:
        config = ToolPoolConfig(**options)
    elif options:
        config = replace(config, **options)
    async with open_service_nursery() as nursery:
        pool = ToolPool(config, nursery)
        if config.idle_timeout is not None:
            nursery.start_soon(pool._reap_idle, config.idle_timeout)
        try:
            yield pool
        finally:
            pool.close()
            nursery.cancel_scope.cancel()
