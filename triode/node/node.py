"""A node: the wire protocol on a TCP listener, with storage, engine and sched behind it.

:func:`open_node` composes the parts in one nursery. Each part is an async context
manager that takes the node, adds its methods to ``node.router`` and its figures to
``node.info()``; leaving :func:`open_node` stops accepting, lets calls in flight
finish for a grace period, cancels the rest and closes every part in reverse order.
"""

from __future__ import annotations

import logging
import os
import resource
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import trio

from ..client import Client, client_config, open_client
from ..errors import TriodeError
from ..version import __version__
from ..wire.connection import Connection, ConnectionConfig, IncomingCall, open_connection
from ..wire.router import Router

__all__ = ["NodeConfig", "Node", "Part", "PartFactory"]

log = logging.getLogger("triode.node")


@dataclass(frozen=True)
class NodeConfig:
    """Everything ``triode node`` takes on its command line, and a little more."""

    #: ``HOST:PORT`` to serve on (port 0 picks one); None serves only in-process clients.
    listen: str | None = "127.0.0.1:0"
    #: Data directory (CAS, action cache, work dirs); None keeps storage in memory.
    data: Path | None = None
    #: A node whose storage backs ours (write-through, read-through).
    backing: str | None = None
    #: Seed peers of the cluster.
    peers: tuple[str, ...] = ()
    max_concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_queue: int = 1000
    #: Local storage limit in bytes (None: unlimited).
    cache_size: int | None = None
    #: Shared secret clients must present; also presented to backing and peer nodes.
    token: str | None = field(default=None, repr=False)
    #: ``HOST:PORT`` for the Prometheus metrics endpoint.
    metrics: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle to verify peers and backing nodes that use TLS.
    tls_ca: Path | None = None
    node_id: str | None = None
    #: Seconds calls in flight may take to finish once the node is asked to stop.
    shutdown_grace: float = 10.0
    #: Connections served at once (counted from accept, before the hello). Past it the node
    #: stops accepting until one closes; the default leaves most file descriptors to the
    #: store and the processes.
    max_connections: int = field(default_factory=lambda: _default_max_connections())
    #: Connection settings (keepalive, windows, limits) for every connection the node serves.
    connection: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("data", "tls_cert", "tls_key", "tls_ca"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "peers", tuple(self.peers))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key")
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise ValueError("max_concurrency must be at least 1 and max_queue at least 0")


def _default_max_connections() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(16, min(1024, soft // 4))


class Part(Protocol):
    """One part of a node (storage, engine, tools, sched): it reports its own figures."""

    name: str

    def info(self) -> dict[str, Any]: ...


PartFactory = Callable[["Node"], AbstractAsyncContextManager[Part]]


class Node:
    """A running node. Get one from :func:`open_node`."""

    def __init__(self, config: NodeConfig, nursery: trio.Nursery) -> None:
        self.config = config
        self.id = config.node_id or f"node-{uuid.uuid4().hex[:12]}"
        self.router = Router()
        self.parts: dict[str, Part] = {}
        self.address: str | None = None
        self.started = time.time()
        self._nursery = nursery
        self._serving: trio.Nursery = nursery  # replaced by open_node once parts are up
        self._connections: set[Connection] = set()
        self._connection_slots = trio.CapacityLimiter(config.max_connections)
        self._tls: ssl.SSLContext | None = None  # the server TLS context, set by open_node
        self._conn_config = replace(
            ConnectionConfig(node_id=self.id, required_token=config.token), **config.connection
        )
        self.router.add("node.ping", self._ping)
        self.router.add("node.info", self._info)

    @property
    def nursery(self) -> trio.Nursery:
        """The node's own nursery: tasks started here live exactly as long as the node."""
        return self._nursery

    def client_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for connections this node makes (to backing nodes and peers)."""
        if self.config.tls_ca is None:
            return None
        return ssl.create_default_context(cafile=str(self.config.tls_ca))

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "node": self.id,
            "version": __version__,
            "address": self.address,
            "uptime": time.time() - self.started,
            "connections": len(self._connections),
            "methods": list(self.router),
        }
        for name, part in self.parts.items():
            info[name] = part.info()
        return info

    async def _ping(self, call: IncomingCall) -> None:
        return None

    async def _info(self, call: IncomingCall) -> dict[str, Any]:
        return self.info()

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Client]:
        """A client of this node in the same process, over a socket pair (no TCP, no token)."""
        ours, theirs = trio.socket.socketpair()
        server_stream = trio.SocketStream(theirs)
        config = replace(self._conn_config, required_token=None)
        self._serving.start_soon(self._serve_connection, server_stream, config)
        async with open_client(trio.SocketStream(ours), client_config(node_id=f"{self.id}-local")) as client:
            yield client

    # -- serving ---------------------------------------------------------------------------

    async def _serve_connection(self, stream: trio.abc.Stream, config: ConnectionConfig) -> None:
        try:
            async with open_connection(stream, config, handlers=self.router.get, initiator=False) as conn:
                self._connections.add(conn)
                try:
                    await conn.wait_closed()
                finally:
                    self._connections.discard(conn)
        except TriodeError as exc:
            log.info("connection ended: %s", exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("connection lost: %r", exc)
        except Exception:
            # A bug reached by one connection's bytes must not take the node down with it.
            log.exception("connection failed; the node goes on serving the others")
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    async def _accept(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        async with listener:
            while True:
                # Take a slot before accepting: at the limit the node stops accepting (the
                # kernel's backlog holds the rest) instead of opening and dropping sockets.
                slot = object()
                await self._connection_slots.acquire_on_behalf_of(slot)
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    self._connection_slots.release_on_behalf_of(slot)
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    self._connection_slots.release_on_behalf_of(slot)
                    raise
                self._serving.start_soon(self._serve_slot, stream, slot)

    async def _serve_slot(self, stream: trio.abc.Stream, slot: object) -> None:
        try:
            await self._serve_tls_or_plain(stream)
        finally:
            self._connection_slots.release_on_behalf_of(slot)

    async def _serve_tls_or_plain(self, stream: trio.abc.Stream) -> None:
        if self._tls is not None:
            stream = trio.SSLStream(stream, self._tls, server_side=True)
        await self._serve_connection(stream, self._conn_config)

    async def _drain(self) -> None:
        """Refuse new calls, let the ones in flight finish (bounded by shutdown_grace)."""
        for conn in list(self._connections):
            conn.drain()
        with trio.move_on_after(self.config.shutdown_grace):
            for conn in list(self._connections):
                await conn.wait_idle()
