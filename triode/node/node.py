"""A node: the wire protocol on a TCP listener, with storage, engine and sched behind it.

:func:`open_node` composes the parts in one nursery. Each part is an async context
manager that takes the node, adds its methods to ``node.router`` and its figures to
``node.info()``; leaving :func:`open_node` stops accepting, lets calls in flight
finish for a grace period, cancels the rest and closes every part in reverse order.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import trio

from ..client import Client, client_config, open_client
from ..errors import AuthenticationFailed, ResourceExhausted, TriodeError
from ..version import __version__
from ..wire.connection import (
    ByteBudget,
    Connection,
    ConnectionConfig,
    HelloGuard,
    IncomingCall,
    open_connection,
)
from ..wire.protocol import Protocol as WireProtocol
from ..wire.router import Router

__all__ = ["NodeConfig", "Node", "Part", "PartFactory", "TokenThrottle", "raise_fd_limit"]

log = logging.getLogger("triode.node")

#: Seconds an accepted connection has to finish its hello (TLS handshake included).
HELLO_DEADLINE = 2.0
#: Wrong tokens one address may send in a burst, and how many more it earns per second.
TOKEN_BURST = 10
TOKEN_RATE = 1.0
#: Addresses whose wrong tokens are remembered at once (the least recently seen go first).
TOKEN_TABLE = 4096
#: Connections being told why they are closed (an ERROR to write) at once; past it the
#: node closes further ones without a word, so refusing costs it nothing that piles up.
REFUSING = 64


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
    #: ``HOST:PORT`` for the HTTP cache (bazel-remote's layout, ccache's remote storage, /metrics).
    http: str | None = None
    #: Serve GET and HEAD of the HTTP cache without credentials even when the node has a token.
    allow_unauthenticated_reads: bool = False
    #: ``HOST:PORT`` for the gRPC door: Bazel's Remote Execution API (REAPI v2).
    grpc: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: CA bundle to verify peers and backing nodes that use TLS.
    tls_ca: Path | None = None
    node_id: str | None = None
    #: Seconds calls in flight may take to finish once the node is asked to stop.
    shutdown_grace: float = 10.0
    #: Connections past their hello served at once (the gRPC door's count too; see
    #: docs/design.md, "Connection limits"). When they are all taken, a new connection is
    #: told RESOURCE_EXHAUSTED and closed at once. The default leaves most file
    #: descriptors to the store and the processes.
    max_connections: int = field(default_factory=lambda: _default_max_connections())
    #: Connections still in their hello (not yet authenticated) held at once, apart from
    #: those; each has HELLO_DEADLINE seconds to finish it. Past it a new connection takes
    #: the place of the oldest one, which is told RESOURCE_EXHAUSTED and closed.
    max_unauthenticated: int = field(default_factory=lambda: _default_max_connections(4096))
    #: Who may write the action cache over the wire: "any" client (``ac.update``), or
    #: "executor": only results of actions the node ran itself are stored.
    ac_writes: str = "any"
    #: Bytes of blob data the node holds at once for all its downloads: read ahead and
    #: queued for the sockets (see ByteBudget).
    buffer_budget: int = 256 * 1024 * 1024
    #: How actions are isolated (triode/engine/sandbox.py): "auto" (bubblewrap when it works
    #: here, else none, said at start-up and in the status), "bwrap" (or refuse to start), "none".
    isolation: str = "auto"
    #: An isolated action's network: "host" (the node's) or "none" (a network namespace of its own).
    action_network: str = "host"
    #: The bwrap to run (None: ``bwrap`` on the PATH, else /usr/bin/bwrap).
    bwrap: str | None = None
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
        if self.max_connections < 1 or self.max_unauthenticated < 1:
            raise ValueError("max_connections and max_unauthenticated must be at least 1")
        if self.ac_writes not in ("any", "executor"):
            raise ValueError(f"ac_writes must be 'any' or 'executor', got {self.ac_writes!r}")
        if self.isolation not in ("auto", "bwrap", "none") or self.action_network not in ("host", "none"):
            raise ValueError(f"isolation must be auto, bwrap or none (got {self.isolation!r}) and "
                             f"action_network host or none (got {self.action_network!r})")


def raise_fd_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit is not a value the kernel takes for the soft one.
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError) as exc:  # a limit the kernel will not grant after all
            log.debug("cannot raise the open-file limit from %s to %s: %s", soft, target, exc)
    return soft


def _default_max_connections(most: int = 1024) -> int:
    soft = raise_fd_limit()
    if soft == resource.RLIM_INFINITY:
        return most
    return max(16, min(most, soft // 4))


def _address_of(stream: trio.abc.Stream) -> str:
    """The peer's IP address, for the wrong-token throttle ("" when it has none)."""
    try:
        return str(stream.socket.getpeername()[0])  # type: ignore[attr-defined]
    except (AttributeError, OSError, IndexError, TypeError):
        return ""


