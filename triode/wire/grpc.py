"""gRPC over HTTP/2, sans-I/O: the server side of a connection, as a state machine.

:class:`ServerConnection` sits on an ``h2`` connection (itself sans-I/O) and turns its
events into gRPC ones: a request started (:class:`RequestReceived`, with its metadata
and ``grpc-timeout``), a whole message received (:class:`MessageReceived`), the client
done sending (:class:`RequestEnded`), a stream reset (:class:`StreamReset`), room to
send again (:class:`StreamWritable`). The caller feeds it bytes
(:meth:`ServerConnection.receive_data`), takes bytes to write
(:meth:`ServerConnection.data_to_send`), and answers with
:meth:`~ServerConnection.send_message` and :meth:`~ServerConnection.finish`. No I/O, no
clock, no tasks: the trio server is ``triode.node.grpc``; the tests drive this module
with bytes alone.

What it bounds:

* **Messages.** Each is a 5-byte prefix (a compressed flag, a 4-byte length) and its
  bytes; one longer than ``max_message`` ends its stream with ``RESOURCE_EXHAUSTED``.
  Compressed messages are refused (``identity`` is the only ``grpc-encoding`` offered).
* **Flow control is the backpressure.** The bytes of a whole message are handed back to
  the client's window (``WINDOW_UPDATE``) only when the caller says it consumed the
  message (:meth:`ServerConnection.consumed`); a handler that stops reading stops its
  client. The bytes of a message still being assembled are handed back at once (a
  message larger than the window could otherwise never complete), up to
  ``max_partial`` bytes per connection; past that the stream is refused with
  ``RESOURCE_EXHAUSTED``.
* **Streams**: at most ``max_streams`` at once (``SETTINGS_MAX_CONCURRENT_STREAMS``).
* **Output** waits in a per-stream queue for the client's window; the caller asks
  :meth:`ServerConnection.outbound_pending` and waits for :class:`StreamWritable`.

Errors: :func:`status_of` is the one mapping from Triode's errors to gRPC status codes
(with ``google.rpc`` details: ``PreconditionFailure`` for missing blobs, ``RetryInfo``,
``BadRequest``); :func:`status_trailers` writes a status as ``grpc-status``,
``grpc-message`` and ``grpc-status-details-bin``.
"""

from __future__ import annotations

import base64
import enum
import re
import struct
import urllib.parse
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
from google.protobuf import any_pb2, duration_pb2  # type: ignore[import-untyped]

from ..errors import (
    AuthenticationFailed,
    Cancelled,
    ConnectionClosed,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    TriodeError,
    Unavailable,
    Unimplemented,
)
from ..proto import error_details_pb2, status_pb2

__all__ = [
    "Code",
    "GrpcError",
    "status_of",
    "status_trailers",
    "make_status",
    "parse_timeout",
    "encode_message",
    "MessageDecoder",
    "Request",
    "ServerConnection",
    "RequestReceived",
    "MessageReceived",
    "RequestEnded",
    "StreamReset",
    "StreamWritable",
    "ConnectionEnded",
    "DEFAULT_MAX_MESSAGE",
]


