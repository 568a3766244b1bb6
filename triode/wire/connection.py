"""One Triode connection over any :class:`trio.abc.Stream`.

After a hello from each side, either side may call the other. Calls are multiplexed
by id (the side that opened the connection uses odd ids, the other even ones). A call
may stream bytes in either direction; every stream is flow-controlled by credits the
receiver grants, so a slow reader bounds the bytes in flight for its own call and
never stalls the others. The caller's deadline travels with the call, and a caller
that leaves (cancelled, timed out, or done early) sends CANCEL, which cancels the
handler on the far side.

Everything a connection starts lives in the nursery of :func:`open_connection`; the
connection never cancels the body of that block: when it dies (peer gone, protocol
error, dead peer) it fails the calls in flight with :class:`ConnectionClosed` instead.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from .. import errors
from ..errors import ConnectionClosed, ProtocolError, TriodeError
from . import codec
from .codec import CALL, CANCEL, CREDIT, DATA, END, ERROR, GOODBYE, HELLO, PING, PONG, REPLY

__all__ = [
    "PROTOCOL_VERSION",
    "ConnectionConfig",
    "PeerHello",
    "Connection",
    "OutgoingCall",
    "IncomingCall",
    "Handler",
    "open_connection",
]

log = logging.getLogger("triode.wire")

PROTOCOL_VERSION = 1

#: Frames that arrive before the hello is accepted are held to this size, so an
#: unauthenticated peer cannot make us buffer a large frame.
HELLO_MAX_FRAME = 64 * 1024

_RECEIVE_SIZE = 256 * 1024

#: Control frames (CREDIT, PONG, CANCEL, refusals) allowed to queue beyond the send buffer.
CONTROL_SLACK = 1024 * 1024

Handler = Callable[["IncomingCall"], Awaitable[Any]]


@dataclass(frozen=True)
class ConnectionConfig:
    """What one side of a connection promises and demands. Every limit is per connection."""

    node_id: str
    #: Token we present in our hello (as a client).
    token: str | None = field(default=None, repr=False)
    #: Token we demand from the peer's hello (as a node); None accepts anyone.
    required_token: str | None = field(default=None, repr=False)
    features: frozenset[str] = frozenset({"zstd"})
    #: Initial credit, in bytes, we grant the peer on each stream it sends us.
    window: int = 4 * 1024 * 1024
    #: Largest frame body we accept.
    max_frame: int = codec.DEFAULT_MAX_FRAME
    #: Calls the peer may have open with us at once; more are refused RESOURCE_EXHAUSTED.
    max_calls: int = 256
    #: Largest DATA chunk we send.
    max_chunk: int = 1024 * 1024
    #: Bytes queued for the socket before senders of streams and replies must wait.
    send_buffer: int = 4 * 1024 * 1024
    #: Send a PING after this many idle seconds; declare the peer dead after dead_after.
    keepalive_interval: float = 10.0
    dead_after: float = 30.0
    handshake_timeout: float = 10.0

    def hello(self) -> dict[str, Any]:
        hello: dict[str, Any] = {
            "version": PROTOCOL_VERSION,
            "node": self.node_id,
            "features": sorted(self.features),
            "window": self.window,
            "max_frame": self.max_frame,
            "max_calls": self.max_calls,
        }
        if self.token is not None:
            hello["token"] = self.token
        return hello


@dataclass(frozen=True)
class PeerHello:
    """What the far side said about itself in its hello."""

    version: int
    node: str
    features: frozenset[str]
    window: int
    max_frame: int
    max_calls: int
    token: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> PeerHello:
        def need(key: str, typ: type, check: Callable[[Any], bool], what: str) -> Any:
            value = body.get(key)
            if type(value) is not typ or not check(value):
                raise ProtocolError(f"hello field {key!r} must be {what}, got {value!r}")
            return value

        version = need("version", int, lambda v: v >= 0, "a protocol version number")
        if version != PROTOCOL_VERSION:
            raise errors.IncompatibleVersion(
                f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}; "
                "upgrade the older of the two",
                peer_version=version,
                version=PROTOCOL_VERSION,
            )
        features = need("features", list, lambda v: all(isinstance(f, str) for f in v), "a list of strings")
        token = body.get("token")
        if token is not None and not isinstance(token, str):
            raise ProtocolError("hello field 'token' must be a string")
        return cls(
            version=version,
            node=need("node", str, lambda v: 0 < len(v) <= 256, "a node id of 1-256 characters"),
            features=frozenset(features),
            window=need("window", int, lambda v: 1024 <= v <= 2**30, "1 KiB to 1 GiB"),
            max_frame=need("max_frame", int, lambda v: 64 * 1024 <= v <= 2**31, "64 KiB to 2 GiB"),
            max_calls=need("max_calls", int, lambda v: 1 <= v <= 65536, "1 to 65536"),
            token=token,
        )


def _wire_error(exc: BaseException) -> TriodeError | None:
    """The TriodeError to report for an exception raised by a handler (None: a bug)."""
    if isinstance(exc, ConnectionClosed):
        # The handler's own connection to a third node died; the caller's is fine, so it
        # must not read this as its own connection closing.
        return errors.Unavailable(f"a node this call needed went away: {exc.message}", **exc.details)
    if isinstance(exc, TriodeError):
        return exc
    if isinstance(exc, trio.TooSlowError):
        return errors.DeadlineExceeded(f"timed out: {exc}" if str(exc) else "timed out")
    if isinstance(exc, BaseExceptionGroup):
        for leaf in exc.exceptions:
            found = _wire_error(leaf)
            if found is not None:
                return found
    return None


class _Inbound:
    """Bytes arriving on one call, buffered up to the credit we granted."""

    __slots__ = ("_conn", "_id", "_chunks", "_ended", "_error", "_lot", "_allowance", "_consumed")

    def __init__(self, conn: Connection, call_id: int, *, open_: bool) -> None:
        self._conn = conn
        self._id = call_id
        self._chunks: deque[bytes] = deque()
        self._ended = not open_
        self._error: TriodeError | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._allowance = conn.config.window
        self._consumed = 0

    def on_data(self, chunk: bytes) -> None:
        if self._ended:
            raise ProtocolError(f"DATA on call {self._id} after its stream ended")
        if len(chunk) > self._allowance:
            raise ProtocolError(
                f"peer sent {len(chunk)} bytes on call {self._id} with only {self._allowance} of credit"
            )
        self._allowance -= len(chunk)
        self._chunks.append(chunk)
        self._lot.unpark_all()

    def on_end(self) -> None:
        self._ended = True
        self._lot.unpark_all()

    def fail(self, error: TriodeError) -> None:
        if self._error is None:
            self._error = error
        self._ended = True
        self._lot.unpark_all()

    async def receive(self) -> bytes | None:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            await self._lot.park()
        chunk = self._chunks.popleft()
        self._credit_back(len(chunk))
        return chunk

    async def receive_many(self, limit: int) -> list[bytes] | None:
        """The next chunk and whatever else is already here, up to ``limit`` bytes in all
        (at least one chunk); None at the end of the stream."""
        first = await self.receive()
        if first is None:
            return None
        out = [first]
        size = len(first)
        chunks = self._chunks
        while chunks and size + len(chunks[0]) <= limit:
            chunk = chunks.popleft()
            size += len(chunk)
            out.append(chunk)
        self._credit_back(size - len(first))
        return out

    def _credit_back(self, n: int) -> None:
        self._consumed += n
        if self._consumed >= self._conn.config.window // 2 and not self._ended:
            self._allowance += self._consumed
            self._conn._send_nowait(codec.encode([CREDIT, self._id, self._consumed]))
            self._consumed = 0


class _Outbound:
    """Credit for the bytes we may still send on one call."""

    __slots__ = ("_conn", "_id", "_credit", "_finished", "_lot")

    def __init__(self, conn: Connection, call_id: int) -> None:
        self._conn = conn
        self._id = call_id
        self._credit = conn.peer.window
        self._finished = False
        self._lot = trio.lowlevel.ParkingLot()

    def on_credit(self, n: int) -> None:
        self._credit += n
        self._lot.unpark_all()

    def finish(self) -> None:
        self._finished = True
        self._lot.unpark_all()

    async def send(self, data: bytes | bytearray | memoryview) -> bool:
        conn = self._conn
        view = memoryview(data).cast("B")
        # An immutable buffer (bytes) is queued as it is and written straight from it;
        # anything the caller could change after we return is copied first.
        keep = view.readonly
        chunk_limit = min(conn.config.max_chunk, conn.peer.max_frame - 64)
        while view:
            while self._credit <= 0 and not self._finished:
                conn._check_open()
                await self._lot.park()
            if self._finished:
                return False
            n = min(len(view), self._credit, chunk_limit)
            self._credit -= n
            piece = view[:n]
            await conn._send_frame(codec.data_header(self._id, n), piece if keep else bytes(piece))
            view = view[n:]
        return not self._finished


class OutgoingCall:
    """The caller's side of a streaming call (from :meth:`Connection.open_call`)."""

    def __init__(self, conn: Connection, call_id: int, method: str, *, upload: bool, download: bool) -> None:
        self.id = call_id
        self.method = method
        self._conn = conn
        self._upload_ended = not upload
        # A unary call has no streams: their state is only made for the directions in use.
        self._inbound = _Inbound(conn, call_id, open_=True) if download else None
        self._outbound = _Outbound(conn, call_id) if upload else None
        self._outcome: tuple[bool, Any] | None = None
        self._lot: trio.lowlevel.ParkingLot | None = None  # made by result(), if it has to wait
        self._waiter: trio.lowlevel.Task | None = None  # Connection.call's task, waiting

    @property
    def done(self) -> bool:
        """Whether the far side has answered (a result or an error)."""
        return self._outcome is not None

    async def send(self, data: bytes | bytearray | memoryview) -> bool:
        """Upload bytes. False once the far side has answered and wants no more."""
        if self._upload_ended or self._outbound is None:
            raise RuntimeError("send() after end(), or on a call opened without upload=True")
        return await self._outbound.send(data)

    def end(self) -> None:
        """Mark the end of the upload."""
        if not self._upload_ended:
            self._upload_ended = True
            if self._outcome is None:
                self._conn._send_nowait(codec.encode([END, self.id]))

    async def receive(self) -> bytes | None:
        """The next downloaded chunk; None at the end of the stream."""
        assert self._inbound is not None  # open_call always opens the download
        return await self._inbound.receive()

    async def receive_many(self, limit: int) -> list[bytes] | None:
        """The next downloaded chunk and those already buffered behind it, up to ``limit``
        bytes (at least one chunk); None at the end of the stream."""
        assert self._inbound is not None
        return await self._inbound.receive_many(limit)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.receive()) is not None:
            yield chunk

    async def result(self) -> Any:
        """Wait for the far side's answer (ending the upload first if still open)."""
        self.end()
        while self._outcome is None:
            if self._lot is None:
                self._lot = trio.lowlevel.ParkingLot()
            await self._lot.park()
        ok, value = self._outcome
        if ok:
            return value
        raise errors.from_wire(*value)

    # -- driven by the connection ------------------------------------------------------

    def _resolve(self, ok: bool, value: Any) -> None:
        if self._outcome is not None:
            return
        self._outcome = (ok, value)
        if self._outbound is not None:
            self._outbound.finish()
        if self._inbound is not None:
            if ok:
                self._inbound.on_end()
            else:
                self._inbound.fail(errors.from_wire(*value))
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None
        if self._lot is not None:
            self._lot.unpark_all()


