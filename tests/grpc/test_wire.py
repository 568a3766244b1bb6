"""The sans-I/O gRPC server state machine, driven with bytes from an h2 client: no sockets."""

from __future__ import annotations

import base64
import os
import urllib.parse

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from hypothesis import given
from hypothesis import strategies as st

from triode.errors import (
    BlobNotFound,
    DigestMismatch,
    InvalidArgument,
    MissingInputs,
    PermissionDenied,
    ResourceExhausted,
    TriodeError,
)
from triode.proto import error_details_pb2, status_pb2
from triode.wire import grpc as wire
from triode.wire.grpc import Code, GrpcError, MessageDecoder, encode_message, parse_timeout, status_of

PATH = b"/pkg.Service/Method"


def headers(path: bytes = PATH, **extra: str) -> list[tuple[bytes, bytes]]:
    base = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"node"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    return base + [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]


class Pair:
    """An h2 client and the gRPC server, joined by hand."""

    def __init__(self, **options: int) -> None:
        self.client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.client.initiate_connection()
        self.server = wire.ServerConnection(**options)
        self.server.initiate()
        self.client_events: list[h2.events.Event] = []
        self.exchange()

    def exchange(self) -> list[wire.Event]:
        """Move bytes both ways until quiet; returns the server's events."""
        events: list[wire.Event] = []
        for _ in range(50):
            to_server = self.client.data_to_send()
            if to_server:
                events += self.server.receive_data(to_server)
            to_client = self.server.data_to_send()
            if to_client:
                self.client_events += self.client.receive_data(to_client)
            if not to_server and not to_client:
                return events
        raise AssertionError("the two sides never went quiet")

    def request(self, *messages: bytes, end: bool = True, **extra: str) -> int:
        stream_id = self.client.get_next_available_stream_id()
        self.client.send_headers(stream_id, headers(**extra), end_stream=not messages and end)
        for i, m in enumerate(messages):
            self.client.send_data(stream_id, encode_message(m), end_stream=end and i == len(messages) - 1)
        return stream_id

    def of(self, kind: type, stream_id: int | None = None) -> list[h2.events.Event]:
        return [
            e
            for e in self.client_events
            if isinstance(e, kind) and (stream_id is None or getattr(e, "stream_id", None) == stream_id)
        ]

    def trailers(self, stream_id: int) -> dict[bytes, bytes]:
        found = [
            e
            for e in self.client_events
            if getattr(e, "stream_id", None) == stream_id
            and isinstance(e, (h2.events.TrailersReceived, h2.events.ResponseReceived))
        ]
        assert found, self.client_events
        return dict(found[-1].headers)  # type: ignore[attr-defined]


def test_a_unary_call_end_to_end() -> None:
    pair = Pair()
    stream_id = pair.request(
        b"ping",
        grpc_timeout="1500m",
        x_custom="v",
        x_blob_bin=base64.b64encode(b"\x00\x01").decode().rstrip("="),
    )
    events = pair.exchange()
    started = [e for e in events if isinstance(e, wire.RequestReceived)]
    assert len(started) == 1
    request = started[0].request
    assert request.path == "/pkg.Service/Method" and request.timeout == 1.5
    assert request.get("x-custom") == "v" and request.get("x-blob-bin") == b"\x00\x01"
    assert [e.data for e in events if isinstance(e, wire.MessageReceived)] == [b"ping"]
    assert any(isinstance(e, wire.RequestEnded) for e in events)
    pair.server.send_message(stream_id, b"pong")
    pair.server.finish(stream_id, wire.make_status(Code.OK))
    pair.exchange()
    data = b"".join(e.data for e in pair.of(h2.events.DataReceived, stream_id))
    assert data == encode_message(b"pong")
    assert pair.trailers(stream_id)[b"grpc-status"] == b"0"
    assert pair.of(h2.events.StreamEnded, stream_id)
    assert pair.server.streams == 0


