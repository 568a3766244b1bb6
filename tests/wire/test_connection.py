"""Connections over in-memory streams: calls, streams, credits, cancellation, deadlines, keepalive.

Both ends run in the test's trio run, usually under ``autojump_clock`` so timers cost
nothing. A "fake peer" speaks the protocol by hand through the codec, to play a
misbehaving or silent peer exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from triode import errors
from triode.errors import ConnectionClosed
from triode.testing import no_leaks
from triode.wire import codec
from triode.wire.codec import CALL, CANCEL, DATA, ERROR, HELLO, PING, PONG, REPLY
from triode.wire.connection import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionConfig,
    IncomingCall,
    open_connection,
)

# -- helpers ---------------------------------------------------------------------------


class Tap(trio.abc.Stream):
    """A stream that decodes the frames written through it and counts DATA bytes per call."""

    def __init__(self, inner: trio.abc.Stream, on_data: Callable[[int, int], None]) -> None:
        self.inner = inner
        self.decoder = codec.Decoder(2**31)
        self.on_data = on_data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.decoder.receive_data(bytes(data))
        while (m := self.decoder.next_message()) is not None:
            if m[0] == DATA:
                self.on_data(m[1], len(m[2]))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def table(**handlers: Callable[[IncomingCall], Any]) -> Callable[[str], Any]:
    named = {name.replace("_", "."): h for name, h in handlers.items()}
    return named.get


@asynccontextmanager
async def pair(
    handlers: Callable[[str], Any] | None = None,
    *,
    client: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
    streams: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> AsyncIterator[tuple[Connection, Connection]]:
    """A client connection and a server connection joined by memory streams."""
    a, b = streams or trio.testing.memory_stream_pair()
    ccfg = ConnectionConfig(node_id="client", **(client or {}))
    scfg = ConnectionConfig(node_id="server", **(server or {}))
    async with trio.open_nursery() as nursery:
        server_conn: list[Connection] = []
        ready = trio.Event()

        async def serve() -> None:
            async with open_connection(b, scfg, handlers=handlers, initiator=False) as conn:
                server_conn.append(conn)
                ready.set()
                await conn.wait_closed()

        nursery.start_soon(serve)
        async with open_connection(a, ccfg, initiator=True) as cconn:
            await ready.wait()
            yield cconn, server_conn[0]
        nursery.cancel_scope.cancel()


class FakePeer:
    """One end of a stream, spoken by hand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = codec.Decoder(2**31)

    async def send(self, message: list[Any]) -> None:
        await self.stream.send_all(codec.encode(message))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive(self) -> list[Any] | None:
        """The next message, or None when the other side closed."""
        while (m := self.decoder.next_message()) is None:
            data = await self.stream.receive_some()
            if not data:
                return None
            self.decoder.receive_data(data)
        return m

    async def receive_kind(self, kind: int) -> list[Any]:
        """The next message of ``kind``, answering PINGs and skipping the rest."""
        while True:
            m = await self.receive()
            assert m is not None, "connection closed"
            if m[0] == kind:
                return m
            if m[0] == PING:
                await self.send([PONG, m[1]])

    @staticmethod
    def hello(**overrides: Any) -> list[Any]:
        body = {"version": PROTOCOL_VERSION, "node": "fake", "features": [], "window": 65536,
                "max_frame": 1 << 20, "max_calls": 100}
        body.update(overrides)
        return [HELLO, body]


@asynccontextmanager
async def served_by_real(
    handlers: Callable[[str], Any], **server: Any
) -> AsyncIterator[tuple[FakePeer, Connection]]:
    """A fake client, already past the hello, talking to a real server connection."""
    a, b = trio.testing.memory_stream_pair()
    peer = FakePeer(a)
    async with trio.open_nursery() as nursery:
        conns: list[Connection] = []
        ready = trio.Event()

        async def serve() -> None:
            cfg = ConnectionConfig(node_id="server", **server)
            async with open_connection(b, cfg, handlers=handlers, initiator=False) as conn:
                conns.append(conn)
                ready.set()
                await conn.wait_closed()

        nursery.start_soon(serve)
        await peer.send(FakePeer.hello())
        assert (await peer.receive())[0] == HELLO
        await ready.wait()
        yield peer, conns[0]
        nursery.cancel_scope.cancel()


