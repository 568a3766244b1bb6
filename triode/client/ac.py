"""The action cache of a node, through a connection: ``client.ac``."""

from __future__ import annotations

from ..model.digest import Digest
from ..model.result import ActionResult
from ..wire.connection import Connection

__all__ = ["RemoteActionCache"]


class RemoteActionCache:
    """A node's action cache, over one connection: ``client.ac``."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection

    async def get(self, action_digest: Digest) -> ActionResult | None:
        """The result stored for the action, or None (also when a blob it names is gone)."""
        reply = await self.connection.call("ac.get", {"action_digest": action_digest.to_wire()})
        result = reply["result"]
        return None if result is None else ActionResult.from_wire(result)

    async def update(self, action_digest: Digest, result: ActionResult) -> None:
        """Store ``result`` (the node checks it; upload the blobs it names first)."""
        await self.connection.call(
            "ac.update", {"action_digest": action_digest.to_wire(), "result": result.to_wire()}
        )
