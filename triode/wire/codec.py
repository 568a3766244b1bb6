"""The frame codec: bytes in, validated messages out, with no I/O (in the manner of h11).

A frame is a 4-byte big-endian length followed by that many bytes holding one msgpack
value. Every message is a msgpack array whose first element is its kind (see the
``HELLO`` … ``GOODBYE`` constants and docs/protocol.md). :class:`Decoder` accepts
byte chunks of any size and yields whole, shape-checked messages; a length over the
limit is refused from the header alone, before its body is buffered.
"""

from __future__ import annotations

import itertools
import struct
from collections import deque
from typing import Any

import msgpack

from ..errors import EncodeError, FrameTooLarge, ProtocolError

__all__ = [
    "HELLO", "CALL", "REPLY", "ERROR", "CANCEL", "DATA", "END", "CREDIT", "PING", "PONG",
    "GOODBYE", "KIND_NAMES", "DEFAULT_MAX_FRAME", "Decoder", "encode", "encode_data", "data_header",
    "validate",
]

HELLO = 0    # [0, {version, node, features, window, max_frame, token?}]
CALL = 1     # [1, id, method, args, meta]
REPLY = 2    # [2, id, result]
ERROR = 3    # [3, id, code, message, details]
CANCEL = 4   # [4, id]
DATA = 5     # [5, id, chunk]
END = 6      # [6, id]
CREDIT = 7   # [7, id, nbytes]
PING = 8     # [8, nonce]
PONG = 9     # [9, nonce]
GOODBYE = 10 # [10, reason]

KIND_NAMES = {
    HELLO: "HELLO", CALL: "CALL", REPLY: "REPLY", ERROR: "ERROR", CANCEL: "CANCEL",
    DATA: "DATA", END: "END", CREDIT: "CREDIT", PING: "PING", PONG: "PONG",
    GOODBYE: "GOODBYE",
}

#: Default limit on one frame's body. Stream chunks are far smaller (see connection.py);
#: the limit bounds what one unary call's arguments or result may hold.
DEFAULT_MAX_FRAME = 8 * 1024 * 1024

#: An empty frame holds no msgpack value at all; it is refused from its header.
MIN_FRAME = 1

#: The largest call id: ids are unsigned 63-bit so every msgpack implementation holds them.
MAX_ID = 2**63 - 1

_HEADER = struct.Struct(">I")
_ANY = object()

# For each kind, the types of the elements after the kind. ``_ANY`` accepts any value.
_SHAPES: dict[int, tuple[Any, ...]] = {
    HELLO: (dict,),
    CALL: (int, str, _ANY, dict),
    REPLY: (int, _ANY),
    ERROR: (int, str, str, dict),
    CANCEL: (int,),
    DATA: (int, bytes),
    END: (int,),
    CREDIT: (int, int),
    PING: (int,),
    PONG: (int,),
    GOODBYE: (str,),
}

_packer_default = msgpack.Packer(use_bin_type=True, autoreset=True)


def encode(message: list[Any] | tuple[Any, ...]) -> bytes:
    """One message as a whole frame (length prefix included).

    Raises :class:`EncodeError`, not ProtocolError, for a value msgpack cannot hold: the
    fault is on our side (a caller's argument, a handler's result), not the peer's.
    """
    try:
        body: bytes = _packer_default.pack(message)
    except (TypeError, ValueError, OverflowError, BufferError) as exc:
        # TypeError: a type msgpack lacks (set, object); OverflowError: an int over 64 bits;
        # ValueError: a str with surrogates, nesting too deep; BufferError: a strided view.
        # msgpack resets the packer's buffer on failure, so the next frame is not corrupted.
        raise EncodeError(f"cannot encode message: {exc}") from None
    return _HEADER.pack(len(body)) + body


def data_header(call_id: int, size: int) -> bytes:
    """Everything of a DATA frame before its ``size`` chunk bytes (length prefix included).

    Sent followed by the chunk itself, it lets a sender put a chunk on the wire without
    copying it into a frame first.
    """
    head = _packer_default.pack(call_id)
    if size < 256:
        binhead = b"\xc4" + bytes((size,))
    elif size < 65536:
        binhead = b"\xc5" + size.to_bytes(2, "big")
    else:
        binhead = b"\xc6" + size.to_bytes(4, "big")
    return b"".join((_HEADER.pack(2 + len(head) + len(binhead) + size), b"\x93\x05", head, binhead))


def encode_data(call_id: int, chunk: bytes | bytearray | memoryview) -> bytes:
    """A whole DATA frame, built without msgpack re-packing the chunk."""
    return data_header(call_id, len(chunk)) + chunk


def validate(value: Any) -> list[Any]:
    """Check a decoded value is a known message of the right shape; return it as a list."""
    if type(value) is not list or not value:
        raise ProtocolError(f"a message must be a non-empty array, got {type(value).__name__}")
    kind = value[0]
    shape = _SHAPES.get(kind) if type(kind) is int else None
    if shape is None:
        raise ProtocolError(f"unknown message kind {kind!r}")
    if len(value) != len(shape) + 1:
        raise ProtocolError(
            f"{KIND_NAMES[kind]} has {len(shape) + 1} elements, got {len(value)}"
        )
    for i, expected in enumerate(shape, 1):
        if expected is not _ANY and type(value[i]) is not expected:
            raise ProtocolError(
                f"{KIND_NAMES[kind]} element {i} must be {expected.__name__}, "
                f"got {type(value[i]).__name__}"
            )
    if kind in (CALL, REPLY, ERROR, CANCEL, DATA, END, CREDIT) and not 0 <= value[1] <= MAX_ID:
        raise ProtocolError(f"{KIND_NAMES[kind]} call id {value[1]} is out of range")
    if kind == CREDIT and value[2] <= 0:
        raise ProtocolError(f"CREDIT must grant a positive number of bytes, got {value[2]}")
    return value