# -- unary calls -----------------------------------------------------------------------


async def echo(call: IncomingCall) -> Any:
    return call.args


async def test_unary_call_round_trip() -> None:
    async with no_leaks(), pair(table(echo=echo)) as (client, server):
        value = {"a": [1, 2.5, None, True, b"\x00bytes", "text"], "nested": {"k": -(2**63)}}
        assert await client.call("echo", value) == value
        assert client.peer.node == "server" and server.peer.node == "client"


async def test_many_concurrent_calls_on_one_connection(autojump_clock: trio.abc.Clock) -> None:
    seen_at_once = 0

    async def slow_echo(call: IncomingCall) -> Any:
        nonlocal seen_at_once
        seen_at_once = max(seen_at_once, call.connection.serving)
        await trio.sleep(0.001 * (call.args % 7))
        return call.args * 2

    results: dict[int, int] = {}
    async with no_leaks(), pair(table(slow_echo=slow_echo), server={"max_calls": 64}) as (client, _):

        async def one(i: int) -> None:
            results[i] = await client.call("slow.echo", i)

        async with trio.open_nursery() as nursery:
            for i in range(1000):
                nursery.start_soon(one, i)
    assert results == {i: 2 * i for i in range(1000)}
    # The client kept to the server's max_calls, and really ran calls side by side.
    assert seen_at_once == 64


async def test_both_sides_can_call() -> None:
    async def ask_back(call: IncomingCall) -> Any:
        return await call.connection.call("whoami")

    async def whoami(call: IncomingCall) -> Any:
        return "the client"

    a, b = trio.testing.memory_stream_pair()
    async with no_leaks(), trio.open_nursery() as nursery:
        async def serve() -> None:
            cfg = ConnectionConfig(node_id="server")
            async with open_connection(b, cfg, handlers=table(ask_back=ask_back), initiator=False) as c:
                await c.wait_closed()

        nursery.start_soon(serve)
        cfg = ConnectionConfig(node_id="client")
        async with open_connection(a, cfg, handlers=table(whoami=whoami)) as client:
            assert await client.call("ask.back") == "the client"
        nursery.cancel_scope.cancel()


async def test_typed_errors_cross_the_wire() -> None:
    async def fail(call: IncomingCall) -> Any:
        raise errors.BlobNotFound("no such blob", digest=["ab", 3])

    async def bug(call: IncomingCall) -> Any:
        raise ZeroDivisionError("oops")

    async def too_slow(call: IncomingCall) -> Any:
        raise trio.TooSlowError

    async with no_leaks(), pair(table(fail=fail, bug=bug, too_slow=too_slow, echo=echo)) as (client, _):
        with pytest.raises(errors.BlobNotFound) as info:
            await client.call("fail")
        assert info.value.details == {"digest": ["ab", 3]}
        assert isinstance(info.value, errors.NotFound)
        with pytest.raises(errors.Internal, match="ZeroDivisionError"):
            await client.call("bug")
        with pytest.raises(errors.DeadlineExceeded):
            await client.call("too.slow")
        with pytest.raises(errors.Unimplemented, match="no method 'nope'"):
            await client.call("nope")
        # The connection is fine after all of that.
        assert await client.call("echo", "ok") == "ok"


async def test_unsendable_results_and_arguments_fail_only_that_call() -> None:
    async def weird(call: IncomingCall) -> Any:
        return object()

    async def huge(call: IncomingCall) -> Any:
        return b"x" * (2 << 20)

    async def bad_details(call: IncomingCall) -> Any:
        raise errors.InvalidArgument("bad thing", thing=object())

    handlers = table(weird=weird, huge=huge, bad_details=bad_details, echo=echo)
    async with no_leaks(), pair(handlers, client={"max_frame": 1 << 20}) as (client, _):
        with pytest.raises(errors.Internal, match="cannot be sent"):
            await client.call("weird")
        with pytest.raises(errors.TooLarge, match="frame limit"):
            await client.call("huge")
        with pytest.raises(errors.InvalidArgument, match="bad thing"):
            await client.call("bad.details")
        with pytest.raises(errors.InvalidArgument, match="cannot be sent"):
            await client.call("echo", object())
        with pytest.raises(errors.TooLarge):
            await client.call("echo", b"x" * (codec.DEFAULT_MAX_FRAME + 1))
        assert await client.call("echo", 5) == 5


