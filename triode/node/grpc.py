"""The gRPC door: a trio server for gRPC over HTTP/2 (``--grpc ADDRESS``), built on h2.

The protocol work is sans-I/O (:mod:`triode.wire.grpc`); this module adds the sockets
and the tasks, all in nurseries: one task per connection reading and dispatching, one
writing, and one task per call (a stream) in the connection's nursery. The services
(what each method does) are a table of :class:`Method` values; ``triode.node.reapi``
makes the REAPI ones. Why not grpcio's server: it runs its own threads and event loop,
outside every nursery, so a call could not be a task the node owns and cancels.

* **Deadlines** (``grpc-timeout``) are each call's cancel scope; when it fires the call
  ends with ``DEADLINE_EXCEEDED``.
* **A client's cancel** (RST_STREAM) cancels its call's scope: the handler and its work
  stop (an Execute nobody else waits for is cancelled, its processes killed). A call whose
  *connection* was lost is told so (:attr:`GrpcCall.lost`), so that Execute can keep its
  operation for a while for the client to resume with WaitExecution.
* **Backpressure** is HTTP/2 flow control: a message's bytes go back to the client's
  window only when the handler takes the message, and a handler sending waits while its
  stream's output (or the connection's unsent bytes) is over a bound.
* **Bounds**: connections (the node's connection slots, shared with its msgpack door),
  streams per connection, message size, the time to the first bytes.
* **Auth**: with a token, every call needs ``authorization: Bearer TOKEN`` metadata
  (``UNAUTHENTICATED`` otherwise). With the node's certificate, TLS with ALPN ``h2``.
* **Drain**: on shutdown new calls get ``UNAVAILABLE``; calls in flight get the node's
  shutdown grace, then are cancelled with the rest.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import trio
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from ..errors import InvalidArgument, ResourceExhausted, TriodeError
from ..proto import status_pb2
from ..wire import grpc as wire
from ..wire.grpc import Code, GrpcError, Request, make_status, status_of
from ..wire.transport import format_address, parse_address

if TYPE_CHECKING:
    from .node import Node

__all__ = ["GrpcServer", "GrpcCall", "Method", "serve_grpc", "server_ssl_context"]

log = logging.getLogger("triode.grpc")

#: Bytes asked of the socket at once.
RECEIVE_SIZE = 256 * 1024
#: A handler sending waits while its stream has more than this waiting for the client's window…
STREAM_HIGH = 1024 * 1024
#: …or while the connection has more than this waiting for the socket.
SOCKET_HIGH = 4 * 1024 * 1024
#: The send buffer of a loopback connection (the kernel doubles it; see
#: :func:`_limit_local_send_buffer`).
LOCAL_SNDBUF = 256 * 1024
#: Buffers written by one system call at most (see :func:`send_buffers`).
GATHER = 64
#: A new connection must send its first bytes within this many seconds.
PREFACE_TIMEOUT = 10.0
#: A client that takes longer than this to take what is queued for it (a few MiB at most:
#: :data:`SOCKET_HIGH` and the messages in flight) is dropped, its calls cancelled: its
#: handlers would otherwise wait for room forever.
WRITE_TIMEOUT = 60.0
#: Bytes of a TLS handshake, at most this many seconds.
HANDSHAKE_TIMEOUT = 10.0

M = TypeVar("M")

_OK = make_status(Code.OK)


@dataclass(frozen=True)
class Method:
    """One RPC of a service: how its request parses and who handles it.

    A unary or server-streaming handler is ``handler(request, call)``; a client-streaming one
    is ``handler(requests, call)`` with ``requests`` an async iterator of parsed messages.
    Whatever the handler returns (a message, or None) is sent as the last message; a
    streaming handler sends the others with :meth:`GrpcCall.send`.
    """

    request_type: Any
    handler: Callable[[Any, GrpcCall], Awaitable[Any]]
    client_streaming: bool = False


class GrpcCall:
    """One call, as its handler sees it: the request's head, its stream, how it ended."""

    def __init__(self, conn: _Connection, request: Request) -> None:
        self._conn = conn
        self.request = request
        self.stream_id = request.stream_id
        self.peer = conn.peer
        deadline = math.inf if request.timeout is None else trio.current_time() + request.timeout
        self.scope = trio.CancelScope(deadline=deadline)
        self._inbox: deque[tuple[bytes, int]] = deque()
        self._ended = False
        self._lot = trio.lowlevel.ParkingLot()
        #: The client reset the stream (or this side refused it): nobody hears an answer.
        self.reset = False
        #: The connection went away under the call (not a cancel by the client).
        self.lost = False

    @property
    def metadata(self) -> dict[str, list[str | bytes]]:
        return self.request.metadata

    @property
    def server(self) -> GrpcServer:
        return self._conn.server

    # -- fed by the connection --------------------------------------------------------

    def _deliver(self, data: bytes, size: int) -> None:
        self._inbox.append((data, size))
        self._lot.unpark_all()

    def _end(self) -> None:
        self._ended = True
        self._lot.unpark_all()

    def _cancel(self, *, reset: bool = False, lost: bool = False) -> None:
        self.reset = self.reset or reset
        self.lost = self.lost or lost
        self.scope.cancel()
        self._lot.unpark_all()

    # -- for the handler -------------------------------------------------------------

    async def receive(self) -> bytes | None:
        """The next message's bytes, or None once the client has sent its last."""
        while not self._inbox:
            if self._ended:
                await trio.lowlevel.checkpoint()
                return None
            await self._lot.park()
        await trio.lowlevel.checkpoint_if_cancelled()
        data, size = self._inbox.popleft()
        self._conn.consumed(self.stream_id, size)
        return data

    async def read_one(self, message_type: type[M]) -> M:
        """The request of a unary or server-streaming call: exactly one message."""
        data = await self.receive()
        if data is None:
            raise GrpcError(Code.INVALID_ARGUMENT, "the call carried no request message")
        if await self.receive() is not None:
            raise GrpcError(Code.INVALID_ARGUMENT, "a unary call carried more than one request message")
        return parse(message_type, data)

    def messages(self, message_type: type[M]) -> _Messages[M]:
        return _Messages(self, message_type)

    async def send(self, message: Any) -> None:
        """Send one message; waits while too much of this call's output is unsent."""
        await self.send_raw(message.SerializeToString())

    async def send_raw(self, payload: bytes, body: bytes | memoryview = b"") -> None:
        """Send one serialized message, ``payload`` then ``body`` (a large body uncopied)."""
        conn = self._conn
        proto = conn.proto
        if not proto.is_open(self.stream_id):
            await trio.lowlevel.checkpoint()
            raise trio.BrokenResourceError("the stream is closed")
        proto.send_message(self.stream_id, payload, body)
        conn.wake()
        while proto.outbound_pending(self.stream_id) > STREAM_HIGH or proto.buffered > SOCKET_HIGH:
            await conn.room.park()
        await trio.lowlevel.checkpoint_if_cancelled()


