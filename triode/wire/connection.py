"""One Triode connection over any :class:`trio.abc.Stream`: the I/O half.

After a hello from each side, either side may call the other. Calls are multiplexed
by id (the side that opened the connection uses odd ids, the other even ones). A call
may stream bytes in either direction; every stream is flow-controlled by credits the
receiver grants, so a slow reader bounds the bytes in flight for its own call and
never stalls the others. The caller's deadline travels with the call, and a caller
that leaves (cancelled, timed out, or done early) sends CANCEL, which cancels the
handler on the far side.

The rules (ids, credit, the hello, drain, which call may send what) are kept by the
sans-I/O :class:`~triode.wire.protocol.Protocol`; this module moves the bytes: a
reader and a writer task, keepalive, the workers that run handlers, and the objects
callers and handlers hold, which park and wake tasks as the protocol's state changes.

Everything a connection starts lives in the nursery of :func:`open_connection`; the
connection never cancels the body of that block: when it dies (peer gone, protocol
error, dead peer) it fails the calls in flight with :class:`ConnectionClosed` instead.
"""

from __future__ import annotations

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
from .codec import CALL, CANCEL, CREDIT, DATA, END, ERROR, GOODBYE, PING, PONG, REPLY
from .protocol import (
    DEFAULT_MAX_CALLS,
    DEFAULT_WINDOW,
    PROTOCOL_VERSION,
    CallState,
    MadeCall,
    PeerHello,
    Protocol,
    ServedCall,
    hello_body,
)
from .protocol import HELLO_MAX_FRAME as HELLO_MAX_FRAME  # defined here before protocol.py

__all__ = [
    "PROTOCOL_VERSION",
    "ByteBudget",
    "ConnectionConfig",
    "HelloGuard",
    "PeerHello",
    "Connection",
    "OutgoingCall",
    "IncomingCall",
    "Handler",
    "open_connection",
]

log = logging.getLogger("triode.wire")

_RECEIVE_SIZE = 256 * 1024

#: Control frames (CREDIT, PONG, CANCEL, refusals) allowed to queue beyond the send buffer.
CONTROL_SLACK = 1024 * 1024

Handler = Callable[["IncomingCall"], Awaitable[Any]]

#: Stream data one connection may hold read ahead or queued for its socket (see ByteBudget).
DEFAULT_BUFFER_LIMIT = 8 * 1024 * 1024