class _Exploding(dict[str, Any]):
    """A dict whose packing runs our code, which fails: not an encoding error as such."""

    def items(self) -> Any:
        raise RuntimeError("boom while packing")


@pytest.mark.parametrize("value", [{1, 2}, 2**64, memoryview(b"abcdef")[::2], [{"deep": object()}]])
async def test_a_value_msgpack_cannot_hold_fails_the_call_not_the_connection(value: Any) -> None:
    """Our own unencodable value (an EncodeError, not a ProtocolError) never reaches the
    peer as a broken frame: the handler's caller gets an error reply, a caller's own bad
    arguments fail locally, and the connection serves on."""
    async def returns(call: IncomingCall) -> Any:
        return value

    async def streams_then_returns(call: IncomingCall) -> Any:
        await call.send(b"chunk")
        return value

    async def exploding(call: IncomingCall) -> Any:
        return _Exploding(a=1)

    handlers = table(returns=returns, streams_then_returns=streams_then_returns, exploding=exploding,
                     echo=echo)
    async with no_leaks(), pair(handlers) as (client, server):
        with pytest.raises(errors.Internal, match="cannot be sent"):
            await client.call("returns")
        async with client.open_call("streams.then.returns") as call:
            assert await call.receive() == b"chunk"
            with pytest.raises(errors.Internal, match="cannot be sent"):
                await call.result()
        with pytest.raises(errors.Internal, match="boom while packing"):
            await client.call("exploding")
        with pytest.raises(errors.InvalidArgument, match="cannot be sent") as info:
            await client.call("echo", value)
        assert not isinstance(info.value, (errors.ProtocolError, errors.EncodeError))
        assert await client.call("echo", "still fine") == "still fine"
        assert not client.closed and not server.closed


# -- streams ---------------------------------------------------------------------------


async def test_upload_download_and_early_answer() -> None:
    async def count(call: IncomingCall) -> int:
        return sum([len(c) async for c in call])

    async def produce(call: IncomingCall) -> str:
        for i in range(call.args):
            await call.send(bytes([i]) * 1000)
        return "done"

    async def reject_early(call: IncomingCall) -> str:
        await call.receive()
        raise errors.InvalidArgument("first chunk was enough")

    async with no_leaks(), pair(table(count=count, produce=produce, reject_early=reject_early)) as (c, _):
        async with c.open_call("count", upload=True) as call:
            for _ in range(100):
                assert await call.send(b"y" * 50_000)
            assert await call.result() == 5_000_000

        async with c.open_call("produce", 30) as call:
            got = [chunk async for chunk in call]
            assert await call.result() == "done"
        assert b"".join(got) == b"".join(bytes([i]) * 1000 for i in range(30))

        async with c.open_call("reject.early", upload=True) as call:
            accepted = True
            for _ in range(1000):  # far more than the window: the answer must stop us
                accepted = await call.send(b"z" * 10_000)
                if not accepted:
                    break
            assert not accepted
            with pytest.raises(errors.InvalidArgument, match="enough"):
                await call.result()

        with pytest.raises(errors.InvalidArgument, match="open_call"):
            await c.call("produce", 1)


