"""The node's HTTP/1.1 server, on h11: the ``--http`` cache door and the ``--metrics`` endpoint.

h11 is the sans-I/O HTTP/1.1 state machine (it parses and frames; it does no I/O), so
this module owns the sockets, the deadlines and the backpressure, in trio, and h11 owns
the grammar: request lines, headers, Content-Length and chunked framing, keep-alive,
``Expect: 100-continue``, pipelining. A handler gets an :class:`HttpExchange`: the
request, its body as an async iterator that reads from the socket only when asked
(so a slow store slows the client, never fills memory), and ``respond``/``respond_stream``.

Everything is bounded:

- connections at once (a slot is taken before ``accept``, as the wire listener does);
- a request head: at most ``max_head`` bytes (431), complete within ``head_timeout`` of its
  first byte (408), and a kept-alive connection waits ``idle_timeout`` for its next request;
- every receive of a body and every send of a response must make progress within
  ``io_timeout`` (a body that stalls gets 408, a reader that stalls is dropped);
- a body the handler did not read is read and dropped after a success (so the connection
  can be reused) but only up to ``drain_limit`` after an error; past that the answer
  says ``Connection: close`` and the connection ends.

A handler's bug costs its connection a 500, never the server.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import h11
import trio

from ..errors import InvalidArgument
from ..wire.transport import format_address, parse_address

__all__ = [
    "HttpLimits",
    "HttpRequest",
    "HttpExchange",
    "HttpServer",
    "BodyError",
    "Handler",
    "serve_metrics",
    "open_listeners",
    "CONTENT_TYPE",
    "TEXT",
]

log = logging.getLogger("triode.node.http")

#: The Prometheus text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
#: Bytes asked of the socket per receive.
RECEIVE_SIZE = 256 * 1024
#: Answers up to this size are joined and sent in one write.
JOIN_LIMIT = 64 * 1024
#: Connections the ``--metrics`` listener serves at once.
METRICS_CLIENTS = 16


@dataclass(frozen=True)
class HttpLimits:
    #: Largest request head (request line and headers), in bytes.
    max_head: int = 16 * 1024
    #: Seconds from a request's first byte to the end of its head.
    head_timeout: float = 10.0
    #: Seconds a kept-alive connection waits for its next request.
    idle_timeout: float = 60.0
    #: Seconds each receive of a body, and each send of a response, may wait for progress.
    io_timeout: float = 60.0
    #: Connections served at once.
    max_connections: int = 256
    #: Unread body bytes an error answer reads and drops to keep the connection.
    drain_limit: int = 64 * 1024


class BodyError(Exception):
    """The request body could not be read: cut short, malformed, too large or too slow.

    Not a TriodeError: it never crosses the wire, and a store that reads the body lets
    it through as it is (and stores nothing)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: The answer to give, or None when the client is gone (nothing can be sent).
        self.status = status


class _SendTimeout(Exception):
    pass


@dataclass(frozen=True)
class HttpRequest:
    method: str
    #: The target as sent (path and query).
    target: str
    #: The path, without the query.
    path: str
    #: Header names lowercased; repeated headers joined with ", ".
    headers: dict[str, str]
    #: The declared body length (None for chunked, or no body at all: see ``has_body``).
    content_length: int | None
    #: Whether a body follows the head (a Content-Length above 0, or chunked).
    has_body: bool

    @classmethod
    def from_h11(cls, event: h11.Request) -> HttpRequest:
        headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")  # h11 lowercases names
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        target = event.target.decode("latin-1")
        length_text = headers.get("content-length")
        length = int(length_text) if length_text is not None else None  # h11 checked it
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        return cls(
            method=event.method.decode("latin-1"),
            target=target,
            path=target.split("?", 1)[0],
            headers=headers,
            content_length=None if chunked else length,
            has_body=chunked or bool(length),
        )


