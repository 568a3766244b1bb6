"""A real node over TCP: bad input on one connection never hurts another; auth; TLS; shutdown."""

from __future__ import annotations

import ssl
import struct
from typing import Any

import msgpack
import pytest
import trio
import trustme

import triode
from triode import errors
from triode.testing import no_leaks
from triode.wire import codec
from triode.wire.codec import CALL, ERROR, HELLO, REPLY
from triode.wire.connection import PROTOCOL_VERSION, IncomingCall
from triode.wire.transport import parse_address


async def raw(address: str) -> trio.SocketStream:
    host, port = parse_address(address)
    return await trio.open_tcp_stream(host, port)


async def read_all(stream: trio.abc.Stream) -> list[list[Any]]:
    """Every message the node sends until it hangs up."""
    decoder = codec.Decoder(2**31)
    out = []
    with trio.fail_after(10):
        while data := await stream.receive_some():
            decoder.receive_data(data)
            while (m := decoder.next_message()) is not None:
                out.append(m)
    return out


def hello(**overrides: Any) -> bytes:
    body = {"version": PROTOCOL_VERSION, "node": "raw", "features": [], "window": 65536,
            "max_frame": 1 << 20, "max_calls": 10}
    body.update(overrides)
    return codec.encode([HELLO, body])


def frame(value: Any) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


