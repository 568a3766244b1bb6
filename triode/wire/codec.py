"""The frame codec: bytes in, validated messages out, with no I/O (in the manner of h11).

A frame is a 4-byte big-endian length followed by that many bytes holding one msgpack
value. Every message is a msgpack array whose first element is its kind (see the
``HELLO`` … ``GOODBYE`` constants and docs/protocol.md). :class:`Decoder` accepts
byte chunks of any size and yields whole, shape-checked messages; a length over the
limit is refused from the header alone, before its body is buffered.
"""

from __future__ import annotations

import struct
from typing import Any

import msgpack

from ..errors import FrameTooLarge, ProtocolError

__all__ = [
    "HELLO", "CALL", "REPLY", "ERROR", "CANCEL", "DATA", "END", "CREDIT", "PING", "PONG",
    "GOODBYE", "KIND_NAMES", "DEFAULT_MAX_FRAME", "Decoder", "encode", "encode_data",
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
    """One message as a whole frame (length prefix included)."""
    try:
        body = _packer_default.pack(message)
    except (TypeError, ValueError, OverflowError) as exc:
        # Raised on *our* side: a handler or caller handed us something msgpack cannot hold.
        raise ProtocolError(f"cannot encode message: {exc}") from None
    return _HEADER.pack(len(body)) + body


def encode_data(call_id: int, chunk: bytes | bytearray | memoryview) -> bytes:
    """A DATA frame, built without msgpack re-packing the chunk."""
    head = _packer_default.pack(call_id)
    n = len(chunk)
    if n < 256:
        binhead = b"\xc4" + bytes((n,))
    elif n < 65536:
        binhead = b"\xc5" + n.to_bytes(2, "big")
    else:
        binhead = b"\xc6" + n.to_bytes(4, "big")
    body_len = 2 + len(head) + len(binhead) + n
    return b"".join((_HEADER.pack(body_len), b"\x93\x05", head, binhead, chunk))


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

    >>> d = Decoder()
    >>> d.receive_data(encode([PING, 7]))
    >>> d.next_message()
    [8, 7]
    >>> d.next_message() is None
    True
    """

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._need: int | None = None  # body length of the frame being assembled

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data
        if self._need is None:
            self._read_header()

    def _read_header(self) -> None:
        if len(self._buf) >= 4:
            (need,) = _HEADER.unpack_from(self._buf)
            if need > self.max_frame:
                raise FrameTooLarge(
                    f"frame of {need} bytes is over the limit of {self.max_frame} bytes",
                    size=need,
                    limit=self.max_frame,
                )
            self._need = need

    def next_message(self) -> list[Any] | None:
        """The next whole message, or None until more bytes arrive."""
        need = self._need
        if need is None or len(self._buf) < 4 + need:
            return None
        body = self._buf[4 : 4 + need]
        del self._buf[: 4 + need]
        self._need = None
        self._read_header()
        try:
            value = msgpack.unpackb(body, raw=False, use_list=True)
        except Exception as exc:  # msgpack raises a zoo of types for corrupt input
            raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
        return validate(value)

    def __iter__(self) -> Decoder:
        return self

    def __next__(self) -> list[Any]:
        message = self.next_message()
        if message is None:
            raise StopIteration
        return message
