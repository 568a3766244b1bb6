"""Moving a blob's bytes over a call's stream: framing, compression and read-ahead.

Both ends of a transfer use these: the node's ``cas.*`` handlers and the client's CAS.
A node sends a blob with :func:`send_blob`, which reads only what the receiver's credit
allows, each read reserved in the connection's and the node's byte budget first
(:class:`~triode.wire.connection.ByteBudget`): a receiver that stops reading costs the
node no memory. A client uploads with :func:`pump`, which reads a little ahead.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Protocol

import trio

from ..chunks import INLINE_LIMIT, READ_CHUNK
from ..concurrency import single_error
from .connection import IncomingCall
from .framing import RAW_CHUNK, Decoder, Encoder

__all__ = [
    "BATCH_BYTES",
    "DECODE_BATCH",
    "ENCODE_LANES",
    "BlobReader",
    "ChunkReader",
    "FileReader",
    "decode",
    "encode",
    "pump",
    "send_blob",
]

#: Bytes of blob data in one ``cas.batch_read`` answer or ``cas.batch_update`` call.
BATCH_BYTES = 4 * 1024 * 1024
#: Received zstd framing decoded per worker-thread hop (at most).
DECODE_BATCH = 1024 * 1024
#: Worker threads compressing one transfer at once. Compression is the slow end of a zstd
#: transfer (the far side only decompresses, several times faster), so a node with spare
#: cores sends sooner; on the 2-core benchmark machine, with both cores busy, it measured
#: the same as one lane.
ENCODE_LANES = 2


async def decode(decoder: Decoder, framed: list[bytes]) -> list[bytes]:
    """Raw bytes of received zstd framing: everything in one worker-thread hop when large."""
    if sum(map(len, framed)) > INLINE_LIMIT:
        return await trio.to_thread.run_sync(decoder.feed_all, framed)
    return decoder.feed_all(framed)


async def encode(encoder: Encoder, chunk: bytes | memoryview) -> list[bytes]:
    """Frame (and compress) a chunk: in worker threads when it is large, one per lane of
    the encoder, each compressing its share of the chunk's frames."""
    if len(chunk) <= INLINE_LIMIT:
        return encoder.encode(chunk)
    view = memoryview(chunk).cast("B")
    frames = -(-len(view) // RAW_CHUNK)
    lanes = min(encoder.lanes, frames)
    if lanes == 1:
        return await trio.to_thread.run_sync(encoder.encode, view)
    per_lane = -(-frames // lanes) * RAW_CHUNK
    parts: list[list[bytes]] = [[] for _ in range(lanes)]

    async def one(lane: int) -> None:
        piece = view[lane * per_lane : (lane + 1) * per_lane]
        parts[lane] = await trio.to_thread.run_sync(encoder.encode, piece, lane)

    async with trio.open_nursery() as nursery:
        for lane in range(1, lanes):
            nursery.start_soon(one, lane)
        await one(0)
    return [frame for part in parts for frame in part]


async def pump(
    chunks: AsyncIterable[bytes | memoryview],
    encoder: Encoder | None,
    send: Callable[[bytes | memoryview], Awaitable[bool | None]],
    *,
    ahead: int = 2,
) -> int:
    """Send ``chunks`` (compressed by ``encoder`` if any), preparing the next while one is sent.

    Reading (a thread hop for a file) and compressing (another) overlap with sending,
    with at most ``ahead`` prepared chunks held. Stops early, cancelling the reader,
    when ``send`` returns False (the far side answered). Returns the raw bytes sent.
    """
    sent = 0
    tx, rx = trio.open_memory_channel[tuple[int, list[bytes | memoryview]]](ahead)

    async def prepare() -> None:
        async with tx:
            async for chunk in chunks:
                pieces: list[bytes | memoryview] = [chunk]
                if encoder is not None:
                    pieces = [*await encode(encoder, chunk)]
                await tx.send((len(chunk), pieces))

    stopped = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prepare)
            async for size, pieces in rx:
                for piece in pieces:
                    if await send(piece) is False:
                        stopped = True
                        break
                if stopped:
                    nursery.cancel_scope.cancel()
                    break
                sent += size
    finally:
        rx.close()
    return sent


class BlobReader(Protocol):
    """Reads a blob in order, in pieces of the size asked for (or less)."""

    async def read(self, n: int) -> bytes | memoryview:
        """Up to ``n`` bytes (at least one, unless the blob is over), reserved on the call."""
        ...


class FileReader:
    """Reads of a stored blob's file, of exactly the size asked for, each reserved first."""

    def __init__(self, call: IncomingCall, path: Path, offset: int) -> None:
        self._call = call
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pos = offset

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    async def read(self, n: int) -> bytes:
        await self._call.reserve(n)
        if n <= INLINE_LIMIT:
            block = os.pread(self._fd, n, self._pos)
        else:
            block = await trio.to_thread.run_sync(os.pread, self._fd, n, self._pos)
        if len(block) < n:
            self._call.unreserve(n - len(block))
        self._pos += len(block)
        return block


class ChunkReader:
    """A store's chunk iterator, cut to the sizes asked for. A chunk (up to 4 MiB) is
    reserved whole before it is fetched, so what it holds stays within the budget; for
    stores that cannot read a range of a given size (a node keeping blobs in memory)."""

    def __init__(self, call: IncomingCall, chunks: AsyncIterator[bytes], size: int) -> None:
        self._call = call
        self._chunks = chunks
        self._left = size  # bytes the iterator has still to give
        self._rest: memoryview = memoryview(b"")

    async def read(self, n: int) -> bytes | memoryview:
        if not self._rest:
            if self._left <= 0:
                return b""
            want = min(READ_CHUNK, self._left)
            await self._call.reserve(want)
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._call.unreserve(want)
                return b""
            if len(chunk) < want:
                self._call.unreserve(want - len(chunk))
            self._left -= len(chunk)
            self._rest = memoryview(chunk).cast("B")
        piece, self._rest = self._rest[:n], self._rest[n:]
        return piece


#: What :func:`send_blob` reads at most at once (one worker-thread hop).
SEND_READ = READ_CHUNK


async def send_blob(call: IncomingCall, reader: BlobReader, size: int, encoder: Encoder | None) -> int:
    """Send ``size`` bytes of ``reader`` on ``call``'s download (zstd-framed by ``encoder``
    if any); the raw bytes sent.

    Nothing is read ahead of the caller's credit: the bytes prepared (as sent: framed
    when encoded) never pass the credit the caller has granted so far, so a caller that
    stops granting credit makes the node hold nothing for it, however large its window
    was or how many downloads it opened. Reading (a thread hop) overlaps with sending
    what was read before. Stops early when the download ends (the call was answered or
    cancelled).
    """
    sent = 0
    tx, rx = trio.open_memory_channel[tuple[int, list[bytes | memoryview]]](math.inf)

    async def prepare() -> None:
        left = size
        prepared = 0
        async with tx:
            while left:
                # The room changes only when credit comes: sending spends credit and
                # prepared bytes alike.
                while (room := call.credit_granted - prepared) <= 0:
                    if not call.sending:
                        return
                    await call.wait_credit()
                data = await reader.read(min(room, SEND_READ, left))
                if not data:
                    return  # the store had less than its digest says: the sender finds out
                left -= len(data)
                pieces: list[bytes | memoryview] = [data]
                if encoder is not None:
                    pieces = [*await encode(encoder, data)]
                    call.unreserve(len(data) - sum(map(len, pieces)))  # compressed: fewer bytes held
                prepared += sum(map(len, pieces))
                await tx.send((len(data), pieces))

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(prepare)
            async with rx:
                async for raw, pieces in rx:
                    for piece in pieces:
                        if not await call.send(piece):
                            nursery.cancel_scope.cancel()
                            return sent
                    sent += raw
    except BaseExceptionGroup as group:
        raise single_error(group) from None
    return sent
