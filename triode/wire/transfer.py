"""Moving a blob's bytes over a call's stream: framing, compression and read-ahead.

Both ends of a transfer use these: the node's ``cas.*`` handlers and the client's CAS.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable

import trio

from ..chunks import INLINE_LIMIT
from .framing import RAW_CHUNK, Decoder, Encoder

__all__ = ["BATCH_BYTES", "DECODE_BATCH", "ENCODE_LANES", "decode", "encode", "pump"]

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
