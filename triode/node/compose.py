"""``open_node``: the parts composed in one nursery, and the listener in front of them."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any

import trio

from ..errors import InvalidArgument
from ..wire.transport import format_address, parse_address
from .engine import EnginePart, open_engine
from .httpcache import HttpDoor, start_http_door
from .node import Node, NodeConfig, PartFactory
from .reapi_exec import start_grpc_door
from .sched import open_sched
from .storage import StoragePart, open_storage
from .tools import open_tools

__all__ = ["open_node", "PARTS"]

#: The parts a node is made of, in start order. Each is opened with the node and may use
#: the parts opened before it (``node.parts[name]``); they close in reverse order. Sched
#: comes last: it routes ``execute`` through admission control in front of the engine.
PARTS: tuple[PartFactory, ...] = (open_storage, open_engine, open_tools, open_sched)


@asynccontextmanager
async def open_node(config: NodeConfig | None = None, **options: Any) -> AsyncIterator[Node]:
    """Start a node; leaving the block shuts it down gracefully and joins everything it started.

    Pass a :class:`NodeConfig`, or its fields as keywords:
    ``open_node(listen="127.0.0.1:0", data=Path("/var/lib/triode"))``.
    """
    if config is None:
        config = NodeConfig(**options)
    elif options:
        config = replace(config, **options)
    tls = _server_ssl_context(config)  # once, up front: a bad file fails here, not per connection
    # Any exception (a part failing to start, or the caller's own from the block) is held
    # and raised again outside the nurseries, so it reaches the caller as itself rather than
    # wrapped in ExceptionGroups. The caller's is held until every part is closed normally.
    raised: BaseException | None = None
    async with trio.open_nursery() as nursery:
        node = Node(config, nursery)
        node._tls = tls
        try:
            async with AsyncExitStack() as parts:
                for factory in PARTS:
                    part = await parts.enter_async_context(factory(node))
                    node.parts[part.name] = part
                _read_own_writes(node)
                # Connections live in a nursery of their own, closed before the parts are,
                # so no handler is still running when storage or the engine shuts down.
                async with trio.open_nursery() as serving:
                    node._serving = serving
                    accept_scope = trio.CancelScope()
                    if config.listen is not None:
                        listeners = await _listen(config.listen)
                        sockname = listeners[0].socket.getsockname()
                        node.address = format_address(sockname[0], sockname[1])
                        serving.start_soon(_accept_all, node, listeners, accept_scope)
                    door: HttpDoor | None = None
                    if config.http is not None:
                        door = await start_http_door(node, serving)
                        node.http_address = door.address
                    grpc_door = None
                    if config.grpc is not None:
                        grpc_door = await start_grpc_door(node, serving)
                        node.grpc_address = grpc_door.address
                    try:
                        yield node
                    except BaseException as exc:
                        raised = exc
                    else:
                        accept_scope.cancel()
                        # Every door drains at once, each bounded by the grace: a shutdown
                        # takes at most one grace period, not one per door.
                        async with trio.open_nursery() as draining:
                            if door is not None:
                                draining.start_soon(door.drain, config.shutdown_grace)
                            if grpc_door is not None:
                                draining.start_soon(grpc_door.drain, config.shutdown_grace)
                            draining.start_soon(node._drain)
                    serving.cancel_scope.cancel()
        except BaseException as exc:
            raised = exc
        finally:
            nursery.cancel_scope.cancel()
    if raised is not None:
        raise raised


def _read_own_writes(node: Node) -> None:
    """Let storage's ac.get see the results the engine has answered with and is still
    writing to the action cache (it writes them just behind the answers)."""
    storage, engine = node.parts.get("storage"), node.parts.get("engine")
    if isinstance(storage, StoragePart) and isinstance(engine, EnginePart):
        storage.pending = engine.executor.pending_result


def _server_ssl_context(config: NodeConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(
            f"cannot load the TLS certificate {config.tls_cert} and key {config.tls_key}: {exc}"
        ) from None
    return ctx


async def _listen(address: str) -> list[trio.SocketListener]:
    host, port = parse_address(address)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise InvalidArgument(f"cannot listen on {address}: {exc.strerror or exc}") from None


async def _accept_all(node: Node, listeners: list[trio.SocketListener], scope: trio.CancelScope) -> None:
    with scope:
        async with trio.open_nursery() as accepting:
            for listener in listeners:
                accepting.start_soon(node._accept, listener)