class _Connection:
    """One socket and its h11 state machine; every receive and send under a deadline."""

    def __init__(self, stream: trio.abc.Stream, limits: HttpLimits, peer: str = "") -> None:
        self.stream = stream
        self.limits = limits
        #: The client's IP address ("" when unknown).
        self.peer = peer
        self._out: list[bytes] = []
        self._queued = 0
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)

    async def receive(self, deadline: float, size: int = RECEIVE_SIZE) -> bool:
        """Feed h11 what the socket has (up to ``size`` bytes); False when ``deadline`` passed first."""
        with trio.move_on_at(deadline):
            data = await self.stream.receive_some(size)
            self.h11.receive_data(bytes(data))  # b"": the peer closed; h11 says what that means
            return True
        return False

    def queue(self, event: h11.Event) -> None:
        """Frame ``event``; its bytes go out with the next :meth:`flush`."""
        for piece in self.h11.send_with_data_passthrough(event) or ():
            self._out.append(piece)
            self._queued += len(piece)

    async def flush(self) -> None:
        """Send what is queued: small pieces joined in one write (a small answer is one
        system call), large ones as they are (not copied)."""
        out, self._out, queued, self._queued = self._out, [], self._queued, 0
        with trio.move_on_after(self.limits.io_timeout) as scope:
            if queued <= JOIN_LIMIT:
                await self.stream.send_all(b"".join(out))
            else:
                for piece in out:
                    await self.stream.send_all(piece)
        if scope.cancelled_caught:
            raise _SendTimeout(f"the client read nothing for {self.limits.io_timeout:g}s")

    async def send(self, event: h11.Event) -> None:
        self.queue(event)
        await self.flush()