class Code(enum.IntEnum):
    """gRPC status codes (``grpc/status.h``)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


#: The largest message taken by default: a REAPI batch of 4 MiB and its framing, with room.
DEFAULT_MAX_MESSAGE = 5 * 1024 * 1024

_PREFIX = struct.Struct(">BI")


def _data_repr(self: hyperframe.frame.DataFrame) -> str:
    return f"<{len(self.data)} bytes>"


# h2 logs every frame it receives as ``repr(frame)``, built even when nothing logs it, and
# a DATA frame's repr hex-encodes its whole payload: two more passes over every byte
# uploaded. Its length says as much in a log.
hyperframe.frame.DataFrame._body_repr = _data_repr  # type: ignore[method-assign, assignment]
#: Messages up to this size are queued joined to their prefix (one frame); larger ones are not
#: copied for it (the prefix goes first, as a frame of its own).
_JOIN_BELOW = 64 * 1024
#: DATA frames of at least this many bytes leave their payload as it is, beside the frames
#: around it, for the socket to gather (see :class:`_H2Connection`); smaller ones are copied.
_GATHER_FROM = 16 * 1024
#: An HTTP/2 frame header: a 24-bit length, the type, the flags, the stream (RFC 9113, 4.1).
_FRAME_HEADER = struct.Struct(">HBBBL")
_DATA_END_STREAM = 0x1


class _H2Connection(h2.connection.H2Connection):
    """h2, its output kept as a list of buffers instead of one joined bytearray.

    h2 serializes a DATA frame by copying its payload three times (the body, header and
    body, then onto its output bytearray): for a large download that is most of the work
    this side does per byte. Here a large DATA frame's header goes onto the output
    bytearray and its payload is kept as given, unjoined; :meth:`take_output` hands the
    list over for one gathered write. Every other frame is h2's own serialization, and the
    bytes keep h2's order. (Built on h2 4.x's ``_prepare_for_sending`` and
    ``_data_to_send``; without them, h2 is used as it is.)
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        super().__init__(config)
        #: Output before ``_data_to_send``: buffers in order.
        self._gathered: list[bytes | bytearray | memoryview] = []
        self._gathered_bytes = 0

    def _prepare_for_sending(self, frames: list[hyperframe.frame.Frame]) -> None:
        for f in frames:
            if type(f) is hyperframe.frame.DataFrame and len(f.data) >= _GATHER_FROM \
                    and f.flags <= {"END_STREAM"}:
                size = len(f.data)
                if size > self.max_outbound_frame_size:  # h2 checks before; as its own assert
                    raise h2.exceptions.FrameTooLargeError(f"a DATA frame of {size} bytes")
                flags = _DATA_END_STREAM if f.flags else 0
                out = self._data_to_send
                out += _FRAME_HEADER.pack(size >> 8, size & 0xFF, 0, flags, f.stream_id & 0x7FFFFFFF)
                self._gathered.append(out)
                self._gathered.append(f.data)
                self._gathered_bytes += len(out) + size
                self._data_to_send = bytearray()
            else:
                self._data_to_send += f.serialize()
                assert f.body_len <= self.max_outbound_frame_size

    @property
    def pending_output(self) -> int:
        return self._gathered_bytes + len(self._data_to_send)

    def take_output(self) -> list[bytes | bytearray | memoryview]:
        """Everything queued for the socket, in order (empties the queue)."""
        out = self._gathered
        if self._data_to_send:
            out.append(self._data_to_send)
            self._data_to_send = bytearray()
        self._gathered = []
        self._gathered_bytes = 0
        return out

    def data_to_send(self, amount: int | None = None) -> bytes:
        if self._gathered:
            self._data_to_send[:0] = b"".join(self.take_output())
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        self._gathered = []
        self._gathered_bytes = 0
        super().clear_outbound_data_buffer()


#: Whether h2 is the one :class:`_H2Connection` is built on (the private names it uses).
_GATHERING = callable(getattr(h2.connection.H2Connection, "_prepare_for_sending", None)) and \
    isinstance(getattr(h2.connection.H2Connection(), "_data_to_send", None), bytearray)


