"""Credit as the receiver enforces it: bytes past what it granted end the connection, at once.

The peer here is spoken by hand through the codec, so it can overrun the window on
purpose. A receiver that stopped enforcing credit would take the bytes and say nothing;
every wait below is bounded, so such a receiver fails these tests within seconds, with a
message that says so, instead of hanging until pytest-timeout.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from triode.testing import no_leaks
from triode.wire import codec
from triode.wire.codec import CALL, CREDIT, DATA, END, ERROR, HELLO, PING, PONG, REPLY
from triode.wire.connection import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionConfig,
    IncomingCall,
    open_connection,
)

#: The credit the receiver grants on each stream.
WINDOW = 64 * 1024
#: Seconds (of the autojump clock: nothing real waits) a well-behaved receiver needs at most.
ANSWER_WITHIN = 5.0


class Peer:
    """The sending end, spoken by hand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = codec.Decoder(2**31)

    async def send(self, *messages: list[Any]) -> None:
        await self.stream.send_all(b"".join(codec.encode(m) for m in messages))

    async def receive(self) -> list[Any] | None:
        """The next message other than a PING (answered), or None once the receiver hung up."""
        while True:
            while (m := self.decoder.next_message()) is None:
                data = await self.stream.receive_some()
                if not data:
                    return None
                self.decoder.receive_data(data)
            if m[0] != PING:
                return m
            await self.send([PONG, m[1]])


@asynccontextmanager
async def receiver(handlers: dict[str, Any]) -> AsyncIterator[tuple[Peer, Connection]]:
    """A real connection (the receiver, granting WINDOW) and a hand-spoken peer past the hello."""
    a, b = trio.testing.memory_stream_pair()
    peer = Peer(a)
    async with trio.open_nursery() as nursery:
        conns: list[Connection] = []
        ready = trio.Event()

        async def serve() -> None:
            config = ConnectionConfig(node_id="receiver", window=WINDOW)
            async with open_connection(b, config, handlers=handlers.get, initiator=False) as conn:
                conns.append(conn)
                ready.set()
                await conn.wait_closed()

        nursery.start_soon(serve)
        await peer.send([HELLO, {"version": PROTOCOL_VERSION, "node": "sender", "features": [],
                                 "window": WINDOW, "max_frame": 1 << 20, "max_calls": 10}])
        with trio.fail_after(ANSWER_WITHIN):
            hello = await peer.receive()
            await ready.wait()
        assert hello is not None and hello[0] == HELLO and hello[1]["window"] == WINDOW
        yield peer, conns[0]
        nursery.cancel_scope.cancel()


async def _never_reads(call: IncomingCall) -> None:
    await trio.sleep_forever()


async def _reads_all(call: IncomingCall) -> int:
    total = 0
    async for chunk in call:
        total += len(chunk)
    return total


HANDLERS = {"never.reads": _never_reads, "reads.all": _reads_all}


async def _still_served(peer: Peer, call_id: int) -> None:
    """Everything sent so far was taken without complaint: a call behind it is answered."""
    await peer.send([CALL, call_id, "reads.all", None, {}])
    with trio.move_on_after(ANSWER_WITHIN):
        m = await peer.receive()
        assert m == [REPLY, call_id, 0], f"the receiver refused bytes within its credit: {m}"
        return
    pytest.fail("the receiver did not answer a call behind bytes within its credit")


async def _refused(peer: Peer, conn: Connection, what: str) -> None:
    """The receiver answers an overrun with PROTOCOL_ERROR naming credit, then hangs up."""
    with trio.move_on_after(ANSWER_WITHIN):
        m = await peer.receive()
        assert m is not None, f"the receiver hung up without saying why after {what}"
        assert m[:3] == [ERROR, 0, "PROTOCOL_ERROR"] and "credit" in m[3], (
            f"after {what}, the receiver answered {m} where a PROTOCOL_ERROR about credit was due"
        )
        assert await peer.receive() is None  # and then it hangs up
        await conn.wait_closed()
        return
    pytest.fail(
        f"credit not enforced: the receiver took {what} and said nothing for {ANSWER_WITHIN:g} s "
        f"(it granted {WINDOW} bytes and must refuse more with a PROTOCOL_ERROR)"
    )


async def test_one_frame_larger_than_the_credit_is_refused(autojump_clock: trio.abc.Clock) -> None:
    async with no_leaks(), receiver(HANDLERS) as (peer, conn):
        await peer.send([CALL, 1, "never.reads", None, {"up": True}], [DATA, 1, b"x" * (WINDOW + 1)])
        await _refused(peer, conn, f"one DATA frame of {WINDOW + 1} bytes")


async def test_frames_adding_up_past_the_credit_are_refused_at_the_byte(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The whole window is accepted, in pieces; one byte more, unread and with no credit back, is not."""
    piece = WINDOW // 4
    async with no_leaks(), receiver(HANDLERS) as (peer, conn):
        await peer.send([CALL, 1, "never.reads", None, {"up": True}], *([DATA, 1, b"x" * piece],) * 4)
        await _still_served(peer, 3)
        await peer.send([DATA, 1, b"x"])
        await _refused(peer, conn, f"{WINDOW + 1} bytes in 5 DATA frames (none of them read)")


async def test_credit_given_back_is_honoured_and_counted(autojump_clock: trio.abc.Clock) -> None:
    """A reader gives credit back as it reads: a sender that waits for it may send four windows
    (the positive side, so the tests above cannot pass by refusing everything)."""
    total = 4 * WINDOW
    async with no_leaks(), receiver(HANDLERS) as (peer, _):
        await peer.send([CALL, 1, "reads.all", None, {"up": True}])
        credit, sent = WINDOW, 0
        m: list[Any] | None = None
        with trio.move_on_after(ANSWER_WITHIN):
            while sent < total:
                while credit == 0:
                    m = await peer.receive()
                    assert m is not None and m[:2] == [CREDIT, 1], f"expected credit back, got {m}"
                    credit += m[2]
                n = min(credit, 8 * 1024, total - sent)
                await peer.send([DATA, 1, b"y" * n])
                credit -= n
                sent += n
            await peer.send([END, 1])
            while (m := await peer.receive()) is not None and m[0] == CREDIT:
                credit += m[2]
        assert sent == total, (
            f"no credit came back: {sent} bytes sent, all of them read, and the sender is still "
            f"waiting for CREDIT after {ANSWER_WITHIN:g} s (the window is {WINDOW})"
        )
        assert m == [REPLY, 1, total]
        assert credit <= WINDOW  # never granted more than the window outstanding