class IncomingCall:
    """The handler's side of a call: its arguments, the upload, and the download stream."""

    def __init__(
        self,
        conn: Connection,
        call_id: int,
        method: str,
        args: Any,
        *,
        upload: bool,
        download: bool,
        deadline: float,
    ) -> None:
        self.id = call_id
        self.method = method
        self.args = args
        self.connection = conn
        self.deadline = deadline
        self.download = download
        self._inbound = _Inbound(conn, call_id, open_=True) if upload else None
        self._outbound = _Outbound(conn, call_id) if download else None
        self._scope = trio.CancelScope(deadline=deadline)
        self._cancel_requested = False

    @property
    def peer(self) -> PeerHello:
        return self.connection.peer

    async def receive(self) -> bytes | None:
        """The next uploaded chunk; None at the end of the upload (at once without one)."""
        if self._inbound is None:
            await trio.lowlevel.checkpoint()
            return None
        return await self._inbound.receive()

    async def receive_many(self, limit: int) -> list[bytes] | None:
        """The next uploaded chunk and those already buffered behind it, up to ``limit``
        bytes (at least one chunk); None at the end of the upload."""
        if self._inbound is None:
            await trio.lowlevel.checkpoint()
            return None
        return await self._inbound.receive_many(limit)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        while (chunk := await self.receive()) is not None:
            yield chunk

    async def send(self, data: bytes | bytearray | memoryview) -> None:
        """Stream bytes back to the caller (who must have opened the call with open_call)."""
        if self._outbound is None:
            raise errors.InvalidArgument(
                f"{self.method} streams its result; call it with open_call(), not call()"
            )
        await self._outbound.send(data)


