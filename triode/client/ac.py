"""The action cache of a node, through a connection: ``client.ac``."""

from __future__ import annotations

from typing import Any

from ..model.digest import Digest
from ..wire.connection import Connection

__all__ = ["RemoteActionCache"]


class RemoteActionCache:
    """A node's action cache, over one connection: ``client.ac``."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def get(self, action_digest: Digest) -> dict[str, Any] | None:
        reply = await self.connection.call("ac.get", {"action_digest": action_digest.to_wire()})
        return reply["result"]

    async def update(self, action_digest: Digest, result: dict[str, Any]) -> None:
        await self.connection.call("ac.update", {"action_digest": action_digest.to_wire(), "result": result})
