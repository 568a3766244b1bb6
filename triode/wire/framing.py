"""zstd on the wire, sans-I/O: each chunk of a transfer says whether it is raw or compressed.

A transfer negotiated as ``"zstd"`` is a sequence of chunks, each a 5-byte header
(one flag byte, then the payload length as a 4-byte big-endian integer) and the payload:

* flag 0: the payload is raw bytes of the blob;
* flag 1: the payload is one zstd frame that records its content size.

A chunk that does not get smaller is sent raw, so random data costs no inflation.
Chunks need not line up with DATA frames (the wire splits and merges by credit),
hence the explicit lengths. The decoder is bounded twice: a payload over
:data:`MAX_PAYLOAD` is refused from its header, and a frame that would decompress to
more than :data:`MAX_PAYLOAD`, or past the bytes the digest still allows, is refused
before it is decompressed. A payload holds exactly one zstd frame.
Transfers negotiated as ``"identity"`` carry the blob's bytes with no framing at all.
"""

from __future__ import annotations

import struct

import zstandard

from ..errors import DigestMismatch, InvalidArgument

__all__ = [
    "IDENTITY",
    "ZSTD",
    "ENCODINGS",
    "RAW_CHUNK",
    "MAX_PAYLOAD",
    "Encoder",
    "Decoder",
    "check_encoding",
]

IDENTITY = "identity"
ZSTD = "zstd"
ENCODINGS = (IDENTITY, ZSTD)

#: Raw bytes per compressed chunk: large enough for a good ratio, small enough that
#: compressing one does not hold the event loop for long (~0.5 ms at zstd-1).
RAW_CHUNK = 256 * 1024
#: The largest payload a decoder accepts (a raw chunk, or a frame of one, plus slack).
MAX_PAYLOAD = 4 * 1024 * 1024

_HEADER = struct.Struct(">BI")
_RAW = 0
_COMPRESSED = 1
#: A compressed chunk is sent only if it saves at least this fraction.
_MIN_SAVING = 1 / 32


def check_encoding(value: object) -> str:
    if value not in ENCODINGS:
        raise InvalidArgument(f"encoding must be one of {', '.join(ENCODINGS)}, got {value!r}")
    return value


def check_level(value: object) -> int:
    if type(value) is not int or not 1 <= value <= 19:
        raise InvalidArgument(f"zstd level must be an integer from 1 to 19, got {value!r}")
    return value


class Encoder:
    """Turns raw bytes into framed chunks.

    Every chunk is an independent frame, so chunks can be compressed at the same time:
    ``lanes`` compressors, and :meth:`encode` with a distinct ``lane`` per concurrent
    caller (a compressor is not safe to share between threads).
    """

    def __init__(self, level: int = 1, *, lanes: int = 1) -> None:
        level = check_level(level)
        self._zstd = [
            zstandard.ZstdCompressor(level=level, write_content_size=True) for _ in range(lanes)
        ]

    @property
    def lanes(self) -> int:
        return len(self._zstd)

    def encode(self, data: bytes | bytearray | memoryview, lane: int = 0) -> list[bytes]:
        """Frame ``data`` (any size) into chunks of at most RAW_CHUNK raw bytes each."""
        out = []
        compress = self._zstd[lane].compress
        view = memoryview(data).cast("B")
        for start in range(0, len(view), RAW_CHUNK):
            piece = view[start : start + RAW_CHUNK]
            packed = compress(piece)
            if len(packed) <= len(piece) * (1 - _MIN_SAVING):
                out.append(_HEADER.pack(_COMPRESSED, len(packed)) + packed)
            else:
                out.append(_HEADER.pack(_RAW, len(piece)) + piece)
        return out


class Decoder:
    """Takes framed bytes as they arrive and returns the raw bytes they hold.

    ``limit`` is how many raw bytes the transfer may still produce (the digest's size
    minus where it starts); anything past it is a :class:`DigestMismatch`.
    """

    def __init__(self, limit: int) -> None:
        self._zstd = zstandard.ZstdDecompressor()
        self._buf = bytearray()
        self.remaining = limit

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        self._buf += data
        out = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= _HEADER.size:
            flag, length = _HEADER.unpack_from(buf, pos)
            if flag not in (_RAW, _COMPRESSED):
                raise InvalidArgument(f"zstd transfer chunk has unknown flag {flag} (0 raw, 1 zstd)")
            if length > MAX_PAYLOAD:
                raise InvalidArgument(
                    f"zstd transfer chunk has a payload of {length} bytes, over the limit of "
                    f"{MAX_PAYLOAD}", size=length, limit=MAX_PAYLOAD,
                )
            end = pos + _HEADER.size + length
            if len(buf) < end:
                break
            payload = bytes(memoryview(buf)[pos + _HEADER.size : end])
            pos = end
            if flag == _COMPRESSED:
                payload = self._decompress(payload)
            elif len(payload) > self.remaining:
                raise self._overflow(len(payload))
            self.remaining -= len(payload)
            out.append(payload)
        if pos:
            del buf[:pos]
        return out

    def feed_all(self, pieces: list[bytes]) -> list[bytes]:
        """:meth:`feed` for several received pieces at once (one thread hop for all)."""
        out: list[bytes] = []
        for piece in pieces:
            out += self.feed(piece)
        return out

    def _decompress(self, frame: bytes) -> bytes:
        try:
            size = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(f"zstd transfer chunk is not a zstd frame: {exc}") from None
        if size < 0:
            raise InvalidArgument("zstd transfer chunk must record its content size")
        if size > MAX_PAYLOAD:
            raise InvalidArgument(
                f"zstd transfer chunk decompresses to {size} bytes, over the limit of {MAX_PAYLOAD} "
                f"bytes per chunk; compress at most {MAX_PAYLOAD} raw bytes per chunk",
                size=size, limit=MAX_PAYLOAD,
            )
        if size > self.remaining:
            raise self._overflow(size)
        try:
            raw = self._zstd.decompress(frame, max_output_size=size, allow_extra_data=False)
        except zstandard.ZstdError as exc:
            if "unused data" in str(exc):
                raise InvalidArgument(
                    "zstd transfer chunk holds bytes after its zstd frame (a second frame?): "
                    "put exactly one frame in each chunk"
                ) from None
            raise InvalidArgument(f"zstd transfer chunk does not decompress: {exc}") from None
        if len(raw) != size:
            raise InvalidArgument(f"zstd frame said {size} bytes and held {len(raw)}")
        return raw

    def _overflow(self, size: int) -> DigestMismatch:
        return DigestMismatch(
            f"transfer expands past the size of its digest: a chunk of {size} bytes with "
            f"only {self.remaining} left",
        )

    def close(self) -> None:
        """The transfer ended: a partial chunk left over is a truncated stream."""
        if self._buf:
            raise InvalidArgument(f"zstd transfer ended inside a chunk ({len(self._buf)} bytes left over)")