class GrpcError(Exception):
    """A gRPC status to answer with, raised where no Triode error says it (a bad request)."""

    def __init__(self, code: Code, message: str, details: Sequence[Any] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        #: protobuf messages, packed into ``google.protobuf.Any`` in the status.
        self.details = list(details)


# -- errors to statuses: the one mapping ---------------------------------------------------

#: Triode's error classes to gRPC codes; a subclass takes its nearest listed ancestor's code
#: (InvalidDigest, InvalidPath, DigestMismatch, TooLarge are INVALID_ARGUMENT; BlobNotFound
#: NOT_FOUND; MissingInputs FAILED_PRECONDITION). Anything else is INTERNAL.
_CODES: dict[type[BaseException], Code] = {
    AuthenticationFailed: Code.UNAUTHENTICATED,
    PermissionDenied: Code.PERMISSION_DENIED,
    InvalidArgument: Code.INVALID_ARGUMENT,
    NotFound: Code.NOT_FOUND,
    FailedPrecondition: Code.FAILED_PRECONDITION,
    ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    Cancelled: Code.CANCELLED,
    Unavailable: Code.UNAVAILABLE,
    ConnectionClosed: Code.UNAVAILABLE,
    Unimplemented: Code.UNIMPLEMENTED,
    ProtocolError: Code.INTERNAL,
    Internal: Code.INTERNAL,
}


def code_of(exc: BaseException) -> Code:
    """The gRPC code for an error (see :data:`_CODES`)."""
    if isinstance(exc, GrpcError):
        return exc.code
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code
    return Code.INTERNAL


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def make_status(code: Code, message: str = "", details: Iterable[Any] = ()) -> status_pb2.Status:
    """A ``google.rpc.Status``, its details packed as ``Any``."""
    return status_pb2.Status(code=int(code), message=message, details=[_pack(d) for d in details])


def missing_blobs_failure(missing: Iterable[str]) -> error_details_pb2.PreconditionFailure:
    """REAPI's way to say which blobs are missing: one ``MISSING`` violation per blob,
    subject ``blobs/HASH/SIZE``."""
    return error_details_pb2.PreconditionFailure(violations=[
        error_details_pb2.PreconditionFailure.Violation(
            type="MISSING", subject=f"blobs/{name}", description="the blob is not in the CAS")
        for name in missing
    ])


def status_of(exc: BaseException) -> status_pb2.Status:
    """The ``google.rpc.Status`` a handler's error is answered with.

    Triode errors map by class (:data:`_CODES`), with details: missing blobs (``MissingInputs``,
    or any ``FAILED_PRECONDITION`` whose ``details.missing`` lists ``HASH/SIZE`` names) as a
    ``PreconditionFailure``; ``retry_after`` as a ``RetryInfo``; an ``InvalidArgument`` naming a
    ``field`` as a ``BadRequest``. A :class:`GrpcError` is its own status; anything else is
    ``INTERNAL`` with the error's text.
    """
    if isinstance(exc, GrpcError):
        return make_status(exc.code, exc.message, exc.details)
    code = code_of(exc)
    if not isinstance(exc, TriodeError):
        return make_status(Code.INTERNAL, f"internal error: {exc!r}")
    details: list[Any] = []
    info = exc.details
    missing = info.get("missing")
    if code is Code.FAILED_PRECONDITION and isinstance(missing, list) and missing:
        details.append(missing_blobs_failure(str(m) for m in missing))
    retry_after = info.get("retry_after")
    if isinstance(retry_after, (int, float)) and not isinstance(retry_after, bool) and retry_after >= 0:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    field_name = info.get("field")
    if code is Code.INVALID_ARGUMENT and isinstance(field_name, str):
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field_name, description=exc.message)]))
    return make_status(code, exc.message or exc.code, details)


# -- headers --------------------------------------------------------------------------------

#: Bytes kept as they are in grpc-message; everything else is percent-encoded (gRPC spec).
_SAFE_MESSAGE = bytes(range(0x20, 0x7F)).replace(b"%", b"").decode()
#: The longest grpc-message sent: a header, so bounded (the details carry the rest).
MAX_STATUS_MESSAGE = 4096


def status_trailers(status: status_pb2.Status) -> list[tuple[bytes, bytes]]:
    """``grpc-status``, ``grpc-message`` (percent-encoded) and, when the status has details,
    ``grpc-status-details-bin`` (the whole Status, base64 without padding)."""
    headers = [(b"grpc-status", str(status.code).encode())]
    if status.message:
        text = status.message[:MAX_STATUS_MESSAGE]
        headers.append((b"grpc-message", urllib.parse.quote(text, safe=_SAFE_MESSAGE).encode()))
    if status.details:
        details = base64.b64encode(status.SerializeToString()).rstrip(b"=")
        headers.append((b"grpc-status-details-bin", details))
    return headers


_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float:
    """``grpc-timeout`` (at most 8 digits and a unit: H, M, S, m, u, n) in seconds."""
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        raise GrpcError(Code.INVALID_ARGUMENT, f"grpc-timeout {value[:40]!r} is not DIGITS followed by "
                                                "one of H, M, S, m, u, n")
    return int(match.group(1)) * _UNITS[match.group(2)]


#: Headers that are HTTP/2 or gRPC's own, not metadata.
_RESERVED = frozenset({b"te", b"content-type", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding",
                       b"user-agent", b"grpc-message-type", b"content-length"})


def _b64decode(value: bytes) -> bytes:
    return base64.b64decode(value + b"=" * (-len(value) % 4), validate=False)


@dataclass(frozen=True)
class Request:
    """The head of one call: which method, its metadata, its deadline."""

    stream_id: int
    #: ``/package.Service/Method``
    path: str
    #: Custom metadata, keys lowercase; ``-bin`` keys hold bytes (base64-decoded), others str.
    metadata: dict[str, list[str | bytes]] = field(default_factory=dict)
    #: Seconds from ``grpc-timeout``; None when the client set no deadline.
    timeout: float | None = None
    authority: str = ""

    def get(self, key: str) -> str | bytes | None:
        values = self.metadata.get(key)
        return values[0] if values else None