def test_error_status_carries_details_and_percent_encoded_message() -> None:
    pair = Pair()
    stream_id = pair.request(b"x")
    pair.exchange()
    status = status_of(MissingInputs("2 blobs missing: ünïcode %", missing=["a" * 64 + "/3"]))
    pair.server.finish(stream_id, status)  # trailers-only: no message was sent
    pair.exchange()
    trailers = pair.trailers(stream_id)
    assert (
        trailers[b":status"] == b"200" and trailers[b"grpc-status"] == str(Code.FAILED_PRECONDITION).encode()
    )
    assert urllib.parse.unquote(trailers[b"grpc-message"].decode()) == "2 blobs missing: ünïcode %"
    raw = trailers[b"grpc-status-details-bin"]
    sent = status_pb2.Status.FromString(base64.b64decode(raw + b"=" * (-len(raw) % 4)))
    failure = error_details_pb2.PreconditionFailure()
    assert sent.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [("MISSING", "blobs/" + "a" * 64 + "/3")]


@pytest.mark.parametrize(
    "error, code",
    [
        (InvalidArgument("bad"), Code.INVALID_ARGUMENT),
        (DigestMismatch("bad"), Code.INVALID_ARGUMENT),
        (BlobNotFound("gone"), Code.NOT_FOUND),
        (PermissionDenied("no"), Code.PERMISSION_DENIED),
        (ResourceExhausted("full", retry_after=1.5), Code.RESOURCE_EXHAUSTED),
        (TriodeError("?"), Code.INTERNAL),
        (ValueError("bug"), Code.INTERNAL),
        (GrpcError(Code.OUT_OF_RANGE, "far"), Code.OUT_OF_RANGE),
    ],
)
def test_one_mapping_of_errors_to_codes(error: BaseException, code: Code) -> None:
    status = status_of(error)
    assert status.code == code
    if isinstance(error, ResourceExhausted):
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() == 1_500_000_000


def test_large_frames_right_after_the_settings_ack() -> None:
    # The client acks our SETTINGS and at once sends frames as large as they allow, in
    # the same read: they are taken.
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    server = wire.ServerConnection(max_frame=1024 * 1024)
    server.initiate()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    stream_id = client.get_next_available_stream_id()
    client.send_headers(stream_id, headers())
    assert client.max_outbound_frame_size == 1024 * 1024
    client.send_data(stream_id, encode_message(b"f" * 60_000), end_stream=True)
    events = server.receive_data(client.data_to_send())  # the ACK and the large frame together
    assert [len(e.data) for e in events if isinstance(e, wire.MessageReceived)] == [60_000]


def test_flow_control_hands_bytes_back_only_when_consumed() -> None:
    pair = Pair(stream_window=100_000, connection_window=1_000_000)
    stream_id = pair.request(end=False)
    pair.exchange()
    payload = b"z" * 30_000
    for _ in range(3):
        pair.client.send_data(stream_id, encode_message(payload))
    events = pair.exchange()
    messages = [e for e in events if isinstance(e, wire.MessageReceived)]
    assert len(messages) == 3
    window = pair.client.local_flow_control_window(stream_id)
    assert window < 10_000  # nothing was handed back: the client cannot send much more
    for m in messages:
        pair.server.consumed(stream_id, m.size)
    pair.exchange()
    # (h2 hands bytes back in batches of at least half the window.)
    assert pair.client.local_flow_control_window(stream_id) >= window + 50_000


def test_a_message_larger_than_the_window_still_arrives() -> None:
    pair = Pair(stream_window=65_535, connection_window=65_535, max_message=1_000_000)
    stream_id = pair.request(end=False)
    pair.exchange()
    message = encode_message(b"m" * 300_000)
    sent = 0
    events: list[wire.Event] = []
    while sent < len(message):
        room = min(pair.client.local_flow_control_window(stream_id), pair.client.max_outbound_frame_size)
        assert room > 0, "the partial message's bytes were not handed back"
        pair.client.send_data(stream_id, message[sent : sent + room])
        sent += room
        events += pair.exchange()
    assert [len(e.data) for e in events if isinstance(e, wire.MessageReceived)] == [300_000]


