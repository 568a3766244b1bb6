"""The engine part of a node: an :class:`Executor` over the node's storage, serving ``engine.execute``.

``engine.execute`` is the engine's own, unqueued path (docs/protocol.md, "Methods:
execute"): parse the request, answer from the cache or run the action now. ``execute``
itself is the scheduler's (``triode.node.sched``): admission control in front of the
same executor, which it calls directly (``lookup`` at admission, ``run_action`` in a slot).
"""


from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..engine.executor import EngineConfig, Executor
from ..engine.workdir import WorkDirs, temporary_base
from ..model.result import ExecuteRequest
from ..wire.connection import IncomingCall

if TYPE_CHECKING:
    from .node import Node

__all__ = ["EnginePart", "open_engine"]

#: Says how actions are isolated when the engine starts (a warning when they are not).
log = logging.getLogger("triode.isolation")


@dataclass
class EnginePart:
    """``node.parts["engine"]``: the node's :class:`Executor` and its figures."""

    executor: Executor
    name: str = "engine"

    def info(self) -> dict[str, Any]:
        return self.executor.info()

    async def h_execute(self, call: IncomingCall) -> dict[str, Any]:
        """``engine.execute``: no queue, no limit (for the node's own use and benchmarks)."""
        request = ExecuteRequest.from_wire(call.args, method=call.method)
        outcome = await self.executor.lookup_or_run(request.action, skip_cache=request.skip_cache)
        return outcome.to_wire()


@asynccontextmanager
async def open_engine(node: Node, config: EngineConfig | None = None) -> AsyncIterator[EnginePart]:
    """Start the engine over ``node.parts["storage"]``; leaving removes every work dir.

    Actions are isolated as ``node.config.isolation`` says (unless ``config`` says
    otherwise): the sandbox is tried here, and the result logged (a warning when "auto"
    found none) and shown by ``info()``.
    """
    storage = node.parts.get("storage")
    if storage is None:
        raise RuntimeError("the engine part needs the storage part: open storage before the engine")
    cas, ac = storage.cas, storage.ac  # type: ignore[attr-defined]
    if config is None:
        config = EngineConfig(isolation=node.config.isolation, action_network=node.config.action_network,
                              bwrap=node.config.bwrap)
    data = node.config.data
    base_cm = temporary_base() if data is None else nullcontext(data / "work")
    with base_cm as base:
        workdirs = WorkDirs(base, node.id)
        try:
            # In a thread: it may remove a dead node's dirs, and stop and wait out what that
            # node left running in them.
            await trio.to_thread.run_sync(workdirs.open)
            executor = Executor(cas, ac, workdirs, node_id=node.id, config=config)
            sandbox = await executor.prepare()
            if sandbox.isolated or config.isolation == "none":
                log.info("actions: %s", sandbox.detail)
            else:
                log.warning("actions: %s", sandbox.detail)
            part = EnginePart(executor)
            async with trio.open_nursery() as nursery:
                await nursery.start(executor.write_behind)
                await nursery.start(workdirs.remover)
                await nursery.start(workdirs.refiller)
                node.router.add("engine.execute", part.h_execute)
                try:
                    yield part
                finally:
                    # The queued cache writes and removals finish, then their tasks return.
                    executor.close_writes()
                    workdirs.stop_remover()
        finally:
            workdirs.close()
