"""The CAS of a node, through a connection: ``client.cas``.

Same API as the local stores. Small blobs travel in unary batch calls, large ones as
streams; ``compression="zstd"`` asks the node to speak zstd for streamed transfers
(when the connection negotiated it). Every blob read is verified against its
digest before it is handed over whole (``get``, ``write_to``) or at the end of the
stream (``open_read`` from offset 0).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ..chunks import bytes_chunks, collect, digest_of, file_chunks, hash_file, write_chunks
from ..concurrency import open_service_nursery, single_error
from ..errors import BlobNotFound, FailedPrecondition, TooLarge, TriodeError, from_wire
from ..model.digest import Digest, Hasher
from ..wire.connection import Connection, OutgoingCall
from ..wire.framing import IDENTITY, ZSTD, Decoder, Encoder, check_encoding
from ..wire.transfer import BATCH_BYTES, DECODE_BATCH, ENCODE_LANES, decode, pump

__all__ = ["RemoteCAS"]

#: Digests per ``cas.find_missing`` call (the node takes up to 100,000; this keeps frames small).
FIND_MISSING_BATCH = 20_000
#: Downloaded bytes up to this size are hashed on the event loop (a thread hop costs more).
HASH_INLINE = 512 * 1024
#: Downloaded bytes hashed per worker-thread hop.
HASH_BATCH = 4 * 1024 * 1024
#: Downloaded chunks that may wait for the hashing task before the reader waits for it.
HASH_AHEAD = 8
#: Blobs up to this size go in unary batch calls rather than streams.
SMALL_BLOB = 64 * 1024


class RemoteCAS:
    """A node's CAS, over one connection (see the module docstring)."""

    kind = "remote"

    def __init__(self, connection: Connection, *, compression: str = IDENTITY, level: int = 1) -> None:
        self.connection = connection
        #: ``"identity"`` or ``"zstd"``: what streamed transfers ask for.
        self.compression = check_encoding(compression)
        #: zstd level for both directions (1 is fast; up to 19).
        self.level = level
        self._small = _Coalescer(self._read_batch)

    def _encoding(self, override: str | None) -> str:
        encoding = check_encoding(override or self.compression)
        if encoding == ZSTD and ZSTD not in self.connection.features:
            return IDENTITY
        return encoding

    # -- presence --------------------------------------------------------------------------

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        wanted = list(dict.fromkeys(d for d in digests if d.size))
        missing: list[Digest] = []
        for start in range(0, len(wanted), FIND_MISSING_BATCH):
            batch = wanted[start : start + FIND_MISSING_BATCH]
            reply = await self.connection.call("cas.find_missing", {"digests": [d.to_wire() for d in batch]})
            missing += Digest.from_wire_list(reply["missing"])
        return missing

    async def contains(self, digest: Digest) -> bool:
        return not await self.find_missing([digest])

    # -- writing ---------------------------------------------------------------------------

    async def put(
        self,
        data: bytes | bytearray | memoryview,
        digest: Digest | None = None,
        *,
        encoding: str | None = None,
    ) -> Digest:
        if digest is None:
            digest = await digest_of(data)
        if len(data) <= SMALL_BLOB and digest.size <= SMALL_BLOB:
            errors = await self.batch_update([(digest, bytes(data))])
            if errors[digest] is not None:
                raise errors[digest]  # type: ignore[misc]
            return digest
        return await self.put_stream(bytes_chunks(data), digest, encoding=encoding)

    async def put_stream(
        self,
        chunks: AsyncIterable[bytes | memoryview],
        digest: Digest,
        *,
        upload_id: str | None = None,
        offset: int = 0,
        encoding: str | None = None,
    ) -> Digest:
        """Upload ``chunks`` (the blob from ``offset`` on) as ``digest``.

        With ``upload_id`` (any random string of 8-128 characters) the node keeps what
        arrived if the upload is cut; ask :meth:`upload_status` and call again with the
        same id, ``offset`` set to the committed size and only the rest of the bytes.
        """
        encoding = self._encoding(encoding)
        args: dict[str, Any] = {"digest": digest.to_wire(), "encoding": encoding, "offset": offset}
        if upload_id is not None:
            args["upload_id"] = upload_id
        encoder = Encoder(self.level, lanes=ENCODE_LANES) if encoding == ZSTD else None
        async with self.connection.open_call("cas.put", args, upload=True) as call:
            await _send_all(call, chunks, encoder)
            reply = await call.result()
        return Digest.from_wire(reply["digest"])

    async def put_file(
        self, path: Path, digest: Digest | None = None, *, upload_id: str | None = None,
        encoding: str | None = None,
    ) -> Digest:
        """Upload a local file; with ``upload_id`` it resumes where a cut upload of that id stopped."""
        path = Path(path)
        if digest is None:
            digest = await hash_file(path)
        offset = 0
        if upload_id is not None:
            status = await self.connection.call("cas.upload_status", {"upload_id": upload_id})
            if status["digest"] == digest.to_wire() and not status["active"]:
                offset = status["committed"]
        elif digest.size <= SMALL_BLOB:
            data = await trio.to_thread.run_sync(path.read_bytes)
            return await self.put(data, digest)
        async with file_chunks(path, offset) as chunks:
            return await self.put_stream(
                chunks, digest, upload_id=upload_id, offset=offset, encoding=encoding
            )

    async def upload_status(self, upload_id: str) -> int:
        """Bytes the node has committed of the upload ``upload_id`` (0 when it has none)."""
        status = await self.connection.call("cas.upload_status", {"upload_id": upload_id})
        return int(status["committed"])

    async def batch_update(self, blobs: Iterable[tuple[Digest, bytes]]) -> dict[Digest, Exception | None]:
        """Upload many small blobs in few calls; each digest maps to None or the error it got."""
        out: dict[Digest, Exception | None] = {}
        batch: list[list[Any]] = []
        size = 0

        async def flush() -> None:
            nonlocal batch, size
            if batch:
                reply = await self.connection.call("cas.batch_update", {"blobs": batch})
                for wire_digest, code, message in reply["errors"]:
                    out[Digest.from_wire(wire_digest)] = from_wire(code, message)
                batch, size = [], 0

        for digest, data in blobs:
            if len(data) > BATCH_BYTES // 2:
                try:
                    await self.put_stream(bytes_chunks(data), digest)
                    out[digest] = None
                except TriodeError as exc:
                    out[digest] = exc
                continue
            if size + len(data) > BATCH_BYTES // 2:
                await flush()
            out[digest] = None
            batch.append([digest.to_wire(), bytes(data)])
            size += len(data)
        await flush()
        return out

    # -- reading ---------------------------------------------------------------------------

    async def batch_read(self, digests: Iterable[Digest]) -> dict[Digest, bytes | None]:
        """Many small blobs in few calls: each digest to its (verified) bytes, or None when missing."""
        out: dict[Digest, bytes | None] = {}
        batch: list[Digest] = []
        size = 0

        async def flush() -> None:
            nonlocal batch, size
            if batch:
                args = {"digests": [d.to_wire() for d in batch]}
                reply = await self.connection.call("cas.batch_read", args)
                for wire_digest, data in reply["blobs"]:
                    digest = Digest.from_wire(wire_digest)
                    if data is not None:
                        _verify(digest, data)
                    out[digest] = data
                batch, size = [], 0

        for digest in dict.fromkeys(digests):
            if digest.size == 0:
                out[digest] = b""
            elif digest.size > BATCH_BYTES // 2:
                try:
                    out[digest] = await self.get(digest)
                except BlobNotFound:
                    out[digest] = None
            else:
                if size + digest.size > BATCH_BYTES // 2:
                    await flush()
                batch.append(digest)
                size += digest.size
        await flush()
        return out

    async def _read_batch(self, digests: list[Digest]) -> dict[Digest, bytes | None]:
        reply = await self.connection.call("cas.batch_read", {"digests": [d.to_wire() for d in digests]})
        out: dict[Digest, bytes | None] = {}
        for wire_digest, data in reply["blobs"]:
            digest = Digest.from_wire(wire_digest)
            if data is not None:
                _verify(digest, data)
            out[digest] = data
        return out

    async def get(self, digest: Digest, *, limit: int | None = None, encoding: str | None = None) -> bytes:
        if limit is not None and digest.size > limit:
            raise TooLarge(f"blob {digest} is {digest.size} bytes, over the limit of {limit} asked for",
                           size=digest.size, limit=limit)
        if digest.size == 0:
            return b""
        if digest.size <= SMALL_BLOB:
            data = await self._small.get(digest)
            if data is None:
                raise BlobNotFound(f"blob {digest} is not stored on node {self.connection.peer.node}",
                                   digest=str(digest))
            return data
        async with self.open_read(digest, encoding=encoding) as chunks:
            return await collect(chunks)  # bounded: the download fails past the digest's size

    @asynccontextmanager
    async def open_read(
        self, digest: Digest, offset: int = 0, *, encoding: str | None = None
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Chunks of the blob from ``offset``; leaving the block early cancels the read on the node."""
        encoding = self._encoding(encoding)
        args = {"digest": digest.to_wire(), "offset": offset, "encoding": encoding, "level": self.level}
        async with self.connection.open_call("cas.get", args) as call, open_service_nursery() as nursery:
            try:
                yield _Download(call, digest, offset, encoding, nursery)
            finally:
                nursery.cancel_scope.cancel()  # a reader that left early: stop verifying

    async def write_to(self, digest: Digest, path: Path, *, encoding: str | None = None) -> None:
        """Write the blob to ``path`` (a temp file beside it, renamed into place once verified)."""
        await write_chunks(self.open_read(digest, encoding=encoding), Path(path))

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "node": self.connection.peer.node}


def _verify(digest: Digest, data: bytes) -> None:
    hasher = Hasher()
    hasher.update(data)
    hasher.verify(digest)


async def _send_all(
    call: OutgoingCall, chunks: AsyncIterable[bytes | memoryview], encoder: Encoder | None
) -> None:
    """Upload until the chunks end or the node answers early (it had the blob, or refused it)."""
    try:
        await pump(chunks, encoder, call.send)
    except BaseExceptionGroup as group:
        raise single_error(group) from None


class _Download:
    """Chunks of a ``cas.get`` stream, decoded, counted and verified at the end.

    A whole download (from offset 0) is hashed by a task of its own, in a worker
    thread, while the reader goes on receiving: verifying then costs the slower of the
    two rather than their sum. At most :data:`HASH_AHEAD` chunks wait to be hashed.
    """

    def __init__(
        self, call: OutgoingCall, digest: Digest, offset: int, encoding: str, nursery: trio.Nursery
    ) -> None:
        self._call = call
        self._digest = digest
        self._remaining = digest.size - offset
        self._decoder = Decoder(self._remaining) if encoding == ZSTD else None
        self._ready: deque[bytes] = deque()
        self._hasher: Hasher | None = None
        if offset == 0:
            self._hasher = Hasher()
            self._to_hash, to_hash = trio.open_memory_channel[bytes](HASH_AHEAD)
            self._hashed = trio.Event()
            nursery.start_soon(self._hash, to_hash)

    def __aiter__(self) -> _Download:
        return self

    async def __anext__(self) -> bytes:
        while not self._ready:
            # Framing is decoded in batches (one thread hop each); raw chunks go one by one.
            received = await self._call.receive_many(0 if self._decoder is None else DECODE_BATCH)
            if received is None:
                await self._finish()
                raise StopAsyncIteration
            if self._decoder is None:
                self._ready.extend(received)
            else:
                self._ready.extend(await decode(self._decoder, received))
        chunk = self._ready.popleft()
        self._remaining -= len(chunk)
        if self._remaining < 0:
            raise FailedPrecondition(f"node sent more than the {self._digest.size} bytes of {self._digest}")
        if self._hasher is not None:
            await self._to_hash.send(chunk)
        return chunk

    async def _hash(self, chunks: trio.MemoryReceiveChannel[bytes]) -> None:
        """Hash what the reader received, :data:`HASH_BATCH` bytes per thread hop."""
        hasher = self._hasher
        assert hasher is not None
        batch: list[bytes] = []
        size = 0
        async with chunks:
            async for chunk in chunks:
                batch.append(chunk)
                size += len(chunk)
                if size >= HASH_BATCH:
                    await trio.to_thread.run_sync(hasher.update_all, batch)
                    batch, size = [], 0
        if size > HASH_INLINE:
            await trio.to_thread.run_sync(hasher.update_all, batch)
        else:
            hasher.update_all(batch)
        self._hashed.set()

    async def _finish(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
        if self._remaining:
            raise FailedPrecondition(f"node ended the stream of {self._digest} {self._remaining} bytes short")
        if self._hasher is not None:
            self._to_hash.close()
            await self._hashed.wait()
            self._hasher.verify(self._digest)


class _Waiter:
    __slots__ = ("digest", "outcome", "wake")

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.outcome: tuple[bool, Any] | None = None
        self.wake = trio.Event()  # set when the outcome is in, or when it is this one's turn to send


class _Coalescer:
    """Concurrent small gets share ``cas.batch_read`` calls instead of one call each.

    No background task: a getter that finds a free call slot sends the whole queue
    (its own digest and whatever other getters queued meanwhile) and hands every
    waiter its answer; when a call ends, the first getter still queued is woken to
    send the next batch. A single get goes out at once; under load, gets ride in
    batches while ``max_calls`` are in flight. A sender that is cancelled puts the
    others' digests back at the head of the queue, so only the cancelled getter fails.
    """

    def __init__(self, read_batch: Any, *, max_calls: int = 4, max_batch: int = 256) -> None:
        self._read_batch = read_batch
        self._max_calls = max_calls
        self._max_batch = max_batch
        self._queue: deque[_Waiter] = deque()
        self._calls = 0

    async def get(self, digest: Digest) -> bytes | None:
        me = _Waiter(digest)
        self._queue.append(me)
        try:
            while me.outcome is None:
                if self._calls < self._max_calls and self._queue:
                    await self._send()
                else:
                    await me.wake.wait()
                    if me.outcome is None:
                        me.wake = trio.Event()
        except BaseException:
            if me.outcome is None and me in self._queue:
                self._queue.remove(me)
            self._pass_turn()
            raise
        ok, value = me.outcome
        if ok:
            return value
        raise value

    def _pass_turn(self) -> None:
        if self._queue and self._calls < self._max_calls:
            self._queue[0].wake.set()

    async def _send(self) -> None:
        batch: list[_Waiter] = []
        size = 0
        while self._queue and len(batch) < self._max_batch and size < BATCH_BYTES // 2:
            waiter = self._queue.popleft()
            batch.append(waiter)
            size += waiter.digest.size
        self._calls += 1
        self._pass_turn()  # another slot is free: let the next queued getter send too
        try:
            found = await self._read_batch(list(dict.fromkeys(w.digest for w in batch)))
        except trio.Cancelled:
            self._queue.extendleft(reversed(batch))  # the others retry in another call
            raise
        except Exception as exc:
            for waiter in batch:
                waiter.outcome = (False, exc)
                waiter.wake.set()
        else:
            for waiter in batch:
                waiter.outcome = (True, found.get(waiter.digest))
                waiter.wake.set()
        finally:
            self._calls -= 1
            self._pass_turn()