def _parse_head(stream_id: int, headers: Iterable[tuple[bytes, bytes]]) -> Request:
    """Check a request head; GrpcError (or _HttpRefusal) when it is no gRPC request."""
    method = path = authority = b""
    content_type: bytes | None = None
    timeout: float | None = None
    encoding: bytes | None = None
    metadata: dict[str, list[str | bytes]] = {}
    for name, value in headers:
        if name.startswith(b":"):
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"content-type":
            content_type = value
        elif name == b"grpc-timeout":
            timeout = parse_timeout(value)
        elif name == b"grpc-encoding":
            encoding = value
        elif name in _RESERVED:
            continue
        else:
            key = name.decode("ascii", "replace")
            if key.endswith("-bin"):
                try:
                    metadata.setdefault(key, []).append(_b64decode(value))
                except ValueError:
                    raise GrpcError(Code.INVALID_ARGUMENT, f"metadata {key!r} is not base64") from None
            else:
                metadata.setdefault(key, []).append(value.decode("latin-1"))
    if method != b"POST":
        raise _HttpRefusal(405, "gRPC requests are POST")
    if content_type is None or not content_type.startswith(b"application/grpc"):
        raise _HttpRefusal(415, "the content-type of a gRPC request is application/grpc")
    if content_type not in (b"application/grpc", b"application/grpc+proto"):
        raise GrpcError(Code.UNIMPLEMENTED, f"content-type {content_type[:60]!r}: only protobuf is served")
    if encoding is not None and encoding != b"identity":
        raise GrpcError(Code.UNIMPLEMENTED, f"grpc-encoding {encoding[:40]!r} is not supported: use identity")
    text = path.decode("ascii", "replace")
    if not text.startswith("/") or text.count("/") != 2:
        raise GrpcError(Code.UNIMPLEMENTED, f"{text[:200]!r} is not a gRPC method path (/Service/Method)")
    return Request(stream_id, text, metadata, timeout, authority.decode("ascii", "replace"))


class _HttpRefusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- messages -------------------------------------------------------------------------------


def encode_message(payload: bytes) -> bytes:
    """One length-prefixed, uncompressed gRPC message."""
    return _PREFIX.pack(0, len(payload)) + payload


class MessageDecoder:
    """Splits a stream's DATA into messages, and counts which bytes still await acknowledgement.

    :meth:`feed` returns each complete message with the number of its bytes not yet handed
    back to the flow-control window; :meth:`take_partial` hands back the bytes of the
    message still being assembled (the caller acknowledges them at once).
    """

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self.max_message = max_message
        self._buf = bytearray()
        #: Bytes at the start of the buffer (the message being assembled) already handed back.
        self._early = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | memoryview) -> list[tuple[bytes, int]]:
        buf = self._buf
        buf += data
        out: list[tuple[bytes, int]] = []
        pos = 0
        size = len(buf)
        while size - pos >= 5:
            flag, length = _PREFIX.unpack_from(buf, pos)
            if flag:
                raise GrpcError(Code.INTERNAL, "a compressed message arrived, but identity is the only "
                                               "grpc-encoding served" if flag == 1 else
                                               f"message flag {flag} is not 0 or 1")
            if length > self.max_message:
                raise GrpcError(Code.RESOURCE_EXHAUSTED,
                                f"a message of {length} bytes is over the limit of {self.max_message}")
            end = pos + 5 + length
            if size < end:
                break
            out.append((bytes(buf[pos + 5 : end]), 5 + length - self._early))
            self._early = 0
            pos = end
        if pos:
            del buf[:pos]
        return out

    def take_partial(self) -> int:
        """The bytes of the incomplete message not handed back yet (now counted as handed back)."""
        n = len(self._buf) - self._early
        self._early = len(self._buf)
        return n


# -- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    request: Request


@dataclass(frozen=True, slots=True)
class MessageReceived:
    stream_id: int
    data: bytes
    #: Flow-controlled bytes to hand back with :meth:`ServerConnection.consumed` once used.
    size: int


@dataclass(frozen=True, slots=True)
class RequestEnded:
    """The client sent its last message (END_STREAM)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The stream is gone: the client reset it (``remote``), or this side refused it
    (a message too large, a malformed one); its handler should stop."""

    stream_id: int
    error_code: int
    remote: bool


