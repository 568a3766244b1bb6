"""The engine part of a node: an :class:`Executor` over the node's storage, serving ``engine.execute``.

The handler is thin on purpose: the scheduler (``triode.node.sched``) serves ``execute``
with admission control in front of the same call.
"""


from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..engine.executor import EngineConfig, ExecuteOutcome, Executor
from ..engine.workdir import WorkDirs, temporary_base
from ..errors import InvalidArgument
from ..model.action import Action, parse_wire_action
from ..wire.connection import IncomingCall

if TYPE_CHECKING:
    from .node import Node

__all__ = ["EnginePart", "open_engine"]


@dataclass
class EnginePart:
    """``node.parts["engine"]``: run actions now, in the calling task."""

    executor: Executor
    name: str = "engine"

    async def execute(
        self, action: Action, *, skip_cache: bool = False, queued: float = 0.0
    ) -> ExecuteOutcome:
        """Answer from the action cache or run ``action`` now (see :meth:`Executor.execute`)."""
        return await self.executor.execute(action, skip_cache=skip_cache, queued=queued)

    async def lookup(self, action: Action) -> ExecuteOutcome | None:
        """The cached outcome of ``action`` (results being written included), or None."""
        return await self.executor.lookup(action)

    def info(self) -> dict[str, Any]:
        return self.executor.info()


@asynccontextmanager
async def open_engine(node: Node, config: EngineConfig | None = None) -> AsyncIterator[EnginePart]:
    """Start the engine over ``node.parts["storage"]``; leaving removes every work dir."""
    storage = node.parts.get("storage")
    if storage is None:
        raise RuntimeError("the engine part needs the storage part: open storage before the engine")
    cas, ac = storage.cas, storage.ac  # type: ignore[attr-defined]
    data = node.config.data
    base_cm = temporary_base() if data is None else nullcontext(data / "work")
    with base_cm as base:
        workdirs = WorkDirs(base, node.id)
        workdirs.open()
        try:
            executor = Executor(cas, ac, workdirs, node_id=node.id, config=config)
            part = EnginePart(executor)
            async with trio.open_nursery() as nursery:
                await nursery.start(executor.write_behind)
                await nursery.start(workdirs.remover)
                await nursery.start(workdirs.refiller)
                # "execute" itself is the scheduler's: admission control in front of this.
                node.router.add("engine.execute", execute_handler(part.execute))
                try:
                    yield part
                finally:
                    # The queued cache writes and removals finish, then their tasks return.
                    executor.close_writes()
                    workdirs.stop_remover()
        finally:
            workdirs.close()


ExecuteFn = Callable[..., Awaitable[ExecuteOutcome]]


def parse_execute_args(args: Any) -> tuple[Action, bool]:
    """``{"action": {...}, "skip_cache": bool}`` to an Action and the flag, or InvalidArgument."""
    if not isinstance(args, dict) or "action" not in args:
        raise InvalidArgument("execute takes {action: {...}, skip_cache: bool}")
    unknown = set(args) - {"action", "skip_cache"}
    if unknown:
        raise InvalidArgument(f"execute got unknown arguments: {', '.join(sorted(map(str, unknown)))}")
    skip_cache = args.get("skip_cache", False)
    if not isinstance(skip_cache, bool):
        raise InvalidArgument(f"execute skip_cache must be a bool, got {skip_cache!r}")
    return parse_wire_action(args["action"]), skip_cache


def execute_handler(execute: ExecuteFn) -> Callable[[IncomingCall], Awaitable[dict[str, Any]]]:
    """The wire handler for ``execute``, calling ``execute(action, skip_cache=...)``."""

    async def handle(call: IncomingCall) -> dict[str, Any]:
        action, skip_cache = parse_execute_args(call.args)
        outcome = await execute(action, skip_cache=skip_cache)
        return outcome.to_wire()

    return handle