async def test_slow_reader_of_256_mib_bounds_the_bytes_in_flight(autojump_clock: trio.abc.Clock) -> None:
    """The sender never has more than the window in flight; a unary call still answers at once."""
    total = 256 * 1024 * 1024
    window = 1024 * 1024
    blob = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # 4 MiB, sent 64 times

    async def stream(call: IncomingCall) -> int:
        view = memoryview(blob)
        for _ in range(total // len(blob)):
            await call.send(view)
        return total

    sent = consumed = worst = 0

    def on_data(call_id: int, n: int) -> None:
        """Called as the sender writes each DATA frame: the moment in-flight bytes peak."""
        nonlocal sent, worst
        sent += n
        worst = max(worst, sent - consumed)
        assert sent - consumed <= window, f"{sent - consumed} bytes in flight with a window of {window}"

    a, b = trio.testing.memory_stream_pair()
    tap = Tap(b, on_data)  # the server writes through the tap: it sees what goes on the wire
    handlers = table(stream=stream, echo=echo)
    unary_lags: list[float] = []
    server = {"max_chunk": 256 * 1024}
    async with no_leaks(), pair(handlers, client={"window": window}, server=server,
                                streams=(a, tap)) as (client, _):
        async with client.open_call("stream") as call, trio.open_nursery() as nursery:
            done = trio.Event()

            async def unary_while_streaming() -> None:
                while not done.is_set():
                    start = trio.current_time()
                    assert await client.call("echo", "still here") == "still here"
                    unary_lags.append(trio.current_time() - start)
                    await trio.sleep(0.1)

            nursery.start_soon(unary_while_streaming)
            while (chunk := await call.receive()) is not None:
                consumed += len(chunk)
                await trio.sleep(0.001)  # the slow reader: ~1 ms per chunk
            assert await call.result() == total
            done.set()
        assert consumed == total
    # The window was used (the reader grants credit at half of it), never exceeded.
    assert window // 2 < worst <= window
    # The reader took over a second of (virtual) time; each unary call answered with no wait.
    assert len(unary_lags) > 5
    assert max(unary_lags) <= 0.001


async def test_a_reader_that_never_reads_does_not_stall_other_calls(autojump_clock: trio.abc.Clock) -> None:
    async def flood(call: IncomingCall) -> None:
        while True:
            await call.send(b"f" * 65536)

    async with no_leaks(), pair(table(flood=flood, echo=echo)) as (client, server):
        async with client.open_call("flood"):
            await trio.sleep(5)
            for i in range(10):
                assert await client.call("echo", i) == i
            # Nothing beyond the window is buffered for the unread stream.
            assert client._proto.made  # the stream is still open
            assert server._out_bytes == 0


# -- cancellation and deadlines --------------------------------------------------------


async def test_cancelled_caller_cancels_the_handler(autojump_clock: trio.abc.Clock) -> None:
    started = trio.Event()
    cancelled = trio.Event()

    async def forever(call: IncomingCall) -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.set()
            raise

    async with no_leaks(), pair(table(forever=forever)) as (client, server):
        with trio.move_on_after(1) as scope:
            await client.call("forever")
        assert scope.cancelled_caught and started.is_set()
        with trio.fail_after(1):
            await cancelled.wait()
        await trio.sleep(0.1)
        assert server.serving == 0 and not client._proto.made


async def test_leaving_a_stream_early_cancels_the_handler(autojump_clock: trio.abc.Clock) -> None:
    cancelled = trio.Event()

    async def endless(call: IncomingCall) -> None:
        try:
            while True:
                await call.send(b"e" * 1000)
        except trio.Cancelled:
            cancelled.set()
            raise

    async with no_leaks(), pair(table(endless=endless)) as (client, server):
        async with client.open_call("endless") as call:
            assert await call.receive() is not None
        with trio.fail_after(1):
            await cancelled.wait()
        await trio.sleep(0.1)
        assert server.serving == 0


async def test_handler_failing_mid_stream_reaches_the_reader(autojump_clock: trio.abc.Clock) -> None:
    async def breaks(call: IncomingCall) -> None:
        await call.send(b"first")
        raise errors.Unavailable("backing node went away", node="b:1")

    async with no_leaks(), pair(table(breaks=breaks)) as (client, _):
        async with client.open_call("breaks") as call:
            assert await call.receive() == b"first"
            with pytest.raises(errors.Unavailable, match="went away"):
                await call.receive()
            with pytest.raises(errors.Unavailable):
                await call.result()


async def test_deadline_travels_and_the_server_enforces_it(autojump_clock: trio.abc.Clock) -> None:
    seen: list[float] = []

    async def note_deadline(call: IncomingCall) -> None:
        seen.append(call.deadline - trio.current_time())
        await trio.sleep_forever()

    async with no_leaks(), served_by_real(table(note_deadline=note_deadline)) as (peer, server):
        # A caller that never cancels: only the server's own enforcement can end the call.
        start = trio.current_time()
        await peer.send([CALL, 1, "note.deadline", None, {"timeout": 2.5}])
        m = await peer.receive_kind(ERROR)
        assert m[:3] == [ERROR, 1, "DEADLINE_EXCEEDED"]
        assert "passed its deadline" in m[3]
        assert trio.current_time() - start == pytest.approx(2.5)
        assert seen == [pytest.approx(2.5)]
        assert server.serving == 0


async def test_caller_deadline_is_sent_in_meta(autojump_clock: trio.abc.Clock) -> None:
    got: list[float] = []

    async def deadline(call: IncomingCall) -> None:
        got.append(call.deadline - trio.current_time())

    async with no_leaks(), pair(table(deadline=deadline)) as (client, _):
        with trio.fail_after(7):
            await client.call("deadline")
        await client.call("deadline")
    assert got[0] == pytest.approx(7) and got[1] == math.inf


async def test_a_cancel_is_not_answered(autojump_clock: trio.abc.Clock) -> None:
    async def forever(call: IncomingCall) -> None:
        await trio.sleep_forever()

    async with no_leaks(), served_by_real(table(forever=forever, echo=echo)) as (peer, server):
        await peer.send([CALL, 1, "forever", None, {}])
        await trio.sleep(1)
        assert server.serving == 1
        await peer.send([CANCEL, 1])
        await peer.send([CALL, 3, "echo", "after", {}])
        assert await peer.receive_kind(REPLY) == [REPLY, 3, "after"]  # nothing came for call 1
        assert server.serving == 0


# -- misbehaving peers -------------------------------------------------------------------


async def test_server_refuses_calls_over_its_limit(autojump_clock: trio.abc.Clock) -> None:
    async def forever(call: IncomingCall) -> None:
        await trio.sleep_forever()

    async with no_leaks(), served_by_real(table(forever=forever), max_calls=3) as (peer, server):
        for i in (1, 3, 5, 7):
            await peer.send([CALL, i, "forever", None, {}])
        m = await peer.receive_kind(ERROR)
        assert m[:3] == [ERROR, 7, "RESOURCE_EXHAUSTED"] and m[4]["retry_after"] > 0
        assert server.serving == 3


@pytest.mark.parametrize(
    "message, complaint",
    [
        ([CALL, 2, "echo", None, {}], "wrong parity"),
        ([CALL, 0, "echo", None, {}], "wrong parity"),
        ([CALL, 1, "echo", None, {"timeout": "soon"}], "timeout"),
        ([HELLO, {}], "unexpected HELLO"),
        ([DATA, 1, b"x" * 70_000], "credit"),  # call 1 is a live upload with 64 KiB of credit
    ],
)
async def test_protocol_violations_close_the_connection_with_a_reason(
    autojump_clock: trio.abc.Clock, message: list[Any], complaint: str
) -> None:
    async def slow_upload(call: IncomingCall) -> None:
        await trio.sleep_forever()

    handlers = table(echo=echo, slow_upload=slow_upload)
    async with no_leaks(), served_by_real(handlers, window=65536) as (peer, server):
        if message[0] == DATA:
            await peer.send([CALL, 1, "slow.upload", None, {"up": True}])
        await peer.send(message)
        m = await peer.receive_kind(ERROR)
        assert m[1] == 0 and m[2] == "PROTOCOL_ERROR" and complaint in m[3]
        assert await peer.receive() is None  # then the server hangs up
        await server.wait_closed()
        assert isinstance(server.close_reason, ConnectionClosed)


async def test_calls_sent_right_behind_the_hello_are_served() -> None:
    """A client may pipeline its first calls with its hello (one packet, no round trip)."""
    a, b = trio.testing.memory_stream_pair()
    peer = FakePeer(a)
    async with no_leaks(), trio.open_nursery() as nursery:
        async def serve() -> None:
            cfg = ConnectionConfig(node_id="server")
            async with open_connection(b, cfg, handlers=table(echo=echo), initiator=False) as conn:
                await conn.wait_closed()

        nursery.start_soon(serve)
        await peer.send_raw(codec.encode(FakePeer.hello()) + codec.encode([CALL, 1, "echo", "hi", {}]))
        assert (await peer.receive())[0] == HELLO
        assert await peer.receive_kind(REPLY) == [REPLY, 1, "hi"]
        nursery.cancel_scope.cancel()


async def test_reused_call_id_is_a_protocol_error(autojump_clock: trio.abc.Clock) -> None:
    async with no_leaks(), served_by_real(table(echo=echo)) as (peer, server):
        await peer.send([CALL, 5, "echo", 1, {}])
        assert await peer.receive_kind(REPLY) == [REPLY, 5, 1]
        await peer.send([CALL, 5, "echo", 2, {}])
        m = await peer.receive_kind(ERROR)
        assert m[2] == "PROTOCOL_ERROR" and "must increase" in m[3]


async def test_frame_over_the_limit_is_refused(autojump_clock: trio.abc.Clock) -> None:
    async with no_leaks(), served_by_real(table(echo=echo), max_frame=1 << 20) as (peer, server):
        await peer.stream.send_all((2 << 20).to_bytes(4, "big"))
        m = await peer.receive_kind(ERROR)
        assert m[2] == "FRAME_TOO_LARGE" and m[4] == {"size": 2 << 20, "limit": 1 << 20}
        await server.wait_closed()


async def test_peer_that_sends_but_never_reads_is_cut_off(autojump_clock: trio.abc.Clock) -> None:
    """Answers to PINGs would pile up forever; instead the connection is closed."""
    a, b = trio.testing.lockstep_stream_pair()  # nothing is buffered: unread means blocked
    peer = FakePeer(a)
    async with no_leaks(), trio.open_nursery() as nursery:
        closed = trio.Event()

        async def serve() -> None:
            cfg = ConnectionConfig(node_id="server", send_buffer=65536)
            async with open_connection(b, cfg, initiator=False) as conn:
                await conn.wait_closed()
                assert "does not read" in str(conn.close_reason)
                closed.set()

        nursery.start_soon(serve)
        await peer.send(FakePeer.hello())
        assert (await peer.receive())[0] == HELLO
        with trio.move_on_after(60):
            frame = codec.encode([PING, 1]) * 1000
            while not closed.is_set():
                await peer.stream.send_all(frame)
        assert closed.is_set()
        nursery.cancel_scope.cancel()


# -- the hello -------------------------------------------------------------------------


async def test_incompatible_version_is_refused_both_ways() -> None:
    a, b = trio.testing.memory_stream_pair()
    peer = FakePeer(a)
    async with no_leaks(), trio.open_nursery() as nursery:
        async def serve() -> None:
            with pytest.raises(errors.IncompatibleVersion):
                async with open_connection(b, ConnectionConfig(node_id="s"), initiator=False):
                    pass

        nursery.start_soon(serve)
        await peer.send(FakePeer.hello(version=PROTOCOL_VERSION + 1))
        m = await peer.receive()
        assert m[:3] == [ERROR, 0, "INCOMPATIBLE_VERSION"] and "upgrade" in m[3]
        assert await peer.receive() is None

    a, b = trio.testing.memory_stream_pair()
    peer = FakePeer(b)
    async with no_leaks(), trio.open_nursery() as nursery:
        async def fake_server() -> None:
            await peer.receive()
            await peer.send(FakePeer.hello(version=0))

        nursery.start_soon(fake_server)
        with pytest.raises(errors.IncompatibleVersion, match="version 0"):
            async with open_connection(a, ConnectionConfig(node_id="c")):
                pass


@pytest.mark.parametrize(
    "first, complaint",
    [
        ([CALL, 1, "echo", None, {}], "expected HELLO, got CALL"),
        ([PING, 1], "expected HELLO, got PING"),
        ([HELLO, {"version": PROTOCOL_VERSION}], "hello field"),
        (FakePeer.hello(window=1), "window"),
        (FakePeer.hello(node=""), "node"),
        (FakePeer.hello(token=5), "token"),
    ],
)
async def test_bad_hellos_are_refused(first: list[Any], complaint: str) -> None:
    a, b = trio.testing.memory_stream_pair()
    peer = FakePeer(a)
    async with no_leaks(), trio.open_nursery() as nursery:
        async def serve() -> None:
            with pytest.raises(errors.ProtocolError):
                async with open_connection(b, ConnectionConfig(node_id="s"), initiator=False):
                    pytest.fail("a connection with a bad hello must not open")

        nursery.start_soon(serve)
        await peer.send(first)
        m = await peer.receive()
        assert m[:3] == [ERROR, 0, "PROTOCOL_ERROR"] and complaint in m[3]
        assert await peer.receive() is None


async def test_big_frame_before_the_hello_is_refused() -> None:
    a, b = trio.testing.memory_stream_pair()
    peer = FakePeer(a)
    async with no_leaks(), trio.open_nursery() as nursery:
        async def serve() -> None:
            with pytest.raises(errors.FrameTooLarge):
                async with open_connection(b, ConnectionConfig(node_id="s"), initiator=False):
                    pass

        nursery.start_soon(serve)
        await peer.stream.send_all((1 << 20).to_bytes(4, "big"))
        m = await peer.receive()
        assert m[:3] == [ERROR, 0, "FRAME_TOO_LARGE"]


async def test_silent_peer_times_out_in_the_hello(autojump_clock: trio.abc.Clock) -> None:
    a, b = trio.testing.memory_stream_pair()
    async with no_leaks():
        start = trio.current_time()
        with pytest.raises(ConnectionClosed, match="no hello within 3"):
            async with open_connection(b, ConnectionConfig(node_id="s", handshake_timeout=3),
                                       initiator=False):
                pass
        assert trio.current_time() - start == pytest.approx(3)
    del a


async def test_token_is_checked_by_the_acceptor() -> None:
    for offered, complaint in ((None, "none was given"), ("wrong", "the one given is wrong")):
        a, b = trio.testing.memory_stream_pair()
        async with no_leaks(), trio.open_nursery() as nursery:
            async def serve(b: trio.abc.Stream = b) -> None:
                cfg = ConnectionConfig(node_id="s", required_token="s3cret")
                with pytest.raises(errors.AuthenticationFailed):
                    async with open_connection(b, cfg, initiator=False):
                        pass

            nursery.start_soon(serve)
            with pytest.raises(errors.AuthenticationFailed, match=complaint):
                async with open_connection(a, ConnectionConfig(node_id="c", token=offered)):
                    pass
    async with no_leaks(), pair(table(echo=echo), client={"token": "s3cret"},
                                server={"required_token": "s3cret"}) as (client, _):
        assert await client.call("echo", 1) == 1


# -- keepalive and closing -------------------------------------------------------------


async def test_idle_but_alive_peer_is_kept(autojump_clock: trio.abc.Clock) -> None:
    fast = {"keepalive_interval": 1.0, "dead_after": 3.0}
    async with no_leaks(), pair(table(echo=echo), client=fast, server=fast) as (client, server):
        await trio.sleep(100)
        assert not client.closed and not server.closed
        assert await client.call("echo", 1) == 1


@pytest.mark.parametrize("interval, dead_after", [(1.0, 3.0), (10.0, 30.0), (5.0, 2.0)])
async def test_dead_peer_is_found_within_dead_after(
    autojump_clock: trio.abc.Clock, interval: float, dead_after: float
) -> None:
    """A peer that stops answering (not even PINGs) is declared dead on time; calls fail."""
    a, b = trio.testing.memory_stream_pair()
    peer = FakePeer(b)
    async with no_leaks(), trio.open_nursery() as nursery:
        async def fake_then_silent() -> None:
            await peer.receive()
            await peer.send(FakePeer.hello())
            await peer.receive_kind(CALL)
            await trio.sleep_forever()  # stops reading and answering

        nursery.start_soon(fake_then_silent)
        cfg = ConnectionConfig(node_id="c", keepalive_interval=interval, dead_after=dead_after)
        async with open_connection(a, cfg) as client:
            start = trio.current_time()
            with pytest.raises(ConnectionClosed, match="presumed dead"):
                await client.call("anything")
            assert trio.current_time() - start == pytest.approx(dead_after, abs=0.01)
            assert client.closed
            with pytest.raises(ConnectionClosed):
                await client.call("again")
        nursery.cancel_scope.cancel()


async def test_closing_fails_calls_in_flight_and_cancels_handlers(autojump_clock: trio.abc.Clock) -> None:
    handler_cancelled = trio.Event()

    async def forever(call: IncomingCall) -> None:
        try:
            await trio.sleep_forever()
        finally:
            handler_cancelled.set()

    async with no_leaks(), pair(table(forever=forever)) as (client, server):
        async with trio.open_nursery() as nursery:
            failures: list[BaseException] = []

            async def call_and_fail() -> None:
                try:
                    await client.call("forever")
                except ConnectionClosed as exc:
                    failures.append(exc)

            for _ in range(5):
                nursery.start_soon(call_and_fail)
            await trio.sleep(1)
            assert server.serving == 5
            server.close("server going away")
        assert len(failures) == 5 and all("closed the connection" in str(f) for f in failures)
        assert handler_cancelled.is_set()

    async with no_leaks(), pair(table(forever=forever)) as (client, server):
        async with trio.open_nursery() as nursery:
            async def call_and_expect() -> None:
                with pytest.raises(ConnectionClosed, match="closed by this side"):
                    await client.call("forever")

            nursery.start_soon(call_and_expect)
            await trio.sleep(1)
            client.close("closed by this side")
        with trio.fail_after(1):
            await server.wait_closed()


@pytest.mark.parametrize("late", [ConnectionClosed("gone"), RuntimeError("a bug")])
async def test_a_handler_failing_as_its_connection_closes_ends_it_quietly(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture, late: Exception
) -> None:
    """A handler with tasks of its own, one of which fails because the connection is closing
    (a send on it, say) while the others are cancelled: the connection still ends as
    itself, not as an ExceptionGroup out of open_connection. A consequence of the closing
    is not logged; anything else is, once."""

    async def busy(call: IncomingCall) -> None:
        async def fail_when_cancelled() -> None:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                raise late from None

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            nursery.start_soon(fail_when_cancelled)

    async with no_leaks(), pair(table(busy=busy)) as (client, server):
        async with trio.open_nursery() as nursery:
            async def call_and_fail() -> None:
                with pytest.raises(ConnectionClosed):
                    await client.call("busy")

            nursery.start_soon(call_and_fail)
            await trio.sleep(1)
            assert server.serving == 1
            server.close("server going away")
        with trio.fail_after(1):
            await server.wait_closed()
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if isinstance(late, ConnectionClosed):
        assert logged == []
    else:
        assert [r.getMessage() for r in logged] == ["handler for busy failed as its connection closed"]


async def test_stream_in_flight_fails_when_the_connection_closes(autojump_clock: trio.abc.Clock) -> None:
    async def dribble(call: IncomingCall) -> None:
        while True:
            await call.send(b"d")
            await trio.sleep(0.1)

    async with no_leaks(), pair(table(dribble=dribble)) as (client, server):
        async with client.open_call("dribble") as call:
            assert await call.receive() == b"d"
            server.close()
            with pytest.raises(ConnectionClosed):
                while True:
                    await call.receive()


async def test_goodbye_refuses_new_calls_and_lets_running_ones_finish(
    autojump_clock: trio.abc.Clock,
) -> None:
    async def slow(call: IncomingCall) -> str:
        await trio.sleep(2)
        return "finished"

    async with no_leaks(), pair(table(slow=slow)) as (client, server):
        async with trio.open_nursery() as nursery:
            result: list[str] = []

            async def call_slow() -> None:
                result.append(await client.call("slow"))

            nursery.start_soon(call_slow)
            await trio.sleep(0.5)
            server.drain()
            await trio.sleep(0.1)
            with pytest.raises(ConnectionClosed, match="shutting down"):
                await client.call("slow")
            await server.wait_idle()
        assert result == ["finished"]


async def test_receive_many_takes_what_is_buffered_up_to_its_limit(autojump_clock: trio.abc.Clock) -> None:
    """Bulk readers (zstd decoding) take several buffered chunks per wake-up; credit keeps flowing."""
    batches: list[list[int]] = []

    async def gather(call: IncomingCall) -> int:
        await trio.sleep(1)  # let the client fill its window first
        total = 0
        while (chunks := await call.receive_many(300_000)) is not None:
            assert chunks and (len(chunks) == 1 or sum(map(len, chunks)) <= 300_000)
            batches.append([len(c) for c in chunks])
            total += sum(map(len, chunks))
        return total

    async def produce(call: IncomingCall) -> None:
        for _ in range(40):
            await call.send(b"d" * 100_000)

    async with no_leaks(), pair(table(gather=gather, produce=produce)) as (c, _):
        async with c.open_call("gather", upload=True) as call:
            for _ in range(100):  # 10 MB: more than two windows, so credit must come back
                assert await call.send(b"u" * 100_000)
            assert await call.result() == 10_000_000
        assert max(map(len, batches)) > 1  # several chunks per wake-up, never past the limit

        async with c.open_call("produce") as call:
            await trio.sleep(1)
            got = 0
            while (chunks := await call.receive_many(10**9)) is not None:
                got += sum(map(len, chunks))
            assert got == 4_000_000
            await call.result()