class ByteBudget:
    """Bytes that may be held in memory at once, taken before buffering, given back after.

    A node has one, shared by all its connections; each connection has its own, whose
    ``parent`` is the node's, so one connection cannot take the whole node's share.
    Blob bytes a handler sends are reserved here before they are read
    (:meth:`IncomingCall.reserve`) and given back once written to the socket. Waiters
    are served first come, first served; a request larger than the limit is granted
    when nothing else is held, so it waits but never deadlocks.
    """

    __slots__ = ("limit", "parent", "used", "_waiters")

    def __init__(self, limit: int, parent: ByteBudget | None = None) -> None:
        if limit < 1:
            raise ValueError(f"a byte budget needs a positive limit, got {limit}")
        self.limit = limit
        self.parent = parent
        self.used = 0
        self._waiters: deque[list[Any]] = deque()  # [bytes wanted, task], in arrival order

    def __repr__(self) -> str:
        return f"ByteBudget(used={self.used}, limit={self.limit}, waiting={len(self._waiters)})"

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, n: int) -> bool:
        return self.used + n <= self.limit or self.used == 0

    async def acquire(self, n: int) -> None:
        """Take ``n`` bytes (here, then in the parent), waiting for room."""
        await self._acquire_here(n)
        if self.parent is not None:
            try:
                await self.parent.acquire(n)
            except BaseException:
                self._release_here(n)
                raise

    async def _acquire_here(self, n: int) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._waiters and self._fits(n):
            self.used += n
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        waiter = [n, trio.lowlevel.current_task()]
        self._waiters.append(waiter)

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiters.remove(waiter)
            self._wake()  # the head may have left: those behind it may fit now
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def release(self, n: int) -> None:
        """Give back ``n`` bytes taken with :meth:`acquire`."""
        self._release_here(n)
        if self.parent is not None:
            self.parent.release(n)

    def _release_here(self, n: int) -> None:
        self.used -= n
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters and self._fits(waiters[0][0]):
            n, task = waiters.popleft()
            self.used += n
            trio.lowlevel.reschedule(task)


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
    window: int = DEFAULT_WINDOW
    #: Largest frame body we accept.
    max_frame: int = codec.DEFAULT_MAX_FRAME
    #: Calls the peer may have open with us at once; more are refused RESOURCE_EXHAUSTED.
    max_calls: int = DEFAULT_MAX_CALLS
    #: Largest DATA chunk we send.
    max_chunk: int = 1024 * 1024
    #: Bytes queued for the socket before senders of streams and replies must wait.
    send_buffer: int = 4 * 1024 * 1024
    #: Blob bytes a handler may hold read ahead or queued for the socket on this connection
    #: (see IncomingCall.reserve); within ``budget`` when there is one.
    buffer_limit: int = DEFAULT_BUFFER_LIMIT
    #: The node's budget for such bytes, shared by all its connections (None: none).
    budget: ByteBudget | None = field(default=None, compare=False, repr=False)
    #: Send a PING after this many idle seconds; declare the peer dead after dead_after.
    keepalive_interval: float = 10.0
    dead_after: float = 30.0
    handshake_timeout: float = 10.0

    def hello(self) -> dict[str, Any]:
        return hello_body(
            node_id=self.node_id, features=self.features, window=self.window,
            max_frame=self.max_frame, max_calls=self.max_calls, token=self.token,
        )


class HelloGuard:
    """An acceptor's say over a connection until the peer's hello is accepted.

    Pass one to :func:`open_connection` (a node does, for every connection it accepts).
    :meth:`abort` refuses the connection now, whatever the hello has reached: the reason
    goes to the peer as ``ERROR`` id 0 and is raised from ``open_connection``. The hooks,
    for subclasses, run in the handshake with no checkpoint between them and the
    protocol's own checks: :meth:`before_hello` when the peer's first frame has arrived
    (raise a TriodeError to refuse it unread), :meth:`after_hello` with the verdict.
    """

    def __init__(self) -> None:
        self._scope: trio.CancelScope | None = None
        #: Why abort() refused the connection, and whether the peer is told (an ERROR frame).
        self.refusal: TriodeError | None = None
        self.tell = True
        #: The hello is still awaited: abort() still applies.
        self.pending = True

    def scope(self) -> trio.CancelScope:
        """A cancel scope for a stage of the greeting (its owner may wait for the first
        bytes in one before the handshake's): abort() cancels it, at once if it came first."""
        self._scope = trio.CancelScope()
        if self.refusal is not None:
            self._scope.cancel()
        return self._scope

    def abort(self, refusal: TriodeError, *, tell: bool = True) -> bool:
        """Refuse the connection with ``refusal`` (sent to the peer as ERROR id 0 unless
        ``tell`` is false: then it just hangs up); False once its hello was accepted."""
        if not self.pending or self.refusal is not None:
            return False
        self.refusal = refusal
        self.tell = tell
        if self._scope is not None:
            self._scope.cancel()
        return True

    def before_hello(self) -> None:
        """The peer's first frame is here and about to be checked."""

    def after_hello(self, refused: TriodeError | None) -> None:
        """The hello was refused (why), or accepted (None): the connection is open."""


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


def _time_left() -> float | None:
    """Seconds to the caller's effective deadline (None without one): what a CALL carries."""
    deadline = trio.current_effective_deadline()
    if deadline == math.inf:
        return None
    return max(deadline - trio.current_time(), 0.0)