class _Messages(Generic[M]):
    """The requests of a client-streaming call, parsed as they are taken (not an async
    generator: a handler that stops early leaves nothing to finalize)."""

    def __init__(self, call: GrpcCall, message_type: type[M]) -> None:
        self._call = call
        self._type = message_type

    def __aiter__(self) -> _Messages[M]:
        return self

    async def __anext__(self) -> M:
        data = await self._call.receive()
        if data is None:
            raise StopAsyncIteration
        return parse(self._type, data)


def parse(message_type: type[M], data: bytes) -> M:
    """A request message from its bytes; INVALID_ARGUMENT when they do not parse."""
    try:
        return message_type.FromString(data)  # type: ignore[attr-defined]
    except DecodeError as exc:
        name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", message_type.__name__)
        raise InvalidArgument(f"the request is not a valid {name} message: {exc}") from None


class _Connection:
    """One client connection: its protocol state, its calls, its reader and writer."""

    def __init__(self, server: GrpcServer, stream: trio.abc.Stream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.proto = wire.ServerConnection(max_message=server.max_message, max_streams=server.max_streams)
        self.calls: dict[int, GrpcCall] = {}
        self._writer_lot = trio.lowlevel.ParkingLot()
        #: Set when the writer has sent everything of a closed connection (its GOAWAY).
        self._written = trio.Event()
        #: The socket failed under the writer.
        self._broken = False
        #: Handlers waiting for room to send.
        self.room = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None

    def wake(self) -> None:
        self._writer_lot.unpark_all()

    def consumed(self, stream_id: int, size: int) -> None:
        self.proto.consumed(stream_id, size)
        self.wake()

    async def run(self) -> None:
        """Serve until the client goes (or this side closes); its calls are cancelled then,
        told the connection was lost. A cancelled run (the node stopping) cancels them too."""
        self.proto.initiate()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                ended = False
                try:
                    await self._reader()
                    ended = True
                finally:
                    for call in list(self.calls.values()):
                        call._cancel(lost=ended or self._broken)
                    nursery.cancel_scope.cancel()
        finally:
            self.server._connections.discard(self)
            self.server._changed()

    async def _writer(self) -> None:
        proto, stream = self.proto, self.stream
        try:
            while True:
                buffers = proto.buffers_to_send()
                if not buffers:
                    self.room.unpark_all()
                    if proto.closed:
                        self._written.set()
                        return
                    await self._writer_lot.park()
                    continue
                with trio.move_on_after(WRITE_TIMEOUT) as stalled:
                    await send_buffers(stream, buffers)
                if stalled.cancelled_caught:
                    log.info("gRPC client %s did not take what it was sent within %gs; dropping it",
                             self.peer, WRITE_TIMEOUT)
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("gRPC client %s: the connection broke: %r", self.peer, exc)
        self._broken = True
        self._written.set()
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()  # the reader and every call stop with it

    async def _receive(self) -> bytes | bytearray:
        try:
            return await self.stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("gRPC client %s: the connection broke: %r", self.peer, exc)
            return b""

    async def _reader(self) -> None:
        proto = self.proto
        first = True
        while True:
            if first:
                with trio.move_on_after(PREFACE_TIMEOUT):
                    data = await self._receive()
                    first = False
                if first:
                    log.info("gRPC client %s sent nothing within %gs; closing", self.peer, PREFACE_TIMEOUT)
                    return
            else:
                data = await self._receive()
            if not data:
                return
            for event in proto.receive_data(data):
                self._on_event(event)
            self.wake()
            if proto.closed:
                await self._flush_goaway()
                return

    async def _flush_goaway(self) -> None:
        """Let the writer send what is left (a GOAWAY), for a second at most."""
        self.wake()
        with trio.move_on_after(1.0):
            await self._written.wait()

    def _on_event(self, event: wire.Event) -> None:
        if isinstance(event, wire.MessageReceived):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call._deliver(event.data, event.size)
            else:
                self.proto.consumed(event.stream_id, event.size)
        elif isinstance(event, wire.RequestReceived):
            self._start(event.request)
        elif isinstance(event, wire.RequestEnded):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call._end()
        elif isinstance(event, wire.StreamReset):
            call = self.calls.get(event.stream_id)
            if call is not None:
                call._cancel(reset=True)
        elif isinstance(event, wire.StreamWritable):
            self.room.unpark_all()
        elif isinstance(event, wire.ConnectionEnded):
            if event.error:
                log.info("gRPC client %s: %s", self.peer, event.error)

    def _start(self, request: Request) -> None:
        server = self.server
        if server.draining:
            self.proto.finish(request.stream_id, make_status(Code.UNAVAILABLE, "the node is shutting down"))
            return
        if len(self.calls) >= server.max_streams:
            # Streams the client reset are closed at once, but their handlers may still be
            # winding down (an Execute stopping its run): those count too.
            self.proto.finish(request.stream_id, make_status(
                Code.RESOURCE_EXHAUSTED, f"{len(self.calls)} calls are still running on this connection; "
                "retry once some have ended"))
            return
        call = GrpcCall(self, request)
        self.calls[request.stream_id] = call
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_call, call, name=f"grpc {request.path}")

    async def _serve_call(self, call: GrpcCall) -> None:
        server = self.server
        server.active += 1
        try:
            with call.scope:
                status = await server.dispatch(call)
            if call.scope.cancelled_caught:
                if call.reset or call.lost:
                    return
                status = make_status(Code.DEADLINE_EXCEEDED, f"the call's deadline "
                                     f"({call.request.timeout:g}s) passed before it finished")
            self.proto.finish(call.stream_id, status)
            self.wake()
        finally:
            self.calls.pop(call.stream_id, None)
            server.active -= 1
            server._changed()
            if server.draining and not self.calls:  # the last call of a draining connection
                self.proto.close()
                self.wake()