class TokenThrottle:
    """Wrong tokens per source address: a token bucket each, in a bounded table.

    Each hello checked against the token spends one unit of its address's bucket and
    gets it back if the token was right, so only wrong ones count; an address whose
    bucket is empty is refused before its token is even compared. IPv6 addresses count
    per /64, since one host usually holds all of one.
    """

    def __init__(
        self, burst: int = TOKEN_BURST, rate: float = TOKEN_RATE, size: int = TOKEN_TABLE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.rate = rate
        self.size = size
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key: (level, at)
        self.refused = 0

    @staticmethod
    def key(address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def _level(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return float(self.burst)
        level, at = entry
        return min(float(self.burst), level + (now - at) * self.rate)

    def take(self, address: str) -> float:
        """Spend one attempt for ``address``: 0.0 if it may try, else the seconds until it may."""
        key = self.key(address)
        now = self._clock()
        level = self._level(key, now)
        if level < 1:
            self.refused += 1
            return (1 - level) / self.rate
        self._buckets[key] = (level - 1, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.size:
            self._buckets.popitem(last=False)
        return 0.0

    def give_back(self, address: str) -> None:
        """The attempt was not a wrong token: it does not count."""
        key = self.key(address)
        if key in self._buckets:
            now = self._clock()
            level = self._level(key, now) + 1
            if level >= self.burst:
                del self._buckets[key]
            else:
                self._buckets[key] = (level, now)

    def __len__(self) -> int:
        return len(self._buckets)


class _Greeting(HelloGuard):
    """One accepted connection of a node, until its hello is accepted: the address it
    came from, the slot it takes then, and the node's admission rules for it."""

    def __init__(self, node: Node, address: str) -> None:
        super().__init__()
        self.node = node
        #: Its slot among max_connections, taken once its hello is accepted.
        self.slot: object | None = None
        self.address = address
        #: abort() asked for the refusal to be written (it counts against REFUSING).
        self.telling = False
        self._attempt = False

    def before_hello(self) -> None:
        throttle = self.node._throttle
        if throttle is not None:
            wait = throttle.take(self.address)
            if wait:
                raise ResourceExhausted(
                    f"node {self.node.id} refuses hellos from {self.address} for {wait:.1f}s more: "
                    "too many wrong tokens from there", retry_after=round(wait, 3),
                )
            self._attempt = True

    def after_hello(self, refused: TriodeError | None) -> None:
        node = self.node
        node._greetings.pop(self, None)  # no longer in its hello, whatever the verdict
        if self._attempt and not isinstance(refused, AuthenticationFailed):
            assert node._throttle is not None
            node._throttle.give_back(self.address)
        if isinstance(refused, AuthenticationFailed):
            node.admission["wrong_tokens"] += 1
        if refused is None:
            slot = object()
            if not node._take_slot(slot):  # taken while it said hello: refused after all
                node.admission["refused_full"] += 1
                raise node._full()
            self.slot = slot


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
        #: Where the HTTP cache door listens (``--http``), once it does.
        self.http_address: str | None = None
        #: Where the gRPC (REAPI) door listens (``--grpc``), once it does.
        self.grpc_address: str | None = None
        self.started = time.time()
        self._nursery = nursery
        self._serving: trio.Nursery = nursery  # replaced by open_node once parts are up
        self._connections: set[Connection] = set()
        self._connection_slots = trio.CapacityLimiter(config.max_connections)
        #: Accepted connections still in their hello, oldest first (see _admit).
        self._greetings: OrderedDict[_Greeting, None] = OrderedDict()
        self._refusing = 0  # connections being told why they are closed
        self._throttle = TokenThrottle() if config.token is not None else None
        self.admission = {"accepted": 0, "evicted": 0, "refused_full": 0, "wrong_tokens": 0}
        #: The bytes of blob data all connections may hold at once (see ByteBudget).
        self.budget = ByteBudget(config.buffer_budget)
        self._tls: ssl.SSLContext | None = None  # the server TLS context, set by open_node
        self._conn_config = replace(
            ConnectionConfig(node_id=self.id, required_token=config.token, handshake_timeout=HELLO_DEADLINE,
                             budget=self.budget),
            **config.connection,
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
            "admission": {
                **self.admission,
                "in_hello": len(self._greetings),
                "max_connections": self.config.max_connections,
                "max_unauthenticated": self.config.max_unauthenticated,
                "throttled_addresses": len(self._throttle) if self._throttle is not None else 0,
                "throttle_refusals": self._throttle.refused if self._throttle is not None else 0,
            },
            "buffered": {"bytes": self.budget.used, "limit": self.budget.limit,
                         "waiting": self.budget.waiting},
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

    async def _serve_connection(
        self, stream: trio.abc.Stream, config: ConnectionConfig, guard: HelloGuard | None = None
    ) -> None:
        try:
            async with open_connection(
                stream, config, handlers=self.router.get, initiator=False, guard=guard,
                takes_upload=self.router.takes_upload,
            ) as conn:
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
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: make room, back off, keep serving
                    log.warning("accept failed: %s", exc)
                    if self._greetings:
                        self._evict(next(iter(self._greetings)))
                    await trio.sleep(0.1)
                    continue
                self._admit(stream)

    def _admit(self, stream: trio.abc.Stream) -> None:
        """Take in a just-accepted connection (docs/design.md, "Connection limits"): it
        has HELLO_DEADLINE seconds to say its hello, among at most max_unauthenticated
        others (past that, the oldest of them is closed to make room); once its hello is
        accepted it takes one of max_connections slots. When those are all taken it is
        told so and closed at once."""
        greeting = _Greeting(self, _address_of(stream))
        if not self._connection_slots.available_tokens:
            self.admission["refused_full"] += 1
            self._tell(greeting, self._full())
            if greeting.telling:  # its task writes the ERROR, then hangs up
                self._serving.start_soon(self._serve_slot, stream, greeting)
            else:
                _close_now(stream)
            return
        if len(self._greetings) >= self.config.max_unauthenticated:
            self._evict(next(iter(self._greetings)))
        self.admission["accepted"] += 1
        self._greetings[greeting] = None
        self._serving.start_soon(self._serve_slot, stream, greeting)

    def _full(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"node {self.id} is at its connection limit ({self.config.max_connections} connections); "
            "try again later", retry_after=1.0,
        )

    def _take_slot(self, slot: object) -> bool:
        try:
            self._connection_slots.acquire_on_behalf_of_nowait(slot)
        except trio.WouldBlock:
            return False
        return True

    def _evict(self, victim: _Greeting) -> None:
        """Close the oldest connection still in its hello to make room for a newer one."""
        self._greetings.pop(victim, None)
        self.admission["evicted"] += 1
        self._tell(victim, ResourceExhausted(
            f"node {self.id} is at its connection limit for connections that have not finished "
            f"their hello ({self.config.max_unauthenticated}) and closes the oldest first; send "
            "the hello at once, or try again later", retry_after=1.0,
        ))

    def _tell(self, greeting: _Greeting, refusal: TriodeError) -> None:
        """Refuse a connection in its hello, with an ERROR frame while few others wait for theirs."""
        greeting.telling = self._refusing < REFUSING
        if greeting.telling:
            self._refusing += 1
        greeting.abort(refusal, tell=greeting.telling)

    async def _serve_slot(self, stream: trio.abc.Stream, greeting: _Greeting) -> None:
        try:
            # Until its first bytes come, a connection costs a task and a socket, nothing
            # more: an idle one (the usual flood) never builds the protocol's state.
            deadline = trio.current_time() + self._conn_config.handshake_timeout
            if not await self._first_bytes(stream, greeting, deadline):
                return
            config = replace(self._conn_config, handshake_timeout=max(deadline - trio.current_time(), 0.0))
            if self._tls is not None:
                stream = trio.SSLStream(stream, self._tls, server_side=True)
            await self._serve_connection(stream, config, greeting)
        finally:
            self._greetings.pop(greeting, None)
            if greeting.telling:
                self._refusing -= 1
            if greeting.slot is not None:
                self._connection_slots.release_on_behalf_of(greeting.slot)

    async def _first_bytes(self, stream: trio.abc.Stream, greeting: _Greeting, deadline: float) -> bool:
        """Wait for the connection's first bytes: False (and it is closed) if its hello
        deadline passed first, or the node refused it (telling it why, when it may)."""
        socket = getattr(stream, "socket", None)
        if socket is None:  # not a plain socket: the handshake waits for it
            return True
        with greeting.scope(), trio.move_on_at(deadline):
            await trio.lowlevel.wait_readable(socket)
            return True
        refusal = greeting.refusal
        if refusal is None:
            log.info("connection from %s ended: no hello within %.1fs of connecting",
                     greeting.address or "?", self._conn_config.handshake_timeout)
        else:
            log.info("connection from %s refused: %s", greeting.address or "?", refusal)
            if greeting.tell:  # (over TLS the handshake comes first: the 1 s covers it)
                out = stream if self._tls is None else trio.SSLStream(stream, self._tls, server_side=True)
                with trio.move_on_after(1):
                    try:
                        await out.send_all(WireProtocol.refusal_frame(refusal))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
        await trio.aclose_forcefully(stream)
        return False

    async def _drain(self) -> None:
        """Refuse new calls, let the ones in flight finish (bounded by shutdown_grace)."""
        for conn in list(self._connections):
            conn.drain()
        with trio.move_on_after(self.config.shutdown_grace):
            for conn in list(self._connections):
                await conn.wait_idle()


def _close_now(stream: trio.abc.Stream) -> None:
    """Hang up a just-accepted connection without waiting (its socket is ours alone)."""
    socket = getattr(stream, "socket", None)
    if socket is not None:
        socket.close()