@dataclass(frozen=True, slots=True)
class StreamWritable:
    """Output waiting on this stream was sent (the client's window opened)."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class ConnectionEnded:
    """The client said GOAWAY, or broke the protocol (``error`` says how)."""

    error_code: int
    error: str = ""


Event = RequestReceived | MessageReceived | RequestEnded | StreamReset | StreamWritable | ConnectionEnded


# -- the connection -------------------------------------------------------------------------


class _Stream:
    __slots__ = ("id", "decoder", "unacked", "out", "sent", "out_bytes", "headers_sent", "trailers",
                 "remote_ended", "finishing")

    def __init__(self, stream_id: int, max_message: int) -> None:
        self.id = stream_id
        self.decoder = MessageDecoder(max_message)
        #: Bytes delivered in messages the caller has not said it consumed.
        self.unacked = 0
        #: Output waiting for the client's window; ``sent`` bytes of the first one are gone.
        self.out: deque[bytes | memoryview] = deque()
        self.sent = 0
        self.out_bytes = 0
        self.headers_sent = False
        #: Trailers waiting for the queued output to go first.
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.remote_ended = False
        #: finish() was called: whatever else arrives is acknowledged and dropped.
        self.finishing = False


_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc"),
                     (b"grpc-accept-encoding", b"identity")]


class ServerConnection:
    """The gRPC server side of one HTTP/2 connection (see the module's docstring)."""

    def __init__(
        self,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_streams: int = 100,
        stream_window: int = 4 * 1024 * 1024,
        connection_window: int = 16 * 1024 * 1024,
        max_frame: int = 1024 * 1024,
        max_partial: int = 32 * 1024 * 1024,
        max_header_list: int = 16 * 1024,
    ) -> None:
        # What comes in is checked; what goes out is ours (constant names, percent-encoded or
        # base64 values), so h2 is spared checking and normalizing it again on every call.
        config = h2.config.H2Configuration(client_side=False, header_encoding=None,
                                           validate_outbound_headers=False,
                                           normalize_outbound_headers=False)
        self._h2 = (_H2Connection if _GATHERING else h2.connection.H2Connection)(config)
        # In the first SETTINGS frame, and in force here from the start: they only allow the
        # client more, so it may use them as soon as it reads them. (Sent as an update, h2
        # would apply the larger frame size at the client's ACK, and refuse a large frame that
        # arrives in the same read as that ACK.)
        self._h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: max_header_list,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
        })
        self._h2.max_inbound_frame_size = max_frame
        self._h2.decoder.max_header_list_size = max_header_list  # enforced, not only advertised
        self._connection_window = connection_window
        self.max_message = max_message
        self.max_partial = max_partial
        self._partial = 0
        self._streams: dict[int, _Stream] = {}
        self.closed = False

    # -- bytes in and out ---------------------------------------------------------------

    def initiate(self) -> None:
        """Queue the server preface: SETTINGS, and the connection's larger window."""
        self._h2.initiate_connection()
        grow = self._connection_window - self._h2.inbound_flow_control_window
        if grow > 0:
            self._h2.increment_flow_control_window(grow)

    def data_to_send(self) -> bytes | bytearray:
        """Everything queued for the socket, joined (empties the queue; the node writes
        :meth:`buffers_to_send` instead, without joining)."""
        return b"".join(self.buffers_to_send())

    def buffers_to_send(self) -> list[bytes | bytearray | memoryview]:
        """Everything queued for the socket, as buffers to write in order (empties the queue).

        The payload of a large message is among them as the caller gave it to
        :meth:`send_message`, not copied (one the client's window splits is copied once, by
        h2). A payload must not change until it is written.
        """
        h2c = self._h2
        if isinstance(h2c, _H2Connection):
            return h2c.take_output()
        data = h2c.data_to_send()
        return [data] if data else []

    @property
    def buffered(self) -> int:
        """Bytes queued for the socket."""
        h2c = self._h2
        if isinstance(h2c, _H2Connection):
            return h2c.pending_output
        data = getattr(h2c, "_data_to_send", None)
        return len(data) if data is not None else 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes from the socket; returns what they meant. After a ConnectionEnded with an
        error, send what :meth:`data_to_send` holds (the GOAWAY) and close."""
        if self.closed:
            return []
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            return [ConnectionEnded(int(getattr(exc, "error_code", h2.errors.ErrorCodes.PROTOCOL_ERROR)),
                                    f"HTTP/2 protocol error: {exc}")]
        out: list[Event] = []
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._on_data(event, out)
            elif isinstance(event, h2.events.RequestReceived):
                self._on_request(event, out)
            elif isinstance(event, h2.events.StreamEnded):
                self._on_end(event.stream_id, out)
            elif isinstance(event, h2.events.TrailersReceived):
                pass  # gRPC clients send none; its StreamEnded follows
            elif isinstance(event, h2.events.StreamReset):
                st = self._streams.get(event.stream_id)
                if st is not None:
                    self._drop(st)
                    out.append(StreamReset(event.stream_id, int(event.error_code or 0), True))
            elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                stream_id = getattr(event, "stream_id", 0)
                targets = list(self._streams.values()) if not stream_id else (
                    [self._streams[stream_id]] if stream_id in self._streams else [])
                for st in targets:
                    if st.out or st.trailers is not None:
                        before = st.out_bytes
                        self._flush(st)
                        if st.out_bytes < before or st.id not in self._streams:
                            out.append(StreamWritable(st.id))
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
                out.append(ConnectionEnded(int(event.error_code or 0),
                                           (event.additional_data or b"").decode("utf-8", "replace")))
        return out

    # -- inbound ---------------------------------------------------------------------------

    def _on_request(self, event: h2.events.RequestReceived, out: list[Event]) -> None:
        stream_id = event.stream_id
        try:
            request = _parse_head(stream_id, event.headers or ())
        except _HttpRefusal as refusal:
            st = self._streams[stream_id] = _Stream(stream_id, self.max_message)
            st.finishing = True
            st.headers_sent = True
            self._h2.send_headers(stream_id, [(b":status", str(refusal.status).encode()),
                                              (b"content-type", b"text/plain")], end_stream=False)
            self._h2.send_data(stream_id, str(refusal).encode()[:1000], end_stream=True)
            self._close_if_done(st)
            return
        except GrpcError as exc:
            st = self._streams[stream_id] = _Stream(stream_id, self.max_message)
            self.finish(stream_id, make_status(exc.code, exc.message))
            return
        self._streams[stream_id] = _Stream(stream_id, self.max_message)
        out.append(RequestReceived(request))

    def _on_data(self, event: h2.events.DataReceived, out: list[Event]) -> None:
        stream_id = event.stream_id
        flow = event.flow_controlled_length or 0
        data = event.data or b""
        st = self._streams.get(stream_id)
        if st is None or st.finishing:
            self._ack(stream_id, flow)
            return
        padding = flow - len(data)
        before = st.decoder.buffered
        try:
            messages = st.decoder.feed(data)
        except GrpcError as exc:
            # The bytes buffered before were handed back as they came (take_partial).
            self._partial -= before
            st.decoder = MessageDecoder(0)
            self._ack(stream_id, flow)
            self._refuse(st, exc, out)
            return
        early = st.decoder.take_partial()
        self._partial += st.decoder.buffered - before
        self._ack(stream_id, padding + early)
        for message, size in messages:
            st.unacked += size
            out.append(MessageReceived(stream_id, message, size))
        if self._partial > self.max_partial:
            self._refuse(st, GrpcError(Code.RESOURCE_EXHAUSTED, (
                f"more than {self.max_partial} bytes of incomplete messages on this connection: "
                "send large messages one stream at a time")), out)

    def _on_end(self, stream_id: int, out: list[Event]) -> None:
        st = self._streams.get(stream_id)
        if st is None:
            return
        st.remote_ended = True
        if st.finishing:
            self._close_if_done(st)
            return
        if st.decoder.buffered:
            self._refuse(st, GrpcError(Code.INTERNAL, (
                f"the request ended inside a message ({st.decoder.buffered} bytes of it)")), out)
            return
        out.append(RequestEnded(stream_id))

    def _refuse(self, st: _Stream, exc: GrpcError, out: list[Event]) -> None:
        """End a stream this side cannot go on with: answer the status, tell the handler."""
        st.out.clear()
        st.sent = st.out_bytes = 0
        self.finish(st.id, make_status(exc.code, exc.message))
        out.append(StreamReset(st.id, int(h2.errors.ErrorCodes.CANCEL), False))

    def consumed(self, stream_id: int, size: int) -> None:
        """The caller used a message: hand its bytes back to the client's windows."""
        st = self._streams.get(stream_id)
        if st is None:
            return  # gone: its bytes were handed back when it went
        size = min(size, st.unacked)
        st.unacked -= size
        self._ack(stream_id, size)

    def _ack(self, stream_id: int, size: int) -> None:
        if size > 0 and not self.closed:
            self._h2.acknowledge_received_data(size, stream_id)

    # -- outbound ------------------------------------------------------------------------

    def is_open(self, stream_id: int) -> bool:
        st = self._streams.get(stream_id)
        return st is not None and not st.finishing

    def outbound_pending(self, stream_id: int) -> int:
        """Bytes of this stream's messages still waiting for the client's window."""
        st = self._streams.get(stream_id)
        return st.out_bytes if st is not None else 0

    def send_message(self, stream_id: int, payload: bytes, body: bytes | memoryview = b"") -> None:
        """Queue one message, ``payload`` followed by ``body`` (the response headers go
        first); sent as far as windows allow. A large ``body`` is sent as it is, not copied
        (it must not change until it is written)."""
        st = self._streams.get(stream_id)
        if st is None or st.finishing or self.closed:
            return
        if not st.headers_sent:
            st.headers_sent = True
            self._h2.send_headers(stream_id, _RESPONSE_HEADERS)
        size = len(payload) + len(body)
        if size <= _JOIN_BELOW:
            st.out.append(encode_message(payload + bytes(body) if body else payload))
        elif body:
            st.out.append(_PREFIX.pack(0, size) + payload)
            st.out.append(body)
        else:  # a large message is not copied to put its 5-byte prefix in front
            st.out.append(_PREFIX.pack(0, size))
            st.out.append(payload)
        st.out_bytes += 5 + size
        self._flush(st)

    def finish(self, stream_id: int, status: status_pb2.Status) -> None:
        """End the response with ``status`` (after the queued messages); a client still
        sending is then told to stop (RST_STREAM NO_ERROR)."""
        st = self._streams.get(stream_id)
        if st is None or st.trailers is not None or self.closed:
            return
        st.finishing = True
        self._partial -= st.decoder.buffered
        st.decoder = MessageDecoder(0)
        trailers = status_trailers(status)
        if not st.headers_sent:
            st.headers_sent = True
            st.trailers = [*_RESPONSE_HEADERS, *trailers]  # trailers-only
        else:
            st.trailers = trailers
        self._flush(st)

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        """Abort a stream (RST_STREAM), dropping what it had queued."""
        st = self._streams.get(stream_id)
        if st is None or self.closed:
            return
        self._drop(st)
        try:
            self._h2.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            pass

    def close(self, error_code: int = h2.errors.ErrorCodes.NO_ERROR, message: str = "") -> None:
        """GOAWAY: the connection takes no new streams; the caller closes it after sending."""
        if self.closed:
            return
        self.closed = True
        try:
            self._h2.close_connection(error_code, additional_data=message.encode()[:200] or None)
        except h2.exceptions.ProtocolError:
            pass

    @property
    def streams(self) -> int:
        return len(self._streams)

    def _flush(self, st: _Stream) -> None:
        h2c = self._h2
        stream_id = st.id
        out = st.out
        while out:
            room = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
            if room <= 0:
                return
            head = out[0]
            start = st.sent
            left = len(head) - start
            if left <= room:
                out.popleft()
                st.sent = 0
                piece: bytes | memoryview = head if not start else memoryview(head)[start:]
            else:
                st.sent += room
                piece = memoryview(head)[start : start + room]
            h2c.send_data(stream_id, piece)
            st.out_bytes -= len(piece)
        if st.trailers is not None:
            trailers, st.trailers = st.trailers, None
            h2c.send_headers(stream_id, trailers, end_stream=True)
            self._close_if_done(st)

    def _close_if_done(self, st: _Stream) -> None:
        """Our side has ended: stop a client still sending, and forget the stream."""
        if not st.remote_ended:
            try:
                self._h2.reset_stream(st.id, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.StreamClosedError:
                pass
        self._drop(st)

    def _drop(self, st: _Stream) -> None:
        if self._streams.pop(st.id, None) is None:
            return
        self._partial -= st.decoder.buffered
        if st.unacked and not self.closed:
            # Messages nobody will consume: their bytes still count against the connection.
            self._h2.acknowledge_received_data(st.unacked, st.id)
        st.unacked = 0
        st.out.clear()
        st.sent = st.out_bytes = 0