def test_oversized_and_compressed_messages_are_refused() -> None:
    pair = Pair(max_message=1000)
    big = pair.request(b"x" * 2000)
    events = pair.exchange()
    assert any(isinstance(e, wire.StreamReset) and e.stream_id == big and not e.remote for e in events)
    assert pair.trailers(big)[b"grpc-status"] == str(Code.RESOURCE_EXHAUSTED).encode()
    compressed = pair.client.get_next_available_stream_id()
    pair.client.send_headers(compressed, headers())
    pair.client.send_data(compressed, b"\x01\x00\x00\x00\x01x", end_stream=True)
    pair.exchange()
    assert pair.trailers(compressed)[b"grpc-status"] == str(Code.INTERNAL).encode()
    assert pair.server.streams == 0


def test_requests_that_are_not_grpc() -> None:
    pair = Pair()
    get = pair.client.get_next_available_stream_id()
    pair.client.send_headers(
        get,
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"n")],
        end_stream=True,
    )
    pair.exchange()
    assert pair.trailers(get)[b":status"] == b"405"
    json = pair.client.get_next_available_stream_id()
    pair.client.send_headers(
        json,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", PATH),
            (b":authority", b"n"),
            (b"content-type", b"application/json"),
        ],
        end_stream=True,
    )
    pair.exchange()
    assert pair.trailers(json)[b":status"] == b"415"
    gzip = pair.request(b"x", grpc_encoding="gzip")
    pair.exchange()
    assert pair.trailers(gzip)[b"grpc-status"] == str(Code.UNIMPLEMENTED).encode()
    bad_timeout = pair.request(b"x", grpc_timeout="soon")
    pair.exchange()
    assert pair.trailers(bad_timeout)[b"grpc-status"] == str(Code.INVALID_ARGUMENT).encode()
    assert pair.server.streams == 0


def test_client_reset_is_reported_and_its_bytes_handed_back() -> None:
    pair = Pair(stream_window=300_000, connection_window=200_000)
    stream_id = pair.request(b"a" * 120_000, end=False)
    pair.exchange()
    before = pair.client.outbound_flow_control_window
    pair.client.reset_stream(stream_id, 8)  # CANCEL
    events = pair.exchange()
    assert [e for e in events if isinstance(e, wire.StreamReset)] == [wire.StreamReset(stream_id, 8, True)]
    pair.server.send_message(stream_id, b"too late")  # ignored: the stream is gone
    pair.exchange()
    # The connection's window got the unconsumed message's bytes back.
    assert pair.client.outbound_flow_control_window > before


def test_output_waits_for_the_clients_window() -> None:
    pair = Pair()
    stream_id = pair.request(b"x")
    pair.exchange()
    big = b"o" * 200_000  # over the client's default 65,535-byte window
    pair.server.send_message(stream_id, big)
    pair.server.finish(stream_id, wire.make_status(Code.OK))
    pair.exchange()
    assert pair.server.outbound_pending(stream_id) > 0
    received = sum(len(e.data) for e in pair.of(h2.events.DataReceived, stream_id))
    writable: list[wire.Event] = []
    for _ in range(10):
        pair.client.acknowledge_received_data(received, stream_id)
        writable += [e for e in pair.exchange() if isinstance(e, wire.StreamWritable)]
        now = sum(len(e.data) for e in pair.of(h2.events.DataReceived, stream_id))
        received, total = now - received, now
        if pair.of(h2.events.StreamEnded, stream_id):
            break
    assert writable and total == len(encode_message(big))
    assert pair.trailers(stream_id)[b"grpc-status"] == b"0"


def open_wide_stream() -> tuple[Pair, int]:
    """A pair whose client takes 4 MB frames and 8 MB windows, so nothing waits on flow."""
    pair = Pair(max_message=4_000_000)
    pair.client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 8_000_000,
                                 h2.settings.SettingCodes.MAX_FRAME_SIZE: 4_000_000})
    pair.client.increment_flow_control_window(8_000_000)
    stream_id = pair.request(b"x")
    pair.exchange()
    return pair, stream_id


