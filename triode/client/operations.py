"""``client.operations``: submit, wait for, watch, cancel and list operations on any node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import msgpack

from ..errors import from_wire
from ..model.action import Action
from ..model.result import ExecuteOutcome
from ..wire.connection import Connection

__all__ = ["Operations", "raise_for_operation"]


def raise_for_operation(op: dict[str, Any]) -> ExecuteOutcome:
    """The outcome of a completed operation map, or the error it completed with, raised."""
    error = op.get("error")
    if error:
        raise from_wire(error["code"], error["message"], error.get("details") or {})
    outcome = op.get("outcome")
    if outcome is None:
        raise ValueError(f"operation {op.get('name')} has not completed (state {op.get('state')})")
    return replace(ExecuteOutcome.from_wire(outcome), operation=op.get("name"))


class Operations:
    """Operations are named ``NODE/NUMBER``; any node of the cluster answers for any name."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def execute(self, action: Action, *, skip_cache: bool = False, priority: int = 0) -> ExecuteOutcome:
        """Run through the scheduler and wait; the outcome names the operation that answered.

        Leaving early (cancelled, timed out) stops waiting; the execution is cancelled
        once no caller waits for it any more.
        """
        reply = await self.connection.call(
            "sched.execute", {"action": action.to_wire(), "skip_cache": skip_cache, "priority": priority}
        )
        return ExecuteOutcome.from_wire(reply)

    async def submit(self, action: Action, *, skip_cache: bool = False, priority: int = 0) -> dict[str, Any]:
        """Queue it and return at once (the operation map); it runs even if nobody waits."""
        return await self.connection.call(
            "sched.submit", {"action": action.to_wire(), "skip_cache": skip_cache, "priority": priority}
        )

    async def get(self, name: str) -> dict[str, Any]:
        return await self.connection.call("sched.get", {"name": name})

    async def wait(self, name: str) -> dict[str, Any]:
        """The operation map once it has completed (its ``outcome`` or ``error`` inside)."""
        return await self.connection.call("sched.wait", {"name": name})

    async def result(self, name: str) -> ExecuteOutcome:
        """Wait, then the outcome, or the operation's error raised."""
        return raise_for_operation(await self.wait(name))

    async def cancel(self, name: str) -> bool:
        """Cancel for every waiter: queued, it is removed; executing, its processes are killed."""
        return await self.connection.call("sched.cancel", {"name": name})

    async def list(self, state: str | None = None, *, limit: int = 1000) -> list[dict[str, Any]]:
        """This node's operations: queued and executing, then retained completed ones."""
        args: dict[str, Any] = {"limit": limit}
        if state is not None:
            args["state"] = state
        return await self.connection.call("sched.list", args)

    @asynccontextmanager
    async def watch(self, name: str) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """``async with ops.watch(name) as changes: async for op in changes: ...``

        Yields the operation map now and after each change, the last one completed.
        """
        async with self.connection.open_call("sched.watch", {"name": name}) as call:

            async def changes() -> AsyncIterator[dict[str, Any]]:
                unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1024 * 1024)
                async for chunk in call:
                    unpacker.feed(chunk)
                    for snapshot in unpacker:
                        yield snapshot
                await call.result()

            yield changes()

    async def status(self) -> dict[str, Any]:
        """The scheduler's figures and peers (the ``sched`` section of ``client.status()``)."""
        return await self.connection.call("sched.status")