async def send_buffers(stream: trio.abc.Stream, buffers: list[bytes | bytearray | memoryview]) -> None:
    """Write ``buffers`` in order: on a plain socket as gathered writes (``sendmsg``, up to
    :data:`GATHER` buffers each, none of them joined or copied), otherwise one at a time."""
    sock = stream.socket if isinstance(stream, trio.SocketStream) else None
    if sock is None or len(buffers) == 1 or not hasattr(sock, "sendmsg"):
        for data in buffers:
            await stream.send_all(data)
        return
    views = deque(memoryview(b) for b in buffers)
    try:
        while views:
            sent = await sock.sendmsg(list(islice(views, GATHER)))
            while sent:
                head = views[0]
                if sent < len(head):
                    views[0] = head[sent:]
                    break
                sent -= len(head)
                views.popleft()
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc


class Throttle(Protocol):
    """The node's count of wrong tokens per address (``TokenThrottle``)."""

    def take(self, address: str) -> float: ...

    def give_back(self, address: str) -> None: ...


class GrpcServer:
    """The services behind one listener, and the connections it serves.

    It is ``node.parts["grpc"]`` too, for ``node.info()`` and the metrics (it is not closed
    with the parts: the node's serving nursery owns it)."""

    name = "grpc"

    def __init__(
        self,
        services: dict[str, Method],
        *,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connection_slots: trio.CapacityLimiter | None = None,
        throttle: Throttle | None = None,
        max_message: int = wire.DEFAULT_MAX_MESSAGE,
        max_streams: int = 100,
    ) -> None:
        self.services = services
        self._token = None if token is None else f"Bearer {token}".encode()
        self.ssl_context = ssl_context
        self.slots = connection_slots or trio.CapacityLimiter(1024)
        #: The node's count of wrong tokens per address (``TokenThrottle``), when it has one.
        self.throttle = throttle
        self.max_message = max_message
        self.max_streams = max_streams
        self.address: str | None = None
        self.draining = False
        #: Calls being served.
        self.active = 0
        self._connections: set[_Connection] = set()
        self._idle = trio.lowlevel.ParkingLot()
        self._accept_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        #: More figures for info() (the services' counters).
        self.counters: list[Callable[[], dict[str, Any]]] = []

    @property
    def nursery(self) -> trio.Nursery:
        """The server's own nursery (connections; work that outlives one call, bounded)."""
        assert self._nursery is not None, "the server is not serving"
        return self._nursery

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "connections": len(self._connections),
                               "calls": self.active}
        for source in self.counters:
            out.update(source())
        return out

    def _changed(self) -> None:
        self._idle.unpark_all()

    # -- serving -------------------------------------------------------------------

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept on ``listeners`` and serve until cancelled."""
        sockname = listeners[0].socket.getsockname()
        self.address = format_address(sockname[0], sockname[1])
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._accept_all, listeners)
            task_status.started(self)

    async def _accept_all(self, listeners: list[trio.SocketListener]) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self._accept, listener)

    async def _accept(self, listener: trio.SocketListener) -> None:
        async with listener:
            while True:
                slot = object()
                await self.slots.acquire_on_behalf_of(slot)
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    self.slots.release_on_behalf_of(slot)
                    log.warning("gRPC accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    self.slots.release_on_behalf_of(slot)
                    raise
                self.nursery.start_soon(self._serve_slot, stream, slot)

    async def _serve_slot(self, stream: trio.SocketStream, slot: object) -> None:
        try:
            await self.serve_stream(stream)
        finally:
            self.slots.release_on_behalf_of(slot)

    async def serve_stream(self, stream: trio.abc.Stream) -> None:
        """Serve one connection (TLS first when the server has a certificate) until it ends."""
        peer = _peer_of(stream)
        _limit_local_send_buffer(stream)
        try:
            if self.ssl_context is not None:
                tls = trio.SSLStream(stream, self.ssl_context, server_side=True)
                with trio.fail_after(HANDSHAKE_TIMEOUT):
                    await tls.do_handshake()
                stream = tls
            conn = _Connection(self, stream, peer)
            self._connections.add(conn)
            await conn.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ssl.SSLError) as exc:
            log.info("gRPC connection from %s ended: %r", peer, exc)
        except Exception:
            # A bug reached by one connection's bytes must not take the node down with it.
            log.exception("gRPC connection from %s failed; serving the others", peer)
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)

    # -- calls ---------------------------------------------------------------------

    def _authenticate(self, call: GrpcCall) -> None:
        """UNAUTHENTICATED without the right ``authorization: Bearer TOKEN``. With the node's
        wrong-token throttle, an address that sent too many wrong ones is refused before its
        token is even compared (RESOURCE_EXHAUSTED, with a RetryInfo)."""
        if self._token is None:
            return
        throttle = self.throttle
        host = call.peer.rpartition(":")[0].strip("[]")
        if throttle is not None:
            wait = throttle.take(host)
            if wait:
                raise ResourceExhausted(f"calls from {host} are refused for {wait:.1f}s more: too many "
                                        "wrong tokens from there", retry_after=round(wait, 3))
        given = call.request.get("authorization")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode("latin-1"), self._token):
            raise GrpcError(Code.UNAUTHENTICATED,
                            "this node needs 'authorization: Bearer TOKEN' metadata with its token")
        if throttle is not None:
            throttle.give_back(host)  # only wrong tokens count

    async def dispatch(self, call: GrpcCall) -> status_pb2.Status:
        """Run the call's handler; the status it ends with (errors mapped by status_of)."""
        try:
            self._authenticate(call)
            method = self.services.get(call.request.path)
            if method is None:
                raise GrpcError(Code.UNIMPLEMENTED, f"method {call.request.path[:200]} is not served here")
            if method.client_streaming:
                response = await method.handler(call.messages(method.request_type), call)
            else:
                response = await method.handler(await call.read_one(method.request_type), call)
            if response is not None:
                await call.send(response)
            return _OK
        except BaseExceptionGroup as group:
            _, others = group.split(trio.Cancelled)
            if others is None:
                raise
            leaf: BaseException = others
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            if not isinstance(leaf, (TriodeError, GrpcError)):
                log.error("gRPC %s failed", call.request.path, exc_info=leaf)
            return status_of(leaf)
        except (TriodeError, GrpcError) as exc:
            return status_of(exc)
        except trio.BrokenResourceError:
            return make_status(Code.CANCELLED, "the stream was closed")
        except Exception as exc:
            log.exception("gRPC %s failed", call.request.path)
            return status_of(exc)

    # -- shutting down ------------------------------------------------------------

    async def drain(self, grace: float) -> None:
        """Stop accepting; answer new calls UNAVAILABLE; give calls in flight ``grace`` seconds."""
        self.draining = True
        self._accept_scope.cancel()
        for conn in list(self._connections):
            if not conn.calls:
                conn.proto.close()
                conn.wake()
        with trio.move_on_after(grace):
            while self.active:
                await self._idle.park()


