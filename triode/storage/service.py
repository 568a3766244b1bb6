"""The ``cas.*`` and ``ac.*`` wire methods: thin handlers over a CAS and an action cache.

Each handler checks its arguments (a typed error naming what is wrong), then calls
the store. Streams: ``cas.put`` reads the upload and answers as soon as it can (at
once when the blob is already stored); ``cas.get`` streams the blob. Both speak
``identity`` or ``zstd`` (see :mod:`triode.storage.framing`). Described in full in
docs/protocol.md, "Methods: cas" and "Methods: ac".
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any

import trio

from ..errors import InvalidArgument, TooLarge, TriodeError
from ..wire.connection import IncomingCall
from ..wire.router import Router
from .ac import ActionCache
from .cas import CAS, INLINE_LIMIT
from .digest import Digest
from .framing import IDENTITY, RAW_CHUNK, ZSTD, Decoder, Encoder, check_encoding, check_level

__all__ = ["register", "MAX_DIGESTS", "BATCH_BYTES", "DECODE_BATCH", "Upload", "decode", "encode", "pump"]

#: Digests in one ``cas.find_missing`` or ``cas.batch_read`` call.
MAX_DIGESTS = 100_000
#: Bytes of blob data in one ``cas.batch_read`` answer or ``cas.batch_update`` call.
BATCH_BYTES = 4 * 1024 * 1024
#: Received zstd framing decoded per worker-thread hop (at most).
DECODE_BATCH = 1024 * 1024
#: Worker threads compressing one transfer at once. Compression is the slow end of a zstd
#: transfer (the far side only decompresses, several times faster), so a node with spare
#: cores sends sooner; on the 2-core benchmark machine, with both cores busy, it measured
#: the same as one lane.
ENCODE_LANES = 2


def _args(call: IncomingCall, *required: str) -> dict[str, Any]:
    args = call.args
    if not isinstance(args, dict):
        raise InvalidArgument(f"{call.method} takes a map of arguments, got {type(args).__name__}")
    for key in required:
        if key not in args:
            raise InvalidArgument(f"{call.method} needs argument {key!r}")
    return args


def _digest_list(call: IncomingCall, value: Any, name: str = "digests") -> list[Digest]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{call.method}: {name!r} must be a list of [hash, size]")
    if len(value) > MAX_DIGESTS:
        raise TooLarge(
            f"{call.method}: {len(value)} digests in one call, over {MAX_DIGESTS}; split the batch"
        )
    return Digest.from_wire_list(value)


def _int_arg(args: dict[str, Any], key: str, default: int = 0) -> int:
    value = args.get(key, default)
    if type(value) is not int or value < 0:
        raise InvalidArgument(f"argument {key!r} must be a non-negative integer, got {value!r}")
    return value


class Upload:
    """The raw bytes of an upload: DATA chunks as they come, or decoded from zstd framing.

    A plain class rather than an async generator, so a reader that stops early
    (the blob was already there) leaves nothing to finalize.
    """

    def __init__(self, call: IncomingCall, encoding: str, limit: int) -> None:
        self._call = call
        self._decoder = Decoder(limit) if encoding == ZSTD else None
        self._ready: deque[bytes] = deque()

    def __aiter__(self) -> Upload:
        return self

    async def __anext__(self) -> bytes:
        if self._decoder is None:
            chunk = await self._call.receive()
            if chunk is None:
                raise StopAsyncIteration
            return chunk
        while not self._ready:
            framed = await self._call.receive_many(DECODE_BATCH)
            if framed is None:
                self._decoder.close()
                raise StopAsyncIteration
            self._ready.extend(await decode(self._decoder, framed))
        return self._ready.popleft()


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
                pieces = [chunk] if encoder is None else await encode(encoder, chunk)
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


def _encoding(call: IncomingCall, args: dict[str, Any]) -> str:
    encoding = check_encoding(args.get("encoding", IDENTITY))
    if encoding == ZSTD and ZSTD not in call.connection.features:
        raise InvalidArgument("zstd was asked for on a connection that did not negotiate it")
    return encoding


def register(router: Router, cas: CAS, ac: ActionCache) -> None:
    """Add the ``cas.*`` and ``ac.*`` methods to a node's router."""

    async def find_missing(call: IncomingCall) -> dict[str, Any]:
        digests = _digest_list(call, _args(call, "digests")["digests"])
        return {"missing": [d.to_wire() for d in await cas.find_missing(digests)]}

    async def put(call: IncomingCall) -> dict[str, Any]:
        args = _args(call, "digest")
        digest = Digest.from_wire(args["digest"])
        offset = _int_arg(args, "offset")
        upload_id = args.get("upload_id")
        if upload_id is not None and (type(upload_id) is not str or not 8 <= len(upload_id) <= 128):
            raise InvalidArgument("upload_id must be a string of 8 to 128 characters (a random uuid)")
        encoding = _encoding(call, args)
        cas.check_size(digest)
        upload = Upload(call, encoding, max(digest.size - offset, 0))
        await cas.put_stream(upload, digest, upload_id=upload_id, offset=offset)
        return {"digest": digest.to_wire()}

    async def get(call: IncomingCall) -> dict[str, Any]:
        args = _args(call, "digest")
        digest = Digest.from_wire(args["digest"])
        offset = _int_arg(args, "offset")
        encoding = _encoding(call, args)
        encoder = Encoder(check_level(args.get("level", 1)), lanes=ENCODE_LANES) if encoding == ZSTD else None
        async with cas.open_read(digest, offset) as chunks:
            sent = await pump(chunks, encoder, call.send)
        return {"size": sent}

    async def batch_read(call: IncomingCall) -> dict[str, Any]:
        digests = _digest_list(call, _args(call, "digests")["digests"])
        total = sum(d.size for d in dict.fromkeys(digests))
        if total > BATCH_BYTES:
            raise TooLarge(f"cas.batch_read of {total} bytes is over {BATCH_BYTES}; read large blobs "
                           "with cas.get or split the batch", size=total, limit=BATCH_BYTES)
        found = await cas.batch_read(digests)
        return {"blobs": [[d.to_wire(), data] for d, data in found.items()]}

    async def batch_update(call: IncomingCall) -> dict[str, Any]:
        blobs = _args(call, "blobs")["blobs"]
        if not isinstance(blobs, list) or not all(
            isinstance(b, list) and len(b) == 2 and isinstance(b[1], bytes) for b in blobs
        ):
            raise InvalidArgument("cas.batch_update: 'blobs' must be a list of [[hash, size], bytes]")
        total = sum(len(b[1]) for b in blobs)
        if total > BATCH_BYTES:
            raise TooLarge(f"cas.batch_update of {total} bytes is over {BATCH_BYTES}; upload large blobs "
                           "with cas.put or split the batch", size=total, limit=BATCH_BYTES)
        errors = []
        for wire_digest, data in blobs:
            try:
                digest = Digest.from_wire(wire_digest)
                await cas.put(data, digest)
            except TriodeError as exc:
                errors.append([wire_digest, exc.code, exc.message])
        return {"errors": errors}

    async def upload_status(call: IncomingCall) -> dict[str, Any]:
        upload_id = _args(call, "upload_id")["upload_id"]
        if type(upload_id) is not str:
            raise InvalidArgument("upload_id must be a string")
        status = cas.uploads.status(upload_id)
        if status is None:
            return {"digest": None, "committed": 0, "active": False}
        digest, committed, active = status
        return {"digest": digest.to_wire(), "committed": committed, "active": active}

    async def ac_get(call: IncomingCall) -> dict[str, Any]:
        key = Digest.from_wire(_args(call, "action_digest")["action_digest"])
        return {"result": await ac.get(key)}

    async def ac_update(call: IncomingCall) -> None:
        args = _args(call, "action_digest", "result")
        await ac.update(Digest.from_wire(args["action_digest"]), args["result"])

    router.add("cas.find_missing", find_missing)
    router.add("cas.put", put)
    router.add("cas.get", get)
    router.add("cas.batch_read", batch_read)
    router.add("cas.batch_update", batch_update)
    router.add("cas.upload_status", upload_status)
    router.add("ac.get", ac_get)
    router.add("ac.update", ac_update)