class Connection:
    """A live, handshaken connection. Make one with :func:`open_connection`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        config: ConnectionConfig,
        handlers: Callable[[str], Handler | None] | None,
        *,
        initiator: bool,
    ) -> None:
        self.stream = stream
        self.config = config
        self._lookup = handlers
        self._initiator = initiator
        self._ids = itertools.count(1 if initiator else 2, 2)
        self._peer_parity = 0 if initiator else 1
        self.peer: PeerHello  # set by the handshake
        self._calls: dict[int, OutgoingCall] = {}
        self._served: dict[int, IncomingCall] = {}
        self._decoder = codec.Decoder(HELLO_MAX_FRAME)
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._space_lot = trio.lowlevel.ParkingLot()
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()
        self._served_idle = trio.Event()
        self._served_idle.set()
        self.close_reason: ConnectionClosed | None = None
        self._draining = False
        self._peer_draining = False
        self._call_slots = trio.Semaphore(1)  # replaced by the peer's max_calls in the hello
        self._last_receive = 0.0
        self._ping_nonce = itertools.count()
        self._last_peer_id = 0
        # Calls from the peer wait here for a worker task (see _worker).
        self._pending: deque[tuple[IncomingCall, Handler]] = deque()
        self._idle_workers: list[trio.lowlevel.Task] = []

    # -- public --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def features(self) -> frozenset[str]:
        """Features both sides support."""
        return self.config.features & self.peer.features

    @property
    def serving(self) -> int:
        """Calls from the peer that we are handling right now."""
        return len(self._served)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def call(self, method: str, args: Any = None) -> Any:
        """A unary call: send ``args``, return the result or raise the far side's error.

        The caller's deadline (its enclosing cancel scopes) travels with the call.
        """
        # The hot path: the same steps as _start_call, without a context manager.
        meta = self._call_meta(upload=False, download=False)
        await self._acquire_slot()
        try:
            call_id, frame = self._encode_call(method, args, meta)
            call = OutgoingCall(self, call_id, method, upload=False, download=False)
            self._calls[call_id] = call
            try:
                await self._send_frame(frame)
                if call._outcome is None:
                    # Wait for _resolve to wake this task: the cheapest way trio has.
                    call._waiter = trio.lowlevel.current_task()

                    def abort(_: Any) -> trio.lowlevel.Abort:
                        call._waiter = None
                        return trio.lowlevel.Abort.SUCCEEDED

                    await trio.lowlevel.wait_task_rescheduled(abort)
                else:
                    await trio.lowlevel.checkpoint()
            finally:
                self._forget(call)
        finally:
            self._call_slots.release()
        ok, value = call._outcome
        if ok:
            return value
        raise errors.from_wire(*value)

    @asynccontextmanager
    async def open_call(
        self, method: str, args: Any = None, *, upload: bool = False
    ) -> AsyncIterator[OutgoingCall]:
        """A streaming call. Leaving the block before the answer cancels it on the far side."""
        async with self._start_call(method, args, upload=upload, download=True) as call:
            yield call

    def drain(self) -> None:
        """Tell the peer we start no new calls and accept none; calls in flight go on."""
        if not self._draining and not self.closed:
            self._draining = True
            self._send_nowait(codec.encode([GOODBYE, "node is shutting down"]))

    async def wait_idle(self) -> None:
        """Wait until no call from the peer is being handled and everything queued is written."""
        while not self.closed and (self._served or self._out_bytes):
            if self._served:
                await self._served_idle.wait()
            else:
                await self._space_lot.park()

    def close(self, reason: str = "connection closed by this side") -> None:
        """Close now: calls in flight fail with ConnectionClosed, handlers are cancelled."""
        self._close(ConnectionClosed(reason))

    # -- calls we make ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.close_reason is not None:
            raise ConnectionClosed(self.close_reason.message, **self.close_reason.details)

    def _call_meta(self, *, upload: bool, download: bool) -> dict[str, Any]:
        self._check_open()
        if self._peer_draining:
            raise ConnectionClosed(f"node {self.peer.node} is shutting down", node=self.peer.node)
        meta: dict[str, Any] = {}
        deadline = trio.current_effective_deadline()
        if deadline != math.inf:
            meta["timeout"] = max(deadline - trio.current_time(), 0.0)
        if upload:
            meta["up"] = True
        if download:
            meta["down"] = True
        return meta

    def _encode_call(self, method: str, args: Any, meta: dict[str, Any]) -> tuple[int, bytes]:
        call_id = next(self._ids)
        try:
            frame = codec.encode([CALL, call_id, method, args, meta])
        except ProtocolError as exc:
            raise errors.InvalidArgument(f"arguments of {method} cannot be sent: {exc}") from None
        if len(frame) - 4 > self.peer.max_frame:
            raise errors.TooLarge(
                f"arguments of {method} are {len(frame) - 4} bytes, over node {self.peer.node}'s "
                f"frame limit of {self.peer.max_frame}; stream large data instead",
                size=len(frame) - 4, limit=self.peer.max_frame,
            )
        return call_id, frame

    def _forget(self, call: OutgoingCall) -> None:
        """The caller is done with ``call``: unanswered, it is cancelled on the far side."""
        del self._calls[call.id]
        if call._outcome is None:
            call._resolve(False, ("CANCELLED", "call left before its answer", {}))
            if self.close_reason is None:
                self._send_nowait(codec.encode([CANCEL, call.id]))

    @asynccontextmanager
    async def _start_call(
        self, method: str, args: Any, *, upload: bool, download: bool
    ) -> AsyncIterator[OutgoingCall]:
        meta = self._call_meta(upload=upload, download=download)
        await self._acquire_slot()
        try:
            call_id, frame = self._encode_call(method, args, meta)
            call = OutgoingCall(self, call_id, method, upload=upload, download=download)
            self._calls[call_id] = call
            try:
                await self._send_frame(frame)
                yield call
            finally:
                self._forget(call)
        finally:
            self._call_slots.release()

    async def _acquire_slot(self) -> None:
        """One of the peer's max_calls; without a scheduling round trip when one is free
        (the caller checkpoints anyway while it waits for its answer)."""
        try:
            self._call_slots.acquire_nowait()
        except trio.WouldBlock:
            await self._call_slots.acquire()

    # -- the writer ------------------------------------------------------------------------

    def _send_nowait(self, frame: bytes) -> None:
        """Queue a small control frame (CREDIT, PONG, CANCEL, a refusal) without waiting.

        These answer what the peer sends, so a peer that sends but never reads could make
        them pile up: past ``send_buffer`` plus one frame plus CONTROL_SLACK queued bytes
        the connection is closed instead.
        """
        if self.close_reason is None:
            # Our own frame limit, not the peer's: a peer may claim a huge max_frame.
            largest = min(self.peer.max_frame, self.config.max_frame)
            if self._out_bytes > self.config.send_buffer + largest + CONTROL_SLACK:
                self._close(ConnectionClosed(
                    f"node {self.peer.node} does not read what it is sent; closing the connection",
                    node=self.peer.node,
                ))
                return
            self._queue(frame)

    def _queue(self, *pieces: bytes | memoryview) -> None:
        self._out.extend(pieces)
        self._out_bytes += sum(map(len, pieces))
        if self._writer_lot:  # the writer is waiting (else it will find these when it loops)
            self._writer_lot.unpark()

    async def _send_frame(self, *pieces: bytes | memoryview) -> None:
        """Queue a frame (in pieces) once the send buffer has room: backpressure for data
        and replies."""
        while self._out_bytes >= self.config.send_buffer:
            self._check_open()
            await self._space_lot.park()
        self._check_open()
        self._queue(*pieces)

    async def _writer(self) -> None:
        """Write whatever is queued, in as few system calls as possible."""
        stream = self.stream
        # On a plain TCP socket a batch goes out with one sendmsg (gather), so big chunks
        # are never copied into a joined buffer; other streams (TLS) get one joined write.
        sock = stream.socket if type(stream) is trio.SocketStream else None
        while True:
            while not self._out:
                await self._writer_lot.park()
            batch, self._out = self._out, []
            size = sum(map(len, batch))
            if len(batch) == 1:
                await stream.send_all(batch[0])
            elif sock is not None and size >= _GATHER_SMALL and hasattr(sock, "sendmsg"):
                await _send_gathered(sock, batch)
            else:
                await stream.send_all(b"".join(batch))
            self._out_bytes -= size
            self._space_lot.unpark_all()

    # -- the reader ------------------------------------------------------------------------

    async def _reader(self) -> None:
        decoder = self._decoder
        while True:
            # First what is already buffered: a client may send its first calls right
            # behind its hello, in the same packet.
            while (message := decoder.next_message()) is not None:
                self._dispatch(message)
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise ConnectionClosed(f"node {self.peer.node} closed the connection", node=self.peer.node)
            self._last_receive = trio.current_time()
            decoder.receive_data(data)

    def _dispatch(self, m: list[Any]) -> None:
        kind = m[0]
        if kind == DATA:
            call = self._call_for(m[1])
            if call is not None:
                if call._inbound is None:
                    raise ProtocolError(f"DATA on call {m[1]}, which has no stream in that direction")
                call._inbound.on_data(m[2])
        elif kind == CALL:
            self._on_call(m[1], m[2], m[3], m[4])
        elif kind == REPLY:
            call = self._calls.get(m[1])
            if call is not None:
                call._resolve(True, m[2])
        elif kind == ERROR:
            if m[1] == 0:
                # The peer gave up on the connection and says why; answering it is pointless.
                raise ConnectionClosed(
                    f"node {self.peer.node} closed the connection: {m[2]}: {m[3]}",
                    node=self.peer.node, code=m[2],
                )
            call = self._calls.get(m[1])
            if call is not None:
                call._resolve(False, (m[2], m[3], m[4]))
        elif kind == CREDIT:
            call = self._call_for(m[1])
            if call is not None and call._outbound is not None:
                call._outbound.on_credit(m[2])
        elif kind == END:
            call = self._call_for(m[1])
            if call is not None and call._inbound is not None:
                call._inbound.on_end()
        elif kind == CANCEL:
            served = self._served.get(m[1])
            if served is not None:
                served._cancel_requested = True
                served._scope.cancel()
        elif kind == PING:
            self._send_nowait(codec.encode([PONG, m[1]]))
        elif kind == PONG:
            pass
        elif kind == GOODBYE:
            self._peer_draining = True
        else:  # HELLO
            raise ProtocolError(f"unexpected {codec.KIND_NAMES[kind]} after the handshake")

    def _call_for(self, call_id: int) -> IncomingCall | OutgoingCall | None:
        """The live call a stream frame is about: one we serve or one we made, by parity.

        None for a call that has finished: frames that crossed its end are dropped.
        """
        if call_id % 2 == self._peer_parity:
            return self._served.get(call_id)
        return self._calls.get(call_id)

    # -- calls we serve --------------------------------------------------------------------

    def _on_call(self, call_id: int, method: str, args: Any, meta: dict[str, Any]) -> None:
        if call_id % 2 != self._peer_parity or call_id == 0:
            raise ProtocolError(f"call id {call_id} has the wrong parity for this side")
        if call_id <= self._last_peer_id:
            raise ProtocolError(
                f"call id {call_id} is not above the last one ({self._last_peer_id}); ids must increase"
            )
        self._last_peer_id = call_id

        def refuse(err: TriodeError) -> None:
            code, message, details = err.to_wire()
            self._send_nowait(codec.encode([ERROR, call_id, code, message, details]))

        if self._draining:
            return refuse(errors.Unavailable(f"node {self.config.node_id} is shutting down"))
        if len(self._served) >= self.config.max_calls:
            return refuse(
                errors.ResourceExhausted(
                    f"over {self.config.max_calls} calls in flight on one connection",
                    retry_after=0.1,
                )
            )
        handler = self._lookup(method) if self._lookup is not None else None
        if handler is None:
            return refuse(errors.Unimplemented(f"node {self.config.node_id} has no method {method!r}"))
        timeout = meta.get("timeout")
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout != timeout):
            raise ProtocolError(f"CALL meta 'timeout' must be a number of seconds, got {timeout!r}")
        deadline = trio.current_time() + max(timeout, 0.0) if timeout is not None else math.inf
        call = IncomingCall(
            self,
            call_id,
            method,
            args,
            upload=bool(meta.get("up")),
            download=bool(meta.get("down")),
            deadline=deadline,
        )
        self._served[call_id] = call
        if self._served_idle.is_set():  # replace only a spent event: a waiter holds the live one
            self._served_idle = trio.Event()
        self._pending.append((call, handler))
        if self._idle_workers:
            # Taken off the list here, so the next call wakes (or starts) another.
            trio.lowlevel.reschedule(self._idle_workers.pop())
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._worker)

    async def _worker(self) -> None:
        """Serve calls one after another, then wait for the next.

        A task per call costs more than the rest of a small call put together, so the
        connection keeps the tasks it has started: never more than the most calls it has
        served at once (at most ``max_calls``), all in its own nursery, gone with it.
        Each call still runs in its own cancel scope (CANCEL, deadline).
        """
        task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._idle_workers.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            if self._pending:
                call, handler = self._pending.popleft()
                await self._serve(call, handler)
            else:
                self._idle_workers.append(task)
                await trio.lowlevel.wait_task_rescheduled(abort)

    async def _serve(self, call: IncomingCall, handler: Handler) -> None:
        # The call stays in _served until its answer is queued for the socket, so a
        # draining node (wait_idle) does not close the connection under an unsent reply.
        try:
            frame: bytes | None = None
            try:
                with call._scope:
                    result = await handler(call)
                    frame = self._answer(call, ok=True, value=result)
                if call._scope.cancelled_caught and not call._cancel_requested and frame is None:
                    frame = self._answer(call, ok=False, value=errors.DeadlineExceeded(
                        f"{call.method} passed its deadline on node {self.config.node_id}"
                    ))
            except Exception as exc:
                err = _wire_error(exc)
                if err is None:
                    log.exception("handler for %s failed", call.method)
                    err = errors.Internal(f"{call.method} failed on node {self.config.node_id}: {exc!r}")
                frame = self._answer(call, ok=False, value=err)
            if call._outbound is not None:
                call._outbound.finish()
            if frame is not None and not call._cancel_requested:
                try:
                    await self._send_frame(frame)
                except ConnectionClosed:
                    pass
        finally:
            if call._outbound is not None:
                call._outbound.finish()
            del self._served[call.id]
            if not self._served:
                self._served_idle.set()

    def _answer(self, call: IncomingCall, *, ok: bool, value: Any) -> bytes:
        """The REPLY or ERROR frame for a finished call; never raises.

        A result msgpack cannot hold, or one larger than the peer accepts, becomes an
        error for that call alone rather than a broken connection.
        """
        if ok:
            try:
                frame = codec.encode([REPLY, call.id, value])
            except ProtocolError as exc:
                log.error("handler for %s returned a value that cannot be sent: %s", call.method, exc)
                value = errors.Internal(f"{call.method} on node {self.config.node_id} returned a value "
                                        f"that cannot be sent: {exc}")
            else:
                if len(frame) - 4 <= self.peer.max_frame:
                    return frame
                value = errors.TooLarge(
                    f"the result of {call.method} is {len(frame) - 4} bytes, over the peer's frame limit "
                    f"of {self.peer.max_frame}; stream it instead",
                    size=len(frame) - 4, limit=self.peer.max_frame,
                )
        code, message, details = value.to_wire()
        try:
            frame = codec.encode([ERROR, call.id, code, message, details])
        except ProtocolError:  # details held something msgpack cannot: send the message only
            frame = codec.encode([ERROR, call.id, code, message, {}])
        if len(frame) - 4 > self.peer.max_frame:
            frame = codec.encode([ERROR, call.id, code, message[:1000], {}])
        return frame

    # -- lifecycle -------------------------------------------------------------------------

    async def _handshake(self) -> None:
        """Exchange hellos. The initiator speaks first; the acceptor checks version and token.

        An acceptor that refuses a hello says why in an ERROR with call id 0 before it
        hangs up, so the client can show the reason (bad token, wrong version).
        """
        if self._initiator:
            await self.stream.send_all(codec.encode([HELLO, self.config.hello()]))
        try:
            message = await self._receive_one()
            if message[0] == ERROR and message[1] == 0:
                raise errors.from_wire(message[2], message[3], message[4])
            if message[0] != HELLO:
                raise ProtocolError(f"expected HELLO, got {codec.KIND_NAMES[message[0]]}")
            self.peer = PeerHello.parse(message[1])
            self._check_token()
        except ConnectionClosed:
            raise
        except TriodeError as err:
            if not self._initiator:
                with trio.move_on_after(1):
                    try:
                        await self.stream.send_all(codec.encode([ERROR, 0, *err.to_wire()]))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            raise
        if not self._initiator:
            await self.stream.send_all(codec.encode([HELLO, self.config.hello()]))
        self._decoder.max_frame = self.config.max_frame
        self._call_slots = trio.Semaphore(self.peer.max_calls)
        self._last_receive = trio.current_time()

    def _check_token(self) -> None:
        """Compare the offered token with ours in constant time (hashes hide the length too)."""
        required = self.config.required_token
        if required is None:
            return
        offered = self.peer.token or ""
        if not hmac.compare_digest(
            hashlib.sha256(offered.encode()).digest(), hashlib.sha256(required.encode()).digest()
        ):
            raise errors.AuthenticationFailed(
                f"node {self.config.node_id} requires a token and "
                + ("none was given" if not offered else "the one given is wrong")
                + " (pass the node's token with --token-file or token=)"
            )

    async def _receive_one(self) -> list[Any]:
        while (message := self._decoder.next_message()) is None:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise ConnectionClosed("the peer closed the connection during the hello")
            self._decoder.receive_data(data)
        return message

    async def _keepalive(self) -> None:
        """PING every ``keepalive_interval`` of silence; after ``dead_after`` of it, give up.

        Any frame from the peer counts as a sign of life (a PONG is just the cheapest).
        The task wakes exactly when a ping is due or the deadline passes, so a dead peer
        is found ``dead_after`` seconds after the last thing it sent, not later.
        """
        interval = self.config.keepalive_interval
        dead_after = self.config.dead_after
        while True:
            idle = trio.current_time() - self._last_receive
            if idle >= dead_after:
                raise ConnectionClosed(
                    f"node {self.peer.node} sent nothing for {idle:.1f}s and did not answer "
                    "pings: presumed dead",
                    node=self.peer.node,
                )
            if idle >= interval:
                self._send_nowait(codec.encode([PING, next(self._ping_nonce) & 0x7FFFFFFF]))
                wait = min(interval, dead_after - idle)
            else:
                wait = min(interval, dead_after) - idle
            await trio.sleep(wait)

    async def _guard(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run an internal task; whatever ends it closes the connection (never the caller)."""
        try:
            await fn()
        except ConnectionClosed as exc:
            self._close(exc)
        except TriodeError as exc:
            if isinstance(exc, ProtocolError) and self.close_reason is None:
                log.warning("closing connection to %s: %s", self.peer.node, exc)
                # Best effort: tell the peer why, then close.
                self._send_nowait(codec.encode([ERROR, 0, *exc.to_wire()]))
                with trio.move_on_after(1):
                    while self._out_bytes:
                        await self._space_lot.park()
            self._close(
                ConnectionClosed(f"connection to {self.peer.node} failed: {exc}", node=self.peer.node)
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._close(
                ConnectionClosed(f"lost the connection to {self.peer.node}: {exc!r}", node=self.peer.node)
            )
        except Exception as exc:  # a bug here must cost this connection, not the whole node
            log.exception("internal error on the connection to %s", self.peer.node)
            self._close(
                ConnectionClosed(f"connection to {self.peer.node} failed: internal error {exc!r}",
                                 node=self.peer.node)
            )

    def _close(self, reason: ConnectionClosed) -> None:
        if self.close_reason is not None:
            return
        self.close_reason = reason
        for call in list(self._calls.values()):
            call._resolve(False, (reason.code, reason.message, reason.details))
        for served in list(self._served.values()):
            served._cancel_requested = True
            served._scope.cancel()
        self._space_lot.unpark_all()
        self._scope.cancel()
        self._closed.set()

    async def _open(self) -> None:
        """The hello, bounded by ``handshake_timeout``; on any failure the stream is closed."""
        try:
            with trio.fail_after(self.config.handshake_timeout):
                await self._handshake()
        except trio.TooSlowError:
            await trio.aclose_forcefully(self.stream)
            raise ConnectionClosed(
                f"no hello within {self.config.handshake_timeout}s of connecting"
            ) from None
        except BaseException:
            await trio.aclose_forcefully(self.stream)
            raise

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._guard, self._reader)
                    nursery.start_soon(self._guard, self._writer)
                    nursery.start_soon(self._guard, self._keepalive)
                    task_status.started()
        finally:
            self._close(self.close_reason or ConnectionClosed("connection closed"))
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)