class _Inbound:
    """Bytes arriving on one call, buffered up to the credit we granted (the protocol
    checks the credit; this holds the chunks and wakes the reader)."""

    __slots__ = ("_conn", "_call", "_chunks", "_error", "_lot")

    def __init__(self, conn: Connection, call: CallState) -> None:
        self._conn = conn
        self._call = call  # its recv_window: set by the protocol once the call is open
        self._chunks: deque[bytes] = deque()
        self._error: TriodeError | None = None
        self._lot = trio.lowlevel.ParkingLot()

    def push(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._lot.unpark_all()

    def wake(self) -> None:
        """The stream ended (the protocol says so); readers find out."""
        self._lot.unpark_all()

    def fail(self, error: TriodeError) -> None:
        if self._error is None:
            self._error = error
        self._lot.unpark_all()

    async def receive(self) -> bytes | None:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if not self._call.recv_window.open:  # type: ignore[union-attr]  # a stream has one
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
        conn = self._conn
        frame = conn._proto.consumed(self._call, n)
        if frame is not None:
            conn._send_nowait(frame)


class _Outbound:
    """Sends one call's stream as its credit allows (the protocol keeps the credit)."""

    __slots__ = ("_conn", "_call", "_lot")

    def __init__(self, conn: Connection, call: OutgoingCall | IncomingCall) -> None:
        self._conn = conn
        self._call = call  # its send_window: set by the protocol once the call is open
        self._lot = trio.lowlevel.ParkingLot()

    def wake(self) -> None:
        """Credit came, or the stream closed: a parked sender looks again."""
        self._lot.unpark_all()

    async def send(self, data: bytes | bytearray | memoryview) -> bool:
        conn = self._conn
        proto = conn._proto
        call = self._call
        window = call.send_window
        assert window is not None
        view = memoryview(data).cast("B")
        # An immutable buffer (bytes) is queued as it is and written straight from it;
        # anything the caller could change after we return is copied first.
        keep = view.readonly
        chunk_limit = min(conn.config.max_chunk, conn.peer.max_frame - 64)
        while view:
            while window.credit <= 0 and window.open:
                conn._check_open()
                await self._lot.park()
            if not window.open:
                return False
            n = proto.take_credit(call, min(len(view), chunk_limit))
            piece = view[:n]
            await conn._send_data(call, codec.data_header(call.id, n), piece if keep else bytes(piece))
            view = view[n:]
        return window.open


class OutgoingCall(MadeCall):
    """The caller's side of a streaming call (from :meth:`Connection.open_call`).

    It is also the protocol's record of the call (a :class:`MadeCall`): one object per call.
    """

    _reserved = 0  # an upload's bytes are not reserved (see IncomingCall.reserve)

    def __init__(self, conn: Connection, call_id: int, method: str, *, upload: bool, download: bool) -> None:
        self.id = call_id
        self.method = method
        self._conn = conn
        self._upload_ended = not upload
        # A unary call has no streams: their state is only made for the directions in use.
        self._inbound = _Inbound(conn, self) if download else None
        self._outbound = _Outbound(conn, self) if upload else None
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
            frame = self._conn._proto.end_upload(self)
            if frame is not None:
                self._conn._send_nowait(frame)

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

    # -- driven by the connection, once the protocol has marked the call answered ---------

    def _resolve(self, ok: bool, value: Any) -> None:
        if self._outcome is not None:
            return
        self._outcome = (ok, value)
        if self._outbound is not None:
            self._outbound.wake()
        if self._inbound is not None:
            if ok:
                self._inbound.wake()
            else:
                self._inbound.fail(errors.from_wire(*value))
        if self._waiter is not None:
            trio.lowlevel.reschedule(self._waiter)
            self._waiter = None
        if self._lot is not None:
            self._lot.unpark_all()


class IncomingCall(ServedCall):
    """The handler's side of a call: its arguments, the upload, and the download stream.

    It is also the protocol's record of the call (a :class:`ServedCall`): one object per call.
    """

    #: Bytes of the connection's budget this call holds for data not yet queued (reserve()).
    _reserved = 0

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
        self._inbound = _Inbound(conn, self) if upload else None
        self._outbound = _Outbound(conn, self) if download else None
        self._scope = trio.CancelScope(deadline=deadline)

    @property
    def peer(self) -> PeerHello:
        return self.connection.peer

    @property
    def upload(self) -> bool:
        """Whether the caller opened the call with an upload stream (``meta.up``)."""
        return self._inbound is not None

    @property
    def send_credit(self) -> int:
        """Bytes the caller lets us send now (0 without a download, or once it is over)."""
        window = self.send_window
        if window is None or not window.open:
            return 0
        return window.credit

    @property
    def credit_granted(self) -> int:
        """All the credit the caller has granted on the download so far (its window, plus
        every CREDIT): what it has let us send since the call began."""
        window = self.send_window
        return 0 if window is None else window.granted

    @property
    def sending(self) -> bool:
        """Whether the download may still carry data (it has one and is not over)."""
        window = self.send_window
        return window is not None and window.open

    async def wait_credit(self) -> None:
        """Wait until the caller grants credit, or the download ends."""
        if self._outbound is None:
            raise RuntimeError(f"{self.method}: no download to wait for credit on")
        await self._outbound._lot.park()

    async def reserve(self, n: int) -> None:
        """Take ``n`` bytes of the connection's (and node's) buffer budget before reading
        that much to send. :meth:`send` passes the reservation on with the data; the
        bytes are given back once written to the socket, and whatever the call still
        holds when it ends is given back then."""
        await self.connection.budget.acquire(n)
        self._reserved += n

    def unreserve(self, n: int) -> None:
        """Give back ``n`` reserved bytes that will not be sent (a short read)."""
        n = min(n, self._reserved)
        if n > 0:
            self._reserved -= n
            self.connection.budget.release(n)

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

    async def send(self, data: bytes | bytearray | memoryview) -> bool:
        """Stream bytes back to the caller; False once the download is over (the call was
        answered or cancelled). Reserved bytes (:meth:`reserve`) go with the data."""
        if self._outbound is None:
            raise errors.InvalidArgument(
                f"{self.method} streams its result back: call it with meta.down = true "
                "(in Python, Connection.open_call)"
            )
        return await self._outbound.send(data)


class Connection:
    """A live, handshaken connection. Make one with :func:`open_connection`."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        config: ConnectionConfig,
        handlers: Callable[[str], Handler | None] | None,
        *,
        initiator: bool,
        takes_upload: Callable[[str], bool] | None = None,
    ) -> None:
        self.stream = stream
        self.config = config
        self._initiator = initiator
        self._proto: Protocol[OutgoingCall, IncomingCall] = Protocol(
            initiator=initiator,
            node_id=config.node_id,
            window=config.window,
            max_frame=config.max_frame,
            max_calls=config.max_calls,
            features=config.features,
            token=config.token,
            required_token=config.required_token,
            lookup=handlers,
            takes_upload=takes_upload,
            new_made=self._new_outgoing,
            new_served=self._new_incoming,
        )
        self.peer: PeerHello  # set by the handshake
        self._out: list[bytes | memoryview] = []
        self._out_bytes = 0
        #: Of the bytes queued, those reserved in ``budget``: given back once written.
        self._out_charged = 0
        #: Blob bytes this connection's handlers hold, within the node's budget.
        self.budget = ByteBudget(config.buffer_limit, parent=config.budget)
        self._writer_lot = trio.lowlevel.ParkingLot()
        self._space_lot = trio.lowlevel.ParkingLot()
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()
        self._served_idle = trio.Event()
        self._served_idle.set()
        self._call_slots = trio.Semaphore(1)  # replaced by the peer's max_calls in the hello
        self._last_receive = 0.0
        # Calls from the peer wait here for a worker task (see _worker).
        self._pending: deque[tuple[IncomingCall, Handler]] = deque()
        self._idle_workers: list[trio.lowlevel.Task] = []

    # -- public --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def close_reason(self) -> ConnectionClosed | None:
        """Why the connection closed; None while it is open."""
        return self._proto.close_reason

    @property
    def features(self) -> frozenset[str]:
        """Features both sides support."""
        return self.config.features & self.peer.features

    @property
    def serving(self) -> int:
        """Calls from the peer that we are handling right now."""
        return len(self._proto.served)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def call(self, method: str, args: Any = None) -> Any:
        """A unary call: send ``args``, return the result or raise the far side's error.

        The caller's deadline (its enclosing cancel scopes) travels with the call.
        """
        # The hot path: the same steps as _start_call, without a context manager, and
        # with the protocol's check and _time_left() inlined.
        proto = self._proto
        if proto.close_reason is not None or proto.peer_draining:
            proto.check_can_call()
        deadline = trio.current_effective_deadline()
        timeout = max(deadline - trio.current_time(), 0.0) if deadline != math.inf else None
        await self._acquire_slot()
        try:
            call, frame = proto.start_call(method, args, timeout, False, False)
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
        assert call._outcome is not None
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
        frame = self._proto.drain()
        if frame is not None:
            self._send_nowait(frame)

    async def wait_idle(self) -> None:
        """Wait until no call from the peer is being handled and everything queued is written."""
        served = self._proto.served
        while not self.closed and (served or self._out_bytes):
            if served:
                await self._served_idle.wait()
            else:
                await self._space_lot.park()

    def close(self, reason: str = "connection closed by this side") -> None:
        """Close now: calls in flight fail with ConnectionClosed, handlers are cancelled."""
        self._close(ConnectionClosed(reason))

    # -- calls we make ---------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._proto.close_reason is not None:
            self._proto.check_open()

    def _forget(self, call: OutgoingCall) -> None:
        """The caller is done with ``call``: unanswered, it is cancelled on the far side."""
        frame = self._proto.forget(call)
        if call._outcome is None:
            call._resolve(False, ("CANCELLED", "call left before its answer", {}))
        if frame is not None:
            self._send_nowait(frame)

    @asynccontextmanager
    async def _start_call(
        self, method: str, args: Any, *, upload: bool, download: bool
    ) -> AsyncIterator[OutgoingCall]:
        proto = self._proto
        proto.check_can_call()
        timeout = _time_left()
        await self._acquire_slot()
        try:
            call, frame = proto.start_call(method, args, timeout, upload, download)
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
        if self._proto.close_reason is None:
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

    async def _send_data(
        self, call: OutgoingCall | IncomingCall, header: bytes, chunk: bytes | memoryview
    ) -> None:
        """Queue a DATA frame (as :meth:`_send_frame`); the call's reserved bytes move
        with it to the queue, and are given back once the writer has written them."""
        while self._out_bytes >= self.config.send_buffer:
            self._check_open()
            await self._space_lot.park()
        if self._proto.close_reason is not None:
            self._proto.check_open()
        charge = call._reserved
        if charge:
            if charge > len(chunk):
                charge = len(chunk)
            call._reserved -= charge
            self._out_charged += charge
        self._queue(header, chunk)

    async def _send_frame(self, *pieces: bytes | memoryview) -> None:
        """Queue a frame (in pieces) once the send buffer has room: backpressure for data
        and replies."""
        while self._out_bytes >= self.config.send_buffer:
            self._check_open()
            await self._space_lot.park()
        if self._proto.close_reason is not None:
            self._proto.check_open()
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
            charged, self._out_charged = self._out_charged, 0
            size = sum(map(len, batch))
            try:
                if len(batch) == 1:
                    await stream.send_all(batch[0])
                elif sock is not None and size >= _GATHER_SMALL and hasattr(sock, "sendmsg"):
                    await _send_gathered(sock, batch)
                else:
                    await stream.send_all(b"".join(batch))
            finally:
                if charged:
                    self.budget.release(charged)
            self._out_bytes -= size
            self._space_lot.unpark_all()

    # -- the reader ------------------------------------------------------------------------

    async def _reader(self) -> None:
        decoder = self._proto.decoder
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
        """Hand a message to the protocol, then wake whoever its state change concerns."""
        kind = m[0]
        proto = self._proto
        if kind == DATA:
            call = proto.on_data(m[1], m[2])
            if call is not None:
                call._inbound.push(m[2])  # type: ignore[union-attr]  # the protocol checked it has one
        elif kind == CALL:
            served = proto.on_call(m[1], m[2], m[3], m[4])
            if isinstance(served, bytes):  # refused
                self._send_nowait(served)
                return
            # Hand it to a worker (inline: the hot path).
            if self._served_idle.is_set():  # replace only a spent event: a waiter holds the live one
                self._served_idle = trio.Event()
            self._pending.append((served, served.handler))
            if self._idle_workers:
                # Taken off the list here, so the next call wakes (or starts) another.
                trio.lowlevel.reschedule(self._idle_workers.pop())
            else:
                assert self._nursery is not None
                self._nursery.start_soon(self._worker)
        elif kind == REPLY:
            made = proto.on_reply(m[1])
            if made is not None:
                made._resolve(True, m[2])
        elif kind == ERROR:
            made = proto.on_error(m[1], m[2], m[3])
            if made is not None:
                made._resolve(False, (m[2], m[3], m[4]))
        elif kind == CREDIT:
            call = proto.on_credit(m[1], m[2])
            if call is not None:
                call._outbound.wake()  # type: ignore[union-attr]  # the protocol checked it has one
        elif kind == END:
            call = proto.on_end(m[1])
            if call is not None:
                call._inbound.wake()  # type: ignore[union-attr]  # the protocol checked it has one
        elif kind == CANCEL:
            cancelled = proto.on_cancel(m[1])
            if cancelled is not None:
                cancelled._scope.cancel()
        elif kind == PING:
            self._send_nowait(proto.on_ping(m[1]))
        elif kind == PONG:
            pass
        elif kind == GOODBYE:
            proto.on_goodbye(m[1])
        else:  # HELLO
            proto.on_hello()

    # -- calls we serve --------------------------------------------------------------------

    def _new_outgoing(self, call_id: int, method: str, upload: bool, download: bool) -> OutgoingCall:
        return OutgoingCall(self, call_id, method, upload=upload, download=download)

    def _new_incoming(
        self, call_id: int, method: str, args: Any, timeout: float | None, upload: bool, download: bool
    ) -> IncomingCall:
        deadline = trio.current_time() + timeout if timeout is not None else math.inf
        return IncomingCall(self, call_id, method, args, upload=upload, download=download, deadline=deadline)

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
        # The call stays in the protocol's ``served`` until its answer is queued for the
        # socket, so a draining node (wait_idle) does not close the connection under an
        # unsent reply. The protocol gives no frame for a cancelled call: no answer then.
        proto = self._proto
        try:
            frame: bytes | None = None
            try:
                with call._scope:
                    result = await handler(call)
                    frame = proto.reply(call, result)
                if call._scope.cancelled_caught and not call.cancelled and frame is None:
                    frame = proto.reply_error(call, errors.DeadlineExceeded(
                        f"{call.method} passed its deadline on node {self.config.node_id}"
                    ))
            except Exception as exc:
                err = _wire_error(exc)
                if err is None:
                    log.exception("handler for %s failed", call.method)
                    err = errors.Internal(f"{call.method} failed on node {self.config.node_id}: {exc!r}")
                frame = proto.reply_error(call, err)
            except BaseExceptionGroup as group:
                # Cancelled beside other errors: the whole connection is closing (its scope
                # is cancelled, so the call's own scope let this through), and the errors
                # came of it (a send on the closed connection). Nobody gets an answer: only
                # the cancellation goes on up, so closing is one log line, not a traceback.
                cancelled, rest = group.split(trio.Cancelled)
                if cancelled is None:
                    raise
                if rest is not None:
                    _, bugs = rest.split((TriodeError, trio.BrokenResourceError, trio.ClosedResourceError))
                    if bugs is not None:  # not a consequence of the closing: worth a traceback
                        log.error("handler for %s failed as its connection closed", call.method,
                                  exc_info=bugs)
                    else:
                        log.debug("%s on a closing connection also raised %r", call.method, rest)
                raise cancelled from None
            if call._outbound is not None:
                call._outbound.wake()
            if frame is not None and not call.cancelled:
                try:
                    await self._send_frame(frame)
                except ConnectionClosed:
                    pass
        finally:
            proto.served_done(call)
            if call._reserved:
                self.budget.release(call._reserved)
                call._reserved = 0
            if call._outbound is not None:
                call._outbound.wake()
            if not proto.served:
                self._served_idle.set()

    # -- lifecycle -------------------------------------------------------------------------

    async def _handshake(self, guard: HelloGuard | None = None) -> None:
        """Exchange hellos. The initiator speaks first; the protocol checks the peer's.

        An acceptor that refuses a hello says why in an ERROR with call id 0 before it
        hangs up, so the client can show the reason (bad token, wrong version).
        """
        proto = self._proto
        if self._initiator:
            await self.stream.send_all(proto.hello_frame())
        try:
            message = await self._receive_one()
            if guard is not None:
                guard.before_hello()
            try:
                self.peer = proto.receive_hello(message)
            except TriodeError as err:
                if guard is not None:
                    guard.after_hello(err)
                raise
            if guard is not None:
                guard.pending = False
                guard.after_hello(None)
        except ConnectionClosed:
            raise
        except TriodeError as err:
            if not self._initiator:
                await self._refuse(err)
            raise
        if not self._initiator:
            await self.stream.send_all(proto.hello_frame())
        self._call_slots = trio.Semaphore(self.peer.max_calls)
        self._last_receive = trio.current_time()

    async def _refuse(self, err: TriodeError) -> None:
        """Tell the peer why we hang up (ERROR id 0), waiting at most 1 s for the write."""
        with trio.move_on_after(1):
            try:
                await self.stream.send_all(self._proto.refusal_frame(err))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _receive_one(self) -> list[Any]:
        decoder = self._proto.decoder
        while (message := decoder.next_message()) is None:
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise ConnectionClosed("the peer closed the connection during the hello")
            decoder.receive_data(data)
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
                self._send_nowait(self._proto.ping())
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
                self._send_nowait(self._proto.refusal_frame(exc))
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
        proto = self._proto
        if not proto.close(reason):
            return
        for made in list(proto.made.values()):
            made._resolve(False, (reason.code, reason.message, reason.details))
        for served in list(proto.served.values()):
            served._scope.cancel()
        if self._out_charged:  # queued, never to be written
            self.budget.release(self._out_charged)
            self._out_charged = 0
        self._space_lot.unpark_all()
        self._scope.cancel()
        self._closed.set()

    async def _open(self, guard: HelloGuard | None = None) -> None:
        """The hello, bounded by ``handshake_timeout``; on any failure the stream is closed."""
        try:
            with trio.fail_after(self.config.handshake_timeout):
                if guard is None:
                    await self._handshake()
                else:
                    with guard.scope():
                        await self._handshake(guard)
                    if guard.refusal is not None:  # abort(): say why, then hang up
                        if guard.tell:
                            await self._refuse(guard.refusal)
                        raise guard.refusal.copy()
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
    guard: HelloGuard | None = None,
    takes_upload: Callable[[str], bool] | None = None,
) -> AsyncIterator[Connection]:
    """Handshake over ``stream`` and serve it until the block is left.

    ``handlers`` maps a method name to its handler (or None for an unknown method);
    ``takes_upload``, whether a method's handler reads an upload (None: all may).
    ``guard`` (an acceptor's) may refuse the connection until its hello is accepted.
    Leaving the block closes the connection, cancels the handlers it runs and joins
    every task it started; the stream is closed too.
    """
    conn = Connection(stream, config, handlers, initiator=initiator, takes_upload=takes_upload)
    # The hello happens before the nursery opens, so a refused hello (bad token, wrong
    # version) is raised as itself rather than inside an ExceptionGroup.
    await conn._open(guard)
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