class Decoder:
    """Accumulates received bytes and hands out whole, validated messages.

    Received chunks are kept as they came (no concatenation), so a frame inside one
    chunk is decoded from a view of it, and the bytes of a DATA chunk are copied
    exactly once, into the ``bytes`` handed out, however the frame was split.

    >>> d = Decoder()
    >>> d.receive_data(encode([PING, 7]))
    >>> d.next_message()
    [8, 7]
    >>> d.next_message() is None
    True
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._pieces: deque[bytes] = deque()
        self._offset = 0  # bytes of _pieces[0] already consumed
        self._size = 0  # bytes received and not yet consumed
        self._need: int | None = None  # body length of the frame being assembled

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out (the header of a pending frame excluded)."""
        return self._size

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes. Raises :class:`FrameTooLarge` as soon as an over-limit
        header is at the front, so its body is never accumulated."""
        if not data:
            return
        if type(data) is not bytes:
            data = bytes(data)  # we keep it: it must not change under us
        self._pieces.append(data)
        self._size += len(data)
        if self._need is None:
            self._read_header()

    def _read_header(self) -> None:
        if self._size >= 4:
            (need,) = _HEADER.unpack(self._take(4))
            if need < MIN_FRAME:
                raise ProtocolError(f"frame of {need} bytes is too short to hold a message")
            if need > self.max_frame:
                raise FrameTooLarge(
                    f"frame of {need} bytes is over the limit of {self.max_frame} bytes",
                    size=need,
                    limit=self.max_frame,
                )
            self._need = need

    def _peek(self, n: int) -> bytes:
        """Up to ``n`` bytes from the front, not consumed."""
        out = self._pieces[0][self._offset : self._offset + n]
        for piece in itertools.islice(self._pieces, 1, None):
            if len(out) >= n:
                break
            out += piece[: n - len(out)]
        return out

    def _take(self, n: int) -> bytes | memoryview:
        """Consume ``n`` bytes: a view when they lie in one received chunk, else one copy."""
        first, off = self._pieces[0], self._offset
        if len(first) - off >= n:
            out: bytes | memoryview = memoryview(first)[off : off + n]
            off += n
            if off == len(first):
                self._pieces.popleft()
                off = 0
        else:
            parts: list[bytes | memoryview] = []
            left = n
            while left:
                first = self._pieces[0]
                avail = len(first) - off
                if avail <= left:
                    parts.append(memoryview(first)[off:] if off else first)
                    self._pieces.popleft()
                    left -= avail
                    off = 0
                else:
                    parts.append(memoryview(first)[off : off + left])
                    off += left
                    left = 0
            out = b"".join(parts)
        self._offset = off
        self._size -= n
        return out

    def next_message(self) -> list[Any] | None:
        """The next whole message, or None until more bytes arrive.

        The header of the frame after it is checked on the next call, not now, so a
        limit changed between two calls (the hello raises it) applies to that frame.
        """
        if self._need is None:
            # The common case: a small frame whole in the first received chunk.
            if self._pieces:
                first, off = self._pieces[0], self._offset
                if len(first) - off >= 4:
                    (need,) = _HEADER.unpack_from(first, off)
                    start = off + 4
                    stop = start + need
                    if need <= self.max_frame and 2 <= need <= 4096 and stop <= len(first) and (
                        first[start + 1] != DATA
                    ):
                        if stop == len(first):
                            self._pieces.popleft()
                            stop = 0
                        self._offset = stop
                        self._size -= 4 + need
                        try:
                            value = msgpack.unpackb(first[start : start + need], raw=False, use_list=True)
                        except Exception as exc:
                            raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
                        return validate(value)
            self._read_header()
        need = self._need
        if need is None or self._size < need:
            return None
        self._need = None
        data = self._take_data(need)
        if data is not None:
            return data
        body = self._take(need)
        try:
            value = msgpack.unpackb(body, raw=False, use_list=True)
        except Exception as exc:  # msgpack raises a zoo of types for corrupt input
            raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
        return validate(value)

    def _take_data(self, need: int) -> list[Any] | None:
        """The fast path for DATA frames, the bulk of a stream: parse the head by hand
        and copy the chunk once. Anything unusual is left to msgpack and validate()."""
        head = self._peek(12)
        if len(head) < 4 or head[0] != 0x93 or head[1] != DATA:
            return None
        tag = head[2]
        if tag <= 0x7F:
            call_id, pos = tag, 3
        elif tag == 0xCC:
            call_id, pos = head[3], 4
        elif tag == 0xCD:
            call_id, pos = int.from_bytes(head[3:5], "big"), 5
        elif tag == 0xCE:
            call_id, pos = int.from_bytes(head[3:7], "big"), 7
        else:
            return None
        if len(head) < pos + 1:
            return None
        bin_tag = head[pos]
        width = 1 if bin_tag == 0xC4 else 2 if bin_tag == 0xC5 else 4 if bin_tag == 0xC6 else 0
        start = pos + 1 + width
        if not width or len(head) < start:
            return None
        n = int.from_bytes(head[pos + 1 : start], "big")
        if start + n != need:
            return None
        self._take(start)
        chunk = self._take(n) if n else b""
        return [DATA, call_id, chunk if type(chunk) is bytes else bytes(chunk)]

    def __iter__(self) -> Decoder:
        return self

    def __next__(self) -> list[Any]:
        message = self.next_message()
        if message is None:
            raise StopIteration
        return message