class _Body:
    """The request body as an async iterator: one socket read per chunk asked for."""

    def __init__(self, exchange: HttpExchange) -> None:
        self._ex = exchange

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._ex._next_body_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class HttpExchange:
    """One request and its answer. Answer exactly once: :meth:`respond` or :meth:`respond_stream`."""

    def __init__(self, conn: _Connection, request: HttpRequest, server: HttpServer) -> None:
        self._conn = conn
        self.request = request
        #: The client's IP address ("" when unknown).
        self.peer = conn.peer
        self._server = server
        self.responded = False
        self.body_done = False  # h11's EndOfMessage, even of no body, is still to be read
        self._body_read = 0
        #: Whether the connection ends after this answer.
        self.close = False

    # -- the body --------------------------------------------------------------------------

    def body(self) -> AsyncIterator[bytes]:
        """The body's chunks as they arrive (each read waits for the handler to ask)."""
        return _Body(self)

    async def read_body(self, limit: int) -> bytes:
        """The whole body, at most ``limit`` bytes (BodyError 413 past it)."""
        parts: list[bytes] = []
        total = 0
        async for chunk in self.body():
            total += len(chunk)
            if total > limit:
                raise BodyError(f"the body is over {limit} bytes", status=413)
            parts.append(bytes(chunk))
        return b"".join(parts)

    async def _next_body_chunk(self) -> bytes | None:
        if self.body_done:
            return None
        conn = self._conn
        h = conn.h11
        if h.they_are_waiting_for_100_continue:
            await conn.send(h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue"))
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                self.close = True
                raise BodyError(f"the request body is malformed or cut short: {exc}") from None
            if event is h11.NEED_DATA:
                if not await conn.receive(trio.current_time() + conn.limits.io_timeout):
                    self.close = True
                    raise BodyError(
                        f"the body stalled: nothing arrived for {conn.limits.io_timeout:g}s "
                        f"after {self._body_read} bytes", status=408,
                    )
                continue
            if isinstance(event, h11.Data):
                self._body_read += len(event.data)
                return event.data
            if isinstance(event, h11.EndOfMessage):
                self.body_done = True
                return None
            self.close = True  # ConnectionClosed, or anything h11 should not give here
            raise BodyError(f"the request body ended with {type(event).__name__}")

    async def _settle_body(self, status: int) -> None:
        """Before answering: read the rest of the body (dropped), or decide to close instead."""
        if self.body_done or self.close:
            return
        if self._conn.h11.they_are_waiting_for_100_continue:
            self.close = True  # the client holds the body back until told: it need not send it
            return
        length = self.request.content_length if self.request.has_body else 0
        small = length is not None and length - self._body_read <= self._server.limits.drain_limit
        if status < 400 or small:
            try:
                async for _ in self.body():
                    pass
            except BodyError:
                self.close = True
        else:
            self.close = True

    # -- the answer ------------------------------------------------------------------------

    def _head(
        self, status: int, length: int, content_type: str, headers: Sequence[tuple[str, str]]
    ) -> h11.Response:
        fields = [("content-type", content_type), ("content-length", str(length)), *headers]
        if self.close or self._server.draining:
            self.close = True
            fields.append(("connection", "close"))
        return h11.Response(status_code=status, headers=fields, reason=_reason(status))

    async def respond(
        self, status: int, body: bytes | str = b"", *, content_type: str = TEXT,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer with ``body`` in one piece (a HEAD request gets its length only)."""
        payload = body.encode() if isinstance(body, str) else body
        await self.respond_stream(status, len(payload), _Once(payload), content_type=content_type,
                                  headers=headers)

    async def respond_stream(
        self, status: int, length: int, chunks: AsyncIterable[bytes], *, content_type: str = TEXT,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Answer with ``length`` bytes from ``chunks``, sent as they come (never all in memory)."""
        if self.responded:
            raise RuntimeError("this request was answered already")
        await self._settle_body(status)
        self.responded = True
        conn = self._conn
        conn.queue(self._head(status, length, content_type, headers))
        if self.request.method != "HEAD":
            async for chunk in chunks:
                if chunk:
                    conn.queue(h11.Data(data=chunk))
                    if conn._queued >= JOIN_LIMIT:
                        await conn.flush()
        conn.queue(h11.EndOfMessage())
        await conn.flush()


_REASONS = {s.value: s.phrase for s in HTTPStatus}


def _reason(status: int) -> str:
    return _REASONS.get(status, "")


class _Once:
    """One chunk, as an async iterator (a class: nothing to finalize if it is not finished)."""

    def __init__(self, payload: bytes) -> None:
        self._payload: bytes | None = payload

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        payload, self._payload = self._payload, None
        if payload is None:
            raise StopAsyncIteration
        await trio.lowlevel.checkpoint()
        return payload


Handler = Callable[[HttpExchange], Awaitable[None]]


async def open_listeners(address: str, what: str = "serve HTTP") -> list[trio.SocketListener]:
    host, port = parse_address(address)
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise InvalidArgument(f"cannot {what} on {address}: {exc.strerror or exc}") from None


def bound_address(listeners: list[trio.SocketListener]) -> str:
    sockname = listeners[0].socket.getsockname()
    return format_address(sockname[0], sockname[1])


class HttpServer:
    """Serves ``handler`` on listeners; connection tasks go into a nursery the caller owns."""

    def __init__(
        self, handler: Handler, *, limits: HttpLimits | None = None,
        tls: object | None = None, name: str = "http",
    ) -> None:
        self.handler = handler
        self.limits = limits or HttpLimits()
        self.tls = tls  # an ssl.SSLContext, or None
        self.name = name
        self.draining = False
        self.counters: dict[str, int] = {"connections": 0, "requests": 0, "errors": 0}
        self._slots = trio.CapacityLimiter(self.limits.max_connections)
        self._waiting: set[trio.CancelScope] = set()  # connections between requests
        self._busy = 0
        self._idle = trio.Event()
        self._idle.set()

    def info(self) -> dict[str, int]:
        return {**self.counters, "open": int(self._slots.borrowed_tokens), "busy": self._busy}

    async def accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        """Accept until cancelled, each connection served in ``nursery`` (a slot held first)."""
        async with listener:
            while True:
                slot = object()
                await self._slots.acquire_on_behalf_of(slot)
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    self._slots.release_on_behalf_of(slot)
                    log.warning("%s accept failed: %s", self.name, exc)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    self._slots.release_on_behalf_of(slot)
                    raise
                nursery.start_soon(self._serve_slot, stream, slot)

    async def serve(
        self, address: str, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen on ``address`` and serve until cancelled (everything in one nursery)."""
        listeners = await open_listeners(address)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self.accept, listener, nursery)
            task_status.started(bound_address(listeners))

    async def drain(self, grace: float) -> None:
        """Stop taking requests: idle connections close, busy ones close after their answer
        (waited for up to ``grace`` seconds). Stop the accept loops separately."""
        self.draining = True
        for scope in list(self._waiting):
            scope.cancel()
        with trio.move_on_after(grace):
            await self._idle.wait()

    async def _serve_slot(self, stream: trio.SocketStream, slot: object) -> None:
        self.counters["connections"] += 1
        wrapped: trio.abc.Stream = stream
        try:
            try:
                peer = str(stream.socket.getpeername()[0])
            except (OSError, IndexError, TypeError):
                peer = ""
            if self.tls is not None:
                wrapped = trio.SSLStream(stream, self.tls, server_side=True)  # type: ignore[arg-type]
            await self._serve(_Connection(wrapped, self.limits, peer))
        except (trio.BrokenResourceError, trio.ClosedResourceError, _SendTimeout, OSError) as exc:
            log.debug("%s client went away: %r", self.name, exc)
        except Exception:
            self.counters["errors"] += 1
            log.exception("%s connection failed; the node goes on serving the others", self.name)
        finally:
            self._slots.release_on_behalf_of(slot)
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(wrapped)

    async def _serve(self, conn: _Connection) -> None:
        while not self.draining:
            event = await self._next_request(conn)
            if event is None:
                return
            self.counters["requests"] += 1
            exchange = HttpExchange(conn, HttpRequest.from_h11(event), self)
            self._busy += 1
            self._idle = trio.Event() if self._busy == 1 else self._idle
            try:
                await self._exchange(exchange)
            finally:
                self._busy -= 1
                if not self._busy:
                    self._idle.set()
            if exchange.close or conn.h11.our_state is not h11.DONE or conn.h11.their_state is not h11.DONE:
                return
            conn.h11.start_next_cycle()

    async def _exchange(self, exchange: HttpExchange) -> None:
        try:
            await self.handler(exchange)
            if not exchange.responded:
                request = exchange.request
                raise RuntimeError(f"the handler did not answer {request.method} {request.path[:200]}")
        except BodyError as exc:
            exchange.close = True
            if exc.status is not None and not exchange.responded:
                await exchange.respond(exc.status, f"{exc.message}\n")
        except (_SendTimeout, trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except Exception:
            self.counters["errors"] += 1
            log.exception("%s %s %s failed", self.name, exchange.request.method, exchange.request.path[:200])
            exchange.close = True
            if not exchange.responded:
                await exchange.respond(500, "internal error (see the node's log)\n")

    async def _next_request(self, conn: _Connection) -> h11.Request | None:
        """The next request's head, or None when the connection should end (answered if need be)."""
        h = conn.h11
        limits = conn.limits
        head_deadline: float | None = None
        scope = trio.CancelScope()
        self._waiting.add(scope)
        try:
            with scope:
                while True:
                    try:
                        event = h.next_event()
                    except h11.RemoteProtocolError as exc:
                        await self._refuse(conn, exc.error_status_hint, f"bad request: {exc}")
                        return None
                    if isinstance(event, h11.Request):
                        return event
                    if event is not h11.NEED_DATA:  # ConnectionClosed (or PAUSED: never, we answer first)
                        return None
                    buffered = len(h.trailing_data[0])
                    if buffered >= limits.max_head:
                        await self._refuse(conn, 431, f"the request head is over {limits.max_head} bytes")
                        return None
                    if head_deadline is None and buffered:
                        head_deadline = trio.current_time() + limits.head_timeout
                    if head_deadline is None:
                        deadline = trio.current_time() + limits.idle_timeout
                    else:
                        deadline = head_deadline
                    # Never more than max_head bytes of head buffered: h11 would parse a head
                    # over its limit that arrived whole.
                    if not await conn.receive(deadline, limits.max_head - buffered):
                        if head_deadline is not None:
                            await self._refuse(conn, 408, f"the request head did not arrive within "
                                               f"{limits.head_timeout:g}s")
                        return None  # idle: close quietly
                    if head_deadline is None:
                        head_deadline = trio.current_time() + limits.head_timeout
            return None  # draining: the idle connection ends
        finally:
            self._waiting.discard(scope)

    async def _refuse(self, conn: _Connection, status: int, message: str) -> None:
        """Answer a request that could not be read, then close."""
        h = conn.h11
        if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        payload = f"{message}\n".encode()
        reason = _reason(status)
        with trio.move_on_after(conn.limits.io_timeout):
            try:
                conn.queue(h11.Response(status_code=status, reason=reason, headers=[
                    ("content-type", TEXT), ("content-length", str(len(payload))), ("connection", "close"),
                ]))
                conn.queue(h11.Data(data=payload))
                conn.queue(h11.EndOfMessage())
                await conn.flush()
            except h11.LocalProtocolError:
                pass


async def serve_metrics(
    address: str,
    render: Callable[[], str],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``render()`` at ``http://ADDRESS/metrics`` until cancelled; reports the bound address."""
    listeners = await open_listeners(address, "serve metrics")

    async def handle(ex: HttpExchange) -> None:
        await answer_metrics(ex, render)

    server = HttpServer(handle, limits=HttpLimits(max_connections=METRICS_CLIENTS), name="metrics")
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(server.accept, listener, nursery)
        task_status.started(bound_address(listeners))


async def answer_metrics(ex: HttpExchange, render: Callable[[], str] | None) -> None:
    """``GET /metrics`` (or ``/``): the Prometheus text format; 404 and 405 otherwise."""
    request = ex.request
    if request.path not in ("/metrics", "/"):
        await ex.respond(404, "metrics are at /metrics\n")
    elif request.method not in ("GET", "HEAD"):
        await ex.respond(405, "only GET and HEAD\n", headers=[("allow", "GET, HEAD")])
    elif render is None:
        await ex.respond(404, "this node has no metrics\n")
    else:
        await ex.respond(200, render(), content_type=CONTENT_TYPE)