_GATHER_SMALL = 64 * 1024  # pieces below this are joined; above it, written in place
_GATHER_MAX = 64  # buffers per sendmsg, well under IOV_MAX


async def _send_gathered(sock: trio.socket.SocketType, batch: list[bytes | memoryview]) -> None:
    """Write ``batch`` with sendmsg, joining runs of small pieces and never copying big ones."""
    iov: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    for piece in batch:
        if len(piece) < _GATHER_SMALL:
            small.append(piece)
            continue
        if small:
            iov.append(b"".join(small))
            small = []
        iov.append(piece)
    if small:
        iov.append(b"".join(small))
    i = 0
    try:
        while i < len(iov):
            sent = await sock.sendmsg(iov[i : i + _GATHER_MAX])
            while sent:
                n = len(iov[i])
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    iov[i] = memoryview(iov[i])[sent:]
                    sent = 0
    except OSError as exc:
        raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc


@asynccontextmanager
async def open_connection(
    stream: trio.abc.Stream,
    config: ConnectionConfig,
    *,
    handlers: Callable[[str], Handler | None] | None = None,
    initiator: bool = True,
) -> AsyncIterator[Connection]:
    """Handshake over ``stream`` and serve it until the block is left.

    ``handlers`` maps a method name to its handler (or None for an unknown method).
    Leaving the block closes the connection, cancels the handlers it runs and joins
    every task it started; the stream is closed too.
    """
    conn = Connection(stream, config, handlers, initiator=initiator)
    # The hello happens before the nursery opens, so a refused hello (bad token, wrong
    # version) is raised as itself rather than inside an ExceptionGroup.
    await conn._open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(conn._run)
            try:
                yield conn
            finally:
                conn._close(ConnectionClosed("connection closed by this side"))
    except BaseExceptionGroup as group:
        # The connection's own tasks never raise (see _guard), so a lone exception here
        # came from the body of the block: hand it back unwrapped, as the caller raised it.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise

