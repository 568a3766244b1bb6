"""The zstd transfer framing, sans-I/O: round trips under any chunking, and its bounds."""

from __future__ import annotations

import os
import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from triode.errors import DigestMismatch, InvalidArgument
from triode.wire.framing import MAX_PAYLOAD, RAW_CHUNK, Decoder, Encoder


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


@settings(max_examples=60, deadline=None)
@given(
    raw=st.binary(max_size=3000),
    repeat=st.integers(min_value=1, max_value=300),
    cuts=st.lists(st.integers(min_value=0, max_value=10**6), max_size=12),
)
def test_round_trip_under_any_chunking(raw: bytes, repeat: int, cuts: list[int]) -> None:
    data = raw * repeat
    wire = b"".join(Encoder().encode(data))
    decoder = Decoder(len(data))
    out = b"".join(b"".join(decoder.feed(piece)) for piece in _split(wire, cuts))
    decoder.close()
    assert out == data
    assert decoder.remaining == 0


@pytest.mark.parametrize("size", [0, 1, RAW_CHUNK - 1, RAW_CHUNK, RAW_CHUNK + 1, 3 * RAW_CHUNK + 7])
@pytest.mark.parametrize("kind", ["random", "compressible"])
def test_sizes_and_raw_fallback(size: int, kind: str) -> None:
    data = os.urandom(size) if kind == "random" else (b"triode " * (size // 7 + 1))[:size]
    encoder = Encoder()
    chunks = encoder.encode(data)
    assert len(chunks) == -(-size // RAW_CHUNK)
    decoder = Decoder(size)
    assert b"".join(decoder.feed(b"".join(chunks))) == data
    if kind == "random":  # incompressible chunks go raw: 5 bytes of header each, no more
        assert sum(map(len, chunks)) == size + 5 * len(chunks)
        assert all(c[0] == 0 for c in chunks)
    elif size > 1000:
        assert sum(map(len, chunks)) < size / 10


def test_expansion_past_declared_size_is_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 1_000_000)
    frame = struct.pack(">BI", 1, len(bomb)) + bomb
    with pytest.raises(DigestMismatch, match="expands past"):
        Decoder(1000).feed(frame)


def test_raw_chunk_past_declared_size_is_refused() -> None:
    with pytest.raises(DigestMismatch):
        Decoder(3).feed(struct.pack(">BI", 0, 4) + b"abcd")


def test_frame_without_content_size_is_refused() -> None:
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    obj = cctx.compressobj()
    frame = obj.compress(b"x" * 100) + obj.flush()
    with pytest.raises(InvalidArgument, match="content size"):
        Decoder(100).feed(struct.pack(">BI", 1, len(frame)) + frame)


@pytest.mark.parametrize(
    "wire, match",
    [
        (struct.pack(">BI", 7, 1) + b"x", "unknown flag"),
        (struct.pack(">BI", 0, MAX_PAYLOAD + 1), "over"),
        (struct.pack(">BI", 1, 4) + b"junk", "not a zstd frame"),
    ],
)
def test_malformed_chunks(wire: bytes, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        Decoder(10**9).feed(wire)


def test_truncated_stream_is_an_error_at_close() -> None:
    wire = b"".join(Encoder().encode(b"a" * 1000))
    decoder = Decoder(1000)
    decoder.feed(wire[:-3])
    with pytest.raises(InvalidArgument, match="ended inside a chunk"):
        decoder.close()


@pytest.mark.parametrize("lanes", [1, 2, 3])
async def test_encoding_in_parallel_lanes_keeps_the_order(lanes: int) -> None:
    """Large chunks are compressed by several threads at once; the frames still come in order."""
    from triode.wire.transfer import encode

    data = b"".join(os.urandom(8) * (RAW_CHUNK // 8 - i) + os.urandom(64 * i) for i in range(5)) + b"tail"
    frames = await encode(Encoder(lanes=lanes), data)
    assert len(frames) == -(-len(data) // RAW_CHUNK)
    decoder = Decoder(len(data))
    assert b"".join(decoder.feed_all(frames)) == data
    decoder.close()