def _limit_local_send_buffer(stream: trio.abc.Stream) -> None:
    """On a loopback connection, a send buffer of :data:`LOCAL_SNDBUF` instead of the kernel's
    autotuned one (up to ``tcp_wmem``'s 4 MiB).

    Client and node then share the CPUs, and a download that runs megabytes ahead of its
    reader makes the reader pay for it: the kernel moves those bytes in the reader's
    context, and the client buffers more than it reads (measured: a grpcio client's system
    time a third lower, downloads about a fifth faster). Over a network the buffer must
    cover the bandwidth-delay product, so only loopback connections are limited."""
    sock = getattr(stream, "socket", None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        address = ipaddress.ip_address(str(sock.getpeername()[0]).split("%")[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_loopback:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SNDBUF)
    except (OSError, ValueError):
        pass


def _peer_of(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
        return format_address(str(host), int(port))
    except (OSError, ValueError, TypeError):
        return "?"


def server_ssl_context(cert: Any, key: Any) -> ssl.SSLContext:
    """The TLS context of the gRPC door: the node's certificate, ALPN ``h2``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(f"cannot load the TLS certificate {cert} and key {key}: {exc}") from None
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def serve_grpc(
    node: Node,
    services: dict[str, Method],
    *,
    task_status: trio.TaskStatus[GrpcServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The node's gRPC door on ``node.config.grpc``: reports the :class:`GrpcServer` once it
    listens, and serves until cancelled."""
    config = node.config
    assert config.grpc is not None
    host, port = parse_address(config.grpc)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise InvalidArgument(f"cannot serve gRPC on {config.grpc}: {exc.strerror or exc}") from None
    tls = server_ssl_context(config.tls_cert, config.tls_key) if config.tls_cert is not None else None
    server = GrpcServer(services, token=config.token, ssl_context=tls,
                        connection_slots=trio.CapacityLimiter(config.max_connections),
                        throttle=getattr(node, "_throttle", None))
    await server.serve(listeners, task_status=task_status)