def test_large_messages_go_out_as_they_were_given() -> None:
    # A large message's payload is among the buffers to write as the very object given (no
    # copy in h2's frame serialization), between the frames around it, in order.
    pair, stream_id = open_wide_stream()
    payloads = [bytes([n]) * (1_000_000 + n) for n in range(3)]
    for payload in payloads:
        pair.server.send_message(stream_id, payload)
    pair.server.send_message(stream_id, b"small")
    pair.server.finish(stream_id, wire.make_status(Code.OK))
    assert pair.server.buffered > sum(len(p) + 5 for p in payloads)  # the frames counted too
    buffers = pair.server.buffers_to_send()
    assert pair.server.buffered == 0 and pair.server.buffers_to_send() == []
    for payload in payloads:
        assert any(b is payload for b in buffers)
    pair.client_events += pair.client.receive_data(b"".join(buffers))
    data = b"".join(e.data for e in pair.of(h2.events.DataReceived, stream_id))
    assert data == b"".join(encode_message(p) for p in [*payloads, b"small"])
    assert pair.trailers(stream_id)[b"grpc-status"] == b"0"
    assert pair.of(h2.events.StreamEnded, stream_id)


def test_partial_bytes_per_connection_are_bounded() -> None:
    pair = Pair(
        max_message=500_000, max_partial=100_000, stream_window=1_000_000, connection_window=1_000_000
    )
    stream_id = pair.request(end=False)
    pair.exchange()
    pair.client.send_data(stream_id, encode_message(b"p" * 400_000)[:150_000])
    events = pair.exchange()
    assert any(isinstance(e, wire.StreamReset) and e.stream_id == stream_id for e in events)
    assert pair.trailers(stream_id)[b"grpc-status"] == str(Code.RESOURCE_EXHAUSTED).encode()


def test_a_header_list_over_the_limit_ends_the_connection() -> None:
    pair = Pair(max_header_list=4096)
    pair.request(b"x", x_big="v" * 10_000)
    events = pair.exchange()
    assert isinstance(events[-1], wire.ConnectionEnded) and pair.server.closed
    assert not any(isinstance(e, wire.RequestReceived) for e in events)


def test_goaway_and_protocol_errors() -> None:
    pair = Pair()
    pair.client.close_connection()
    events = pair.exchange()
    assert any(isinstance(e, wire.ConnectionEnded) for e in events) and pair.server.closed
    broken = wire.ServerConnection()
    broken.initiate()
    events = broken.receive_data(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 100)
    assert isinstance(events[-1], wire.ConnectionEnded) and events[-1].error
    assert broken.data_to_send()  # the GOAWAY


@given(st.lists(st.binary(max_size=300), max_size=8), st.lists(st.integers(1, 50), min_size=1, max_size=20))
def test_decoder_splits_any_way(messages: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_message(m) for m in messages)
    decoder = MessageDecoder(1000)
    got: list[bytes] = []
    handed_back = 0
    pos = 0
    i = 0
    while pos < len(stream):
        piece = stream[pos : pos + cuts[i % len(cuts)]]
        pos += len(piece)
        i += 1
        for data, size in decoder.feed(piece):
            got.append(data)
            handed_back += size
        handed_back += decoder.take_partial()
    assert got == messages
    assert handed_back == len(stream)  # every byte handed back exactly once


@pytest.mark.parametrize(
    "text, seconds",
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"250m", 0.25),
        (b"10u", 1e-5),
        (b"99999999n", 0.099999999),
    ],
)
def test_timeouts(text: bytes, seconds: float) -> None:
    assert parse_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [b"", b"1", b"S", b"123456789S", b"-1S", b"1s"])
def test_bad_timeouts(text: bytes) -> None:
    with pytest.raises(GrpcError):
        parse_timeout(text)


def test_a_message_in_two_parts_is_sent_as_one() -> None:
    pair, stream_id = open_wide_stream()
    body = os.urandom(1_500_000)
    pair.server.send_message(stream_id, b"head", body)  # large: the body is not copied
    view = memoryview(os.urandom(100_000))[10:]
    pair.server.send_message(stream_id, b"view", view)  # (h2 copies a memoryview once)
    pair.server.send_message(stream_id, b"small", memoryview(b" body"))  # small: joined
    pair.server.finish(stream_id, wire.make_status(Code.OK))
    buffers = pair.server.buffers_to_send()
    assert any(b is body for b in buffers)
    pair.client_events += pair.client.receive_data(b"".join(buffers))
    data = b"".join(e.data for e in pair.of(h2.events.DataReceived, stream_id))
    assert data == (encode_message(b"head" + body) + encode_message(b"view" + bytes(view))
                    + encode_message(b"small body"))