#: Bytes a broken or hostile client might send, and the code the node answers with
#: (None: it just hangs up, as when the client stops mid-frame).
MALFORMED = {
    "random bytes": (b"\x17\x03\x03\x00\x20" + bytes(range(200)), "FRAME_TOO_LARGE"),
    "not msgpack": (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "PROTOCOL_ERROR"),
    "truncated frame": (hello()[:-3], None),
    "over-limit length": (struct.pack(">I", 2**32 - 1), "FRAME_TOO_LARGE"),
    "http request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "FRAME_TOO_LARGE"),
    "wrong types": (frame([HELLO, "version one"]), "PROTOCOL_ERROR"),
    "unknown kind": (frame([42, "x"]), "PROTOCOL_ERROR"),
    "call before the hello": (codec.encode([CALL, 1, "node.ping", None, {}]), "PROTOCOL_ERROR"),
    "hello of the wrong version": (hello(version=99), "INCOMPATIBLE_VERSION"),
    "wrong types after the hello": (hello() + frame([CALL, 1, "node.ping", None, "meta"]),
                                    "PROTOCOL_ERROR"),
    "unknown kind after the hello": (hello() + frame([77]), "PROTOCOL_ERROR"),
    "over-limit length after the hello": (hello() + struct.pack(">I", 2**31), "FRAME_TOO_LARGE"),
    "empty frame": (struct.pack(">I", 0), "PROTOCOL_ERROR"),
    "empty frame after the hello": (hello() + struct.pack(">I", 0), "PROTOCOL_ERROR"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
async def test_malformed_input_is_refused_and_others_keep_being_served(
    node: triode.Node, client: triode.Client, name: str
) -> None:
    data, code = MALFORMED[name]
    async with no_leaks():
        stream = await raw(node.address)
        async with stream:
            await stream.send_all(data)
            if code is None:
                await stream.send_eof()
            answers = await read_all(stream)
        errors_ = [m for m in answers if m[0] == ERROR]
        if code is None:
            assert errors_ == []
        else:
            assert [m[1:3] for m in errors_] == [[0, code]], answers
            assert errors_[0][3]  # a message that says what is wrong
        # No call was ever answered on the broken connection.
        assert not [m for m in answers if m[0] == REPLY]
    # The node lost nothing: the good client, and new clients, are served.
    assert await client.ping() >= 0
    async with triode.connect(node.address) as other:
        assert (await other.info())["node"] == node.id


async def test_unknown_method_is_unimplemented(client: triode.Client) -> None:
    with pytest.raises(errors.Unimplemented, match="no method 'cas.nope'"):
        await client.connection.call("cas.nope")
    assert await client.ping() >= 0


async def test_node_info(client: triode.Client, node: triode.Node) -> None:
    info = await client.info()
    assert info["node"] == node.id == client.node_id
    assert info["address"] == node.address
    assert info["version"] == triode.__version__
    assert info["connections"] >= 1 and info["uptime"] >= 0
    assert {"node.ping", "node.info"} <= set(info["methods"])
    assert await client.connection.call("node.ping") is None


async def test_many_clients_many_calls(node: triode.Node) -> None:
    """10 clients with 100 calls each in flight at once: every call answered, each with its own answer."""
    served: list[tuple[int, int]] = []

    async def echo(call: IncomingCall) -> Any:
        served.append(tuple(call.args))
        return call.args

    node.router.add("test.echo", echo)
    answers: dict[tuple[int, int], tuple[float, Any]] = {}

    async def one_client(i: int) -> None:
        async with triode.connect(node.address) as c, trio.open_nursery() as nursery:

            async def one_call(j: int) -> None:
                rtt = await c.ping()
                answers[i, j] = (rtt, await c.connection.call("test.echo", [i, j]))

            for j in range(100):
                nursery.start_soon(one_call, j)

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(one_client, i)
    assert sorted(answers) == [(i, j) for i in range(10) for j in range(100)]
    wrong = {key: got for key, got in answers.items() if not (got[0] >= 0 and got[1] == list(key))}
    assert not wrong, f"answers that are not the call's own: {wrong}"
    assert sorted(served) == sorted(answers)  # each served once


# -- auth ------------------------------------------------------------------------------


async def test_token_auth(tmp_path) -> None:
    async with no_leaks(), triode.open_node(listen="127.0.0.1:0", token="s3cret", data=tmp_path) as node:
        with pytest.raises(errors.AuthenticationFailed, match="none was given"):
            async with triode.connect(node.address):
                pytest.fail("connected without a token")
        with pytest.raises(errors.AuthenticationFailed, match="wrong"):
            async with triode.connect(node.address, token="guess"):
                pytest.fail("connected with a wrong token")
        # A client that pipelines a call behind a bad hello gets nothing served.
        stream = await raw(node.address)
        async with stream:
            await stream.send_all(hello(token="guess") + codec.encode([CALL, 1, "node.info", None, {}]))
            answers = await read_all(stream)
        assert [m[:3] for m in answers] == [[ERROR, 0, "UNAUTHENTICATED"]]
        async with triode.connect(node.address, token="s3cret") as client:
            assert (await client.info())["node"] == node.id
        # The embedded client needs no token: it never leaves the process.
        async with node.connect() as local:
            assert await local.ping() >= 0


# -- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_tls(tmp_path, ca: trustme.CA) -> None:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with no_leaks(), triode.open_node(listen="127.0.0.1:0", data=tmp_path / "d",
                                            tls_cert=cert_file, tls_key=key_file, token="t") as node:
        async with triode.connect(node.address, ssl_context=ctx, token="t") as client:
            assert (await client.info())["node"] == node.id
            async with trio.open_nursery() as nursery:
                for _ in range(50):
                    nursery.start_soon(client.ping)
        # Plain text to a TLS node fails cleanly, and so does TLS with an untrusted CA.
        with pytest.raises((errors.ConnectionClosed, errors.Unavailable)):
            async with triode.connect(node.address, token="t", connect_timeout=5):
                pass
        with pytest.raises(errors.Unavailable, match="TLS handshake"):
            async with triode.connect(node.address, ssl_context=ssl.create_default_context()):
                pass
        async with triode.connect(node.address, ssl_context=ctx, token="t") as client:
            assert await client.ping() >= 0


# -- shutdown --------------------------------------------------------------------------


async def test_leaving_open_node_lets_calls_finish_then_cancels_the_rest(tmp_path) -> None:
    finished: list[float] = []
    running: set[float] = set()
    both_running = trio.Event()

    async def sleepy(call: IncomingCall) -> str:
        running.add(call.args)
        if len(running) == 2:
            both_running.set()
        await trio.sleep(call.args)
        finished.append(call.args)
        return "slept"

    outcomes: dict[float, Any] = {}
    async with no_leaks():
        # Far past the 3 s grace, far short of the minute the long call would take: only
        # a node that waits for that call out fails this (whatever the machine's load).
        with trio.fail_after(40):
            async with trio.open_nursery() as outer:
                async with triode.open_node(listen="127.0.0.1:0", data=tmp_path, shutdown_grace=3.0) as node:
                    node.router.add("test.sleepy", sleepy)

                    async def call(seconds: float) -> None:
                        async with triode.connect(node.address) as c:
                            try:
                                outcomes[seconds] = await c.connection.call("test.sleepy", seconds)
                            except errors.ConnectionClosed as exc:
                                outcomes[seconds] = exc

                    outer.start_soon(call, 0.3)
                    outer.start_soon(call, 60.0)
                    await both_running.wait()  # both calls are in their handlers: leave the node now
                # open_node returned: within the grace period, not after a minute.
    assert outcomes[0.3] == "slept"
    assert isinstance(outcomes[60.0], errors.ConnectionClosed)
    assert finished == [0.3]


async def test_streams_over_tcp_arrive_intact(node: triode.Node, client: triode.Client) -> None:
    """Big chunks go out gathered (not copied) and small ones joined; the bytes must not care.
    A bytearray the sender reuses after each send must arrive as it was when sent."""
    import hashlib
    import os

    blob = os.urandom(3 * 1024 * 1024 + 17)

    async def download(call: IncomingCall) -> str:
        view = memoryview(blob)
        step = 700_001
        for i in range(0, len(blob), step):
            await call.send(view[i : i + step])  # read-only: sent without a copy
        scratch = bytearray(100_000)
        for i in range(5):  # mutable, reused: must be copied when queued
            scratch[:] = bytes([i]) * len(scratch)
            await call.send(scratch)
        return "ok"

    async def upload(call: IncomingCall) -> str:
        h = hashlib.sha256()
        async for chunk in call:
            h.update(chunk)
        return h.hexdigest()

    node.router.add("test.download", download)
    node.router.add("test.upload", upload, upload=True)
    for _ in range(2):
        async with client.connection.open_call("test.download") as call:
            got = b"".join([chunk async for chunk in call])
            assert await call.result() == "ok"
        assert got[: len(blob)] == blob
        assert got[len(blob) :] == b"".join(bytes([i]) * 100_000 for i in range(5))
    async with client.connection.open_call("test.upload", upload=True) as call:
        scratch = bytearray(1 << 20)
        expected = hashlib.sha256()
        for i in range(20):
            scratch[:] = bytes([i]) * len(scratch)
            expected.update(scratch)
            await call.send(scratch)
        await call.send(blob)
        expected.update(blob)
        assert await call.result() == expected.hexdigest()


async def test_a_client_written_from_the_protocol_doc(node: triode.Node) -> None:
    """Only msgpack, a socket and docs/protocol.md: hello, calls, ping, a download with credits."""
    payload = bytes(range(256)) * 40_000  # 10 MB: more than one window

    async def blob(call: IncomingCall) -> int:
        await call.send(payload)
        return len(payload)

    node.router.add("test.blob", blob)
    stream = await raw(node.address)
    decoder = codec.Decoder(2**31)

    async def send(*message: Any) -> None:
        body = msgpack.packb(list(message), use_bin_type=True)
        await stream.send_all(struct.pack(">I", len(body)) + body)

    async def receive() -> list[Any]:
        while (m := decoder.next_message()) is None:
            decoder.receive_data(await stream.receive_some())
        return m

    async with stream:
        await send(0, {"version": 1, "node": "doc-client", "features": [], "window": 65536,
                       "max_frame": 1 << 20, "max_calls": 8})
        kind, hello_ = await receive()
        assert kind == 0 and hello_["node"] == node.id and hello_["version"] == 1
        await send(1, 1, "node.ping", None, {"timeout": 5.0})
        await send(1, 3, "node.info", None, {})
        await send(8, 1234)
        got = {}
        for _ in range(3):
            m = await receive()
            got[(m[0], m[1])] = m
        assert got[(2, 1)] == [2, 1, None]
        assert got[(2, 3)][2]["node"] == node.id
        assert got[(9, 1234)] == [9, 1234]
        # A download: credit granted as we read, never more than our window outstanding.
        await send(1, 5, "test.blob", None, {"down": True})
        received, unacknowledged = bytearray(), 0
        while True:
            m = await receive()
            if m[0] == 5:
                received += m[2]
                unacknowledged += len(m[2])
                assert unacknowledged <= 65536
                if unacknowledged >= 32768:
                    await send(7, 5, unacknowledged)
                    unacknowledged = 0
            elif m[0] == 2:
                assert m[1:] == [5, len(payload)]
                break
        assert received == payload


async def test_an_upload_to_a_method_that_reads_none_is_refused(client: triode.Client) -> None:
    # A call that says it will upload, to a method that never reads one: refused before it
    # is served, so its bytes are dropped as they come instead of waiting unread.
    with pytest.raises(errors.InvalidArgument, match="node.ping takes no upload"):
        async with client.connection.open_call("node.ping", upload=True) as call:
            await call.send(b"x" * (1 << 20))
            call.end()
            await call.result()
    assert await client.ping() is not None  # the connection serves on
    blob = await client.cas.put(b"uploads to cas.put are taken as before")
    assert await client.cas.get(blob) == b"uploads to cas.put are taken as before"
