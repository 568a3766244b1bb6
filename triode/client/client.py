"""The typed client: ``async with triode.connect(address) as client``."""

from __future__ import annotations

import os
import ssl
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from ..errors import Unavailable
from ..model.action import Action
from ..model.result import ExecuteOutcome
from ..wire.connection import Connection, ConnectionConfig, open_connection
from ..wire.transport import open_stream
from .ac import RemoteActionCache
from .actions import LocalInputs, upload_inputs
from .cas import RemoteCAS
from .operations import Operations
from .tools import ToolsClient

__all__ = ["Client", "connect", "open_client"]


class Client:
    """What a user holds to talk to one node: storage, execution, tools, status.

    The same class serves a remote node (:func:`connect`) and an embedded one
    (``node.connect()``), so code written against one runs against the other.
    """

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.operations = Operations(connection)
        self.cas = RemoteCAS(connection)
        self.ac = RemoteActionCache(connection)
        self.tools = ToolsClient(connection)

    @property
    def node_id(self) -> str:
        """The id of the node this client talks to."""
        return self.connection.peer.node

    @property
    def closed(self) -> bool:
        """Whether the connection to the node is gone (calls would fail at once)."""
        return self.connection.closed

    @property
    def close_reason(self) -> Exception | None:
        """Why the connection ended, once it has."""
        return self.connection.close_reason

    async def wait_closed(self) -> None:
        """Wait until the connection to the node ends, for whatever reason."""
        await self.connection.wait_closed()

    async def ping(self) -> float:
        """Round trip to the node, in seconds."""
        start = trio.current_time()
        await self.connection.call("node.ping")
        return trio.current_time() - start

    async def info(self) -> dict[str, Any]:
        """The node's description: id, version, uptime, address, and each part's figures."""
        return await self.connection.call("node.info")

    async def execute(self, action: Action, *, skip_cache: bool = False) -> ExecuteOutcome:
        """Run ``action`` on the node, or answer it from the action cache.

        The node's ``execute`` (docs/protocol.md): through its admission control, sharing
        one run with identical actions in flight. Leaving early (cancelled, timed out)
        kills the run once no other caller waits for it. Write the outputs back with
        :func:`triode.client.actions.write_outputs`.
        """
        reply = await self.connection.call("execute", {"action": action.to_wire(), "skip_cache": skip_cache})
        return ExecuteOutcome.from_wire(reply)

    async def upload_inputs(self, root: Path, paths: Iterable[str | os.PathLike[str]]) -> LocalInputs:
        """Hash local files/dirs under ``root`` and upload what the node lacks: an action's inputs."""
        return await upload_inputs(self.cas, root, paths)

    async def status(self) -> dict[str, Any]:
        """Alias of :meth:`info`, as ``triode status`` shows it."""
        return await self.info()


def client_config(node_id: str | None = None, **options: Any) -> ConnectionConfig:
    config = ConnectionConfig(node_id=node_id or f"client-{uuid.uuid4().hex[:12]}")
    return replace(config, **options) if options else config


@asynccontextmanager
async def open_client(stream: trio.abc.Stream, config: ConnectionConfig) -> AsyncIterator[Client]:
    """A client over an already open stream (used by :func:`connect` and embedded nodes)."""
    async with open_connection(stream, config, initiator=True) as conn:
        yield Client(conn)


@asynccontextmanager
async def connect(
    address: str,
    *,
    token: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    connect_timeout: float = 10.0,
    **options: Any,
) -> AsyncIterator[Client]:
    """Connect to the node at ``HOST:PORT``.

    ``token`` is the node's shared secret, if it has one; ``ssl_context`` turns on TLS.
    Other keyword arguments set :class:`~triode.wire.ConnectionConfig` fields
    (``keepalive_interval``, ``dead_after``, ``window`` …). Leaving the block closes
    the connection and cancels every call still in flight, here and on the node.
    """
    config = client_config(token=token, **options)
    stream = None
    with trio.move_on_after(connect_timeout):
        stream = await open_stream(address, ssl_context=ssl_context)
    if stream is None:
        raise Unavailable(f"no answer from node at {address} within {connect_timeout}s", node=address)
    async with open_client(stream, config) as client:
        yield client
