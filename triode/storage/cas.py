"""The async CAS interface, and what every local store shares.

A local store (:class:`~triode.storage.disk.DiskCAS`, :class:`~triode.storage.memory.MemoryCAS`)
supplies three primitives: which digests it lacks, a reader, and a :class:`Writer`.
This base builds the whole API on them, so verification, the empty blob, concurrent
puts of one blob, resumable uploads and the backing tier (read-through, write-through,
one shared fetch per missing blob) are written once.

Stored bytes can still go bad behind the store's back (a disk, a person, an action that
wrote through a hard link). :meth:`CAS.verify` re-hashes what is stored and removes
what no longer matches its digest; and wherever the store hashes stored bytes anyway
(whole small blobs read from disk, a blob the backing node refuses on write-through),
a mismatch removes the blob there and then, so it is never served again.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from ..chunks import INLINE_LIMIT, bytes_chunks, collect, digest_of, file_chunks, hash_file, write_chunks
from ..concurrency import single_error
from ..errors import BlobNotFound, DigestMismatch, FailedPrecondition, TooLarge, TriodeError
from ..model.digest import EMPTY, Digest, Hasher

if TYPE_CHECKING:
    from .tier import Backing

__all__ = [
    "Pins",
    "Lease",
    "CAS",
    "Writer",
    "PartialUploads",
    "VerifyReport",
    "WRITE_BATCH",
    "DEFAULT_MAX_BLOB_SIZE",
]

#: Bytes gathered from an upload before one thread hop hashes and writes them.
WRITE_BATCH = 4 * 1024 * 1024
#: Blobs of one batch read fetched from the backing tier at once.
BATCH_FETCHES = 16
#: Batches an upload may gather ahead of the one being written.
WRITE_AHEAD = 1
DEFAULT_MAX_BLOB_SIZE = 64 * 1024**3
#: Bytes :meth:`CAS.verify` hashes per worker-thread hop (and small blobs it takes per hop).
VERIFY_BATCH = 4 * 1024 * 1024
VERIFY_FILES = 256

log = logging.getLogger("triode.storage")


@dataclass
class VerifyReport:
    """What :meth:`CAS.verify` found: blobs and bytes re-hashed, the damaged ones (removed),
    and, when it was given digests, those not stored at all."""

    checked: int = 0
    bytes: int = 0
    damaged: list[Digest] = field(default_factory=list)
    missing: list[Digest] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "bytes": self.bytes,
            "damaged": [d.to_wire() for d in self.damaged],
            "missing": [d.to_wire() for d in self.missing],
        }


class _Empty:
    def __aiter__(self) -> _Empty:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


class Writer(ABC):
    """One blob being written: hashed and counted as it goes, stored only on commit."""

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self.hasher = Hasher()
        self.done = False

    @property
    def offset(self) -> int:
        """Bytes written (and hashed) so far: where a resumed upload continues."""
        return self.hasher.size

    @abstractmethod
    async def write(self, chunks: list[bytes | memoryview]) -> None:
        """Hash and write ``chunks``; they never take the blob past its digest's size."""

    @abstractmethod
    async def _store(self) -> None:
        """Make the verified bytes the stored blob (atomically)."""

    @abstractmethod
    def _drop(self) -> None:
        """Forget the bytes written so far (close and delete a temp file)."""

    async def commit(self) -> None:
        if self.hasher.size != self.digest.size:
            raise DigestMismatch(
                f"upload ended after {self.hasher.size} of the {self.digest.size} bytes of {self.digest}",
                expected=str(self.digest), received=self.hasher.size,
            )
        self.hasher.verify(self.digest)
        await self._store()
        self.done = True

    def discard(self) -> None:
        """Drop a writer that will not be committed; safe to call twice or after commit."""
        if not self.done:
            self.done = True
            self._drop()


class _Partial:
    __slots__ = ("writer", "touched", "active")

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.touched = time.monotonic()
        self.active = True


class PartialUploads:
    """Uploads that may be resumed, by upload id: bounded in number and in idle time.

    An upload with an id that is cut (cancelled, connection lost) is *parked* here with
    the bytes it had written; a client resumes it by sending the same id and the
    committed offset. The oldest parked upload goes when there are too many; parked
    ones idle past ``max_age`` are dropped by :meth:`sweep`; :meth:`clear` drops all.
    """

    def __init__(self, *, max_count: int = 64, max_age: float = 600.0) -> None:
        self.max_count = max_count
        self.max_age = max_age
        self._items: OrderedDict[str, _Partial] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def status(self, upload_id: str) -> tuple[Digest, int, bool] | None:
        item = self._items.get(upload_id)
        if item is None:
            return None
        return item.writer.digest, item.writer.offset, item.active

    def begin(self, upload_id: str, writer: Writer) -> None:
        if upload_id in self._items:
            raise FailedPrecondition(f"upload {upload_id} already exists; resume it or use a new id")
        self._items[upload_id] = _Partial(writer)
        self._evict_over_count()

    def resume(self, upload_id: str, digest: Digest, offset: int) -> Writer:
        item = self._items.get(upload_id)
        committed = item.writer.offset if item is not None and item.writer.digest == digest else 0
        if item is None or item.writer.digest != digest:
            raise FailedPrecondition(
                f"no partial upload {upload_id} of {digest} here (it may have expired); "
                "start again from offset 0", upload_id=upload_id, committed=0,
            )
        if item.active:
            raise FailedPrecondition(
                f"upload {upload_id} is still running on another call; retry once it has stopped",
                upload_id=upload_id, committed=committed, retry_after=1.0,
            )
        if offset != committed:
            raise FailedPrecondition(
                f"upload {upload_id} has {committed} bytes committed; resume from offset {committed}, "
                f"not {offset}", upload_id=upload_id, committed=committed,
            )
        item.active = True
        item.touched = time.monotonic()
        self._items.move_to_end(upload_id)
        return item.writer

    def park(self, upload_id: str) -> None:
        item = self._items.get(upload_id)
        if item is not None:
            item.active = False
            item.touched = time.monotonic()

    def finish(self, upload_id: str) -> None:
        """The upload is over (stored or failed for good): forget it, dropping its bytes."""
        item = self._items.pop(upload_id, None)
        if item is not None:
            item.writer.discard()

    def _evict_over_count(self) -> None:
        for upload_id in [k for k, v in self._items.items() if not v.active]:
            if len(self._items) <= self.max_count:
                break
            self.finish(upload_id)

    def sweep(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        stale = [k for k, v in self._items.items() if not v.active and now - v.touched > self.max_age]
        for upload_id in stale:
            self.finish(upload_id)
        return len(stale)

    def clear(self) -> None:
        for upload_id in list(self._items):
            item = self._items.pop(upload_id)
            item.writer.discard()



class Pins:
    """How many holders each blob has (a lease, a reader): a held blob is never evicted."""

    def __init__(self) -> None:
        self._counts: Counter[Any] = Counter()

    def pin(self, key: Any) -> None:
        self._counts[key] += 1

    def unpin(self, key: Any) -> None:
        n = self._counts[key] - 1
        if n > 0:
            self._counts[key] = n
        else:
            del self._counts[key]

    def __contains__(self, key: object) -> bool:
        return key in self._counts

    def __len__(self) -> int:
        return len(self._counts)

    def lease(self, keys: Iterable[Any]) -> Lease:
        return Lease(self, list(keys))


class Lease:
    """While held (``with`` or ``async with``), the leased blobs are never evicted."""

    def __init__(self, pins: Pins, keys: list[Any]) -> None:
        self._pins = pins
        self._keys = keys
        self._held = False

    def __enter__(self) -> Lease:
        if not self._held:
            self._held = True
            for key in self._keys:
                self._pins.pin(key)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    async def __aenter__(self) -> Lease:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._held:
            self._held = False
            for key in self._keys:
                self._pins.unpin(key)

class CAS(ABC):
    """A content-addressed store of blobs, keyed by :class:`Digest`. Every method is async."""

    #: Shown by ``node.info``: "disk", "memory", "remote".
    kind = "cas"

    def __init__(
        self,
        *,
        max_blob_size: int = DEFAULT_MAX_BLOB_SIZE,
        max_partial_uploads: int = 64,
        partial_max_age: float = 600.0,
    ) -> None:
        self.max_blob_size = max_blob_size
        self.uploads = PartialUploads(max_count=max_partial_uploads, max_age=partial_max_age)
        #: A tier behind this one (set by the storage part when the node has ``--backing``).
        self.backing: Backing | None = None
        self.counters: Counter[str] = Counter()
        self._writing: dict[Digest, trio.Event] = {}
        self._verifying = trio.Lock()

    # -- what each store provides ----------------------------------------------------------

    @abstractmethod
    async def _missing_local(self, digests: list[Digest]) -> list[Digest]:
        """Which of ``digests`` (non-empty, distinct) this tier lacks; the others count as used.

        Current when it returns: no checkpoint after the answer is made, so a caller that
        finds a blob missing and registers its write before its next checkpoint is the
        only writer (see ``_put_local``)."""

    @abstractmethod
    def _read_local(self, digest: Digest, offset: int) -> AbstractAsyncContextManager[AsyncIterator[bytes]]:
        """Chunks of a stored blob from ``offset``; BlobNotFound on entry when it is absent."""

    @abstractmethod
    def lease(self, digests: Iterable[Digest]) -> Lease:
        """Pin blobs against eviction while held: ``with cas.lease(digests): ...``."""

    @abstractmethod
    def _new_writer(self, digest: Digest) -> Writer:
        """A writer for a blob this tier lacks (may raise ResourceExhausted when full)."""

    @abstractmethod
    async def _verify_local(self, digests: list[Digest] | None, report: VerifyReport) -> None:
        """Re-hash ``digests`` (non-empty, distinct; None: every stored blob), removing the
        damaged ones, into ``report``; a few MiB or files per thread hop at most."""

    @abstractmethod
    def _drop_local(self, digest: Digest) -> bool:
        """Remove this tier's copy of a blob found damaged; whether there was one."""

    async def _get_small_local(self, digest: Digest) -> bytes | None:
        """A small blob in one piece, or None when absent (stores override it to go faster)."""
        try:
            async with self._read_local(digest, 0) as chunks:
                return b"".join([bytes(c) async for c in chunks])
        except BlobNotFound:
            return None

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "partial_uploads": len(self.uploads), **self.counters}
        if self.backing is not None:
            out["backing"] = self.backing.info()
        return out

    # -- checks ----------------------------------------------------------------------------

    def check_size(self, digest: Digest) -> None:
        if digest.size > self.max_blob_size:
            raise TooLarge(
                f"blob {digest} is {digest.size} bytes, over this store's limit of {self.max_blob_size}",
                size=digest.size, limit=self.max_blob_size,
            )

    # -- the API ---------------------------------------------------------------------------

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests not stored (in order, without duplicates); the empty blob is never missing.

        With a backing tier, a blob the backing node holds is not missing (a read
        fetches it); the backing node is asked once for the whole batch.
        """
        wanted = list(dict.fromkeys(d for d in digests if d.size))
        if not wanted:
            return []
        missing = await self._missing_local(wanted)
        self.counters["find_missing_digests"] += len(wanted)
        if missing and self.backing is not None:
            missing = await self.backing.find_missing(missing)
        return missing

    async def contains(self, digest: Digest) -> bool:
        return not await self.find_missing([digest])

    async def put(self, data: bytes | bytearray | memoryview, digest: Digest | None = None) -> Digest:
        """Store ``data``; when ``digest`` is given the bytes must match it (DigestMismatch)."""
        if digest is None:
            digest = await digest_of(data)
        return await self.put_stream(bytes_chunks(data), digest)

    async def put_stream(
        self,
        chunks: AsyncIterable[bytes | memoryview],
        digest: Digest,
        *,
        upload_id: str | None = None,
        offset: int = 0,
    ) -> Digest:
        """Store the bytes ``chunks`` yields under ``digest``, verified as they are written.

        A blob already stored returns at once without reading ``chunks`` (an upload can
        stop early); concurrent puts of one blob write it once. With ``upload_id`` the
        upload is resumable: if it is cut, the bytes written so far are kept (see
        :class:`PartialUploads`) and a later call with the same id and ``offset`` equal
        to the committed size sends only the rest.
        """
        self.check_size(digest)
        if digest.size == 0:
            await _expect_no_bytes(chunks)
            return digest
        written = await self._put_local(chunks, digest, upload_id=upload_id, offset=offset)
        if self.backing is not None:
            # Write-through: the put succeeds once the backing node has the blob too. A blob
            # that was already here may be here because an earlier write-through failed.
            try:
                await self.backing.write_through(self, digest, check_first=not written)
            except (DigestMismatch, BlobNotFound):
                if written:
                    raise
                # Our stored copy, sent on unread by us, did not match its digest (the backing
                # node hashed it; or our small read did and removed it): it is damaged. Drop
                # it, store the caller's bytes, which are still unread, and send those.
                if self._drop_local(digest):
                    log.error("blob %s was damaged here (the backing node refused it): removed, "
                              "stored again from the upload", digest)
                    self.counters["damaged_removed"] += 1
                written = await self._put_local(chunks, digest, upload_id=upload_id, offset=offset)
                await self.backing.write_through(self, digest, check_first=not written)
        return digest

    async def _put_local(
        self,
        chunks: AsyncIterable[bytes | memoryview],
        digest: Digest,
        *,
        upload_id: str | None = None,
        offset: int = 0,
    ) -> bool:
        """Store in this tier only; False when the blob was already here (nothing read)."""
        while True:
            if not await self._missing_local([digest]):
                if upload_id is not None:
                    self.uploads.finish(upload_id)
                self.counters["puts_present"] += 1
                return False
            event = self._writing.get(digest)
            if event is None:
                break
            await event.wait()
        if offset < 0 or offset > digest.size:
            raise FailedPrecondition(f"offset {offset} is outside blob {digest}")
        event = self._writing[digest] = trio.Event()
        try:
            if offset:
                if upload_id is None:
                    raise FailedPrecondition("an upload can start past offset 0 only to resume an upload id")
                writer = self.uploads.resume(upload_id, digest, offset)
            else:
                writer = self._new_writer(digest)
                if upload_id is not None:
                    self.uploads.finish(upload_id)  # a restart from 0 replaces an old partial
                    self.uploads.begin(upload_id, writer)
            try:
                await self._fill(writer, chunks)
                await writer.commit()
            except trio.Cancelled:
                if upload_id is not None:
                    self.uploads.park(upload_id)
                else:
                    writer.discard()
                raise
            except BaseException:
                if upload_id is not None:
                    self.uploads.finish(upload_id)
                writer.discard()
                raise
            if upload_id is not None:
                self.uploads.finish(upload_id)
            self.counters["puts"] += 1
            self.counters["bytes_written"] += digest.size
        finally:
            del self._writing[digest]
            event.set()
        return True

    async def _fill(self, writer: Writer, chunks: AsyncIterable[bytes | memoryview]) -> None:
        """Feed ``chunks`` to ``writer`` in batches; the next batch is gathered while one is written.

        Two tasks joined by a channel of :data:`WRITE_AHEAD` batches: receiving keeps going
        (and keeps the wire's credit flowing) while a worker thread hashes and writes,
        with at most that many batches held in memory.
        """
        digest = writer.digest
        if digest.size - writer.offset <= INLINE_LIMIT:
            # A small blob in one batch, in this task: two tasks and a channel would cost
            # more than its write (a per-blob upload is Bazel's most common call).
            small: list[bytes | memoryview] = []
            total = writer.offset
            async for chunk in chunks:
                total += len(chunk)
                _check_length(total, digest)
                small.append(chunk)
            if total > writer.offset:
                await writer.write(small)
            return
        send, receive = trio.open_memory_channel[list[bytes | memoryview]](WRITE_AHEAD)

        async def gather() -> None:
            async with send:
                batch: list[bytes | memoryview] = []
                batched = 0
                total = writer.offset
                async for chunk in chunks:
                    n = len(chunk)
                    if not n:
                        continue
                    total += n
                    _check_length(total, digest)
                    batch.append(chunk)
                    batched += n
                    if batched >= WRITE_BATCH:
                        await send.send(batch)
                        batch, batched = [], 0
                if batch:
                    await send.send(batch)

        async def write() -> None:
            async with receive:
                async for batch in receive:
                    await writer.write(batch)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                await gather()
        except BaseExceptionGroup as group:
            raise single_error(group) from None

    async def put_file(self, path: Path, digest: Digest | None = None) -> Digest:
        """Store a local file (hashed first, in a thread, when ``digest`` is not given)."""
        path = Path(path)
        if digest is None:
            digest = await hash_file(path)
        self.check_size(digest)
        if not await self.find_missing([digest]):
            return digest
        async with file_chunks(path) as chunks:
            return await self.put_stream(chunks, digest)

    async def get(self, digest: Digest, *, limit: int | None = None) -> bytes:
        """The whole blob (BlobNotFound; TooLarge when it is over ``limit`` bytes)."""
        if limit is not None and digest.size > limit:
            raise TooLarge(f"blob {digest} is {digest.size} bytes, over the limit of {limit} asked for",
                           size=digest.size, limit=limit)
        if digest.size == 0:
            return b""
        if digest.size <= INLINE_LIMIT:
            data = await self._get_small_local(digest)
            if data is not None:
                self.counters["hits"] += 1
                return data
        async with self.open_read(digest) as chunks:
            return await collect(chunks)

    @asynccontextmanager
    async def open_read(self, digest: Digest, offset: int = 0) -> AsyncIterator[AsyncIterator[bytes]]:
        """Chunks of the blob from ``offset``; leaving the block early stops the read."""
        if not 0 <= offset <= digest.size:
            raise FailedPrecondition(f"offset {offset} is outside blob {digest}")
        if digest.size == 0 or offset == digest.size:
            yield _Empty()
            return
        async with AsyncExitStack() as stack:
            try:
                chunks = await stack.enter_async_context(self._read_local(digest, offset))
            except BlobNotFound:
                if self.backing is None:
                    self.counters["misses"] += 1
                    raise
                await self.backing.fetch(self, digest)
                chunks = await stack.enter_async_context(self._read_local(digest, offset))
            else:
                self.counters["hits"] += 1
            yield chunks

    async def write_to(self, digest: Digest, path: Path) -> None:
        """Write the blob to ``path`` (through a temp file beside it, renamed into place)."""
        await write_chunks(self.open_read(digest), Path(path))

    async def batch_read(self, digests: Iterable[Digest]) -> dict[Digest, bytes | None]:
        """Many small blobs at once: each digest to its bytes, or None when missing.

        What this tier lacks is fetched from the backing tier concurrently (at most
        :data:`BATCH_FETCHES` at a time), not one after another.
        """
        out: dict[Digest, bytes | None] = {}
        absent = []
        for digest in dict.fromkeys(digests):
            if digest.size == 0:
                out[digest] = b""
                continue
            data = await self._get_small_local(digest) if digest.size <= INLINE_LIMIT else None
            if data is not None:
                self.counters["hits"] += 1
            elif self.backing is None:
                try:
                    data = await self.get(digest)
                except BlobNotFound:
                    pass
            elif data is None:
                absent.append(digest)
            out[digest] = data
        if absent:
            limiter = trio.CapacityLimiter(BATCH_FETCHES)

            async def one(digest: Digest) -> None:
                async with limiter:
                    try:
                        out[digest] = await self.get(digest)
                    except BlobNotFound:
                        pass

            async with trio.open_nursery() as nursery:
                for digest in absent:
                    nursery.start_soon(one, digest)
        return out

    async def batch_update(self, blobs: Iterable[tuple[Digest, bytes]]) -> dict[Digest, Exception | None]:
        """Many small blobs at once; each digest to None (stored) or the error it got.

        Without a backing tier the blobs this tier lacks are looked up together and
        written together (:meth:`_put_many_local`: a disk store commits them in one
        round); a blob another upload is writing, or any blob with a backing tier, goes
        through :meth:`put` (at most :data:`BATCH_FETCHES` at a time).
        """
        out: dict[Digest, Exception | None] = {}
        fresh: dict[Digest, bytes] = {}
        for digest, data in blobs:
            out[digest] = None  # keeps the caller's order
            try:
                self.check_size(digest)
                if len(data) != digest.size:
                    raise DigestMismatch(f"blob {digest}: {len(data)} bytes were sent, not {digest.size}",
                                         expected=str(digest), received=len(data))
            except TriodeError as exc:
                out[digest] = exc
                continue
            if digest.size:
                fresh[digest] = data
        one_by_one: list[tuple[Digest, bytes]] = []
        if fresh and self.backing is None:
            missing = await self._missing_local(list(fresh))
            self.counters["puts_present"] += len(fresh) - len(missing)
            mine = [(d, fresh[d]) for d in missing if d not in self._writing]
            one_by_one = [(d, fresh[d]) for d in missing if d in self._writing]
            if mine:
                out.update(await self._put_many_writing(mine))
        else:
            one_by_one = list(fresh.items())
        if one_by_one:
            limiter = trio.CapacityLimiter(BATCH_FETCHES)

            async def one(digest: Digest, data: bytes) -> None:
                async with limiter:
                    try:
                        await self.put(data, digest)
                    except TriodeError as exc:
                        out[digest] = exc

            async with trio.open_nursery() as nursery:
                for digest, data in one_by_one:
                    nursery.start_soon(one, digest, data)
        return out

    async def _put_many_writing(self, blobs: list[tuple[Digest, bytes]]) -> dict[Digest, Exception | None]:
        """:meth:`_put_many_local`, with concurrent puts of these blobs waiting for it."""
        events = {digest: trio.Event() for digest, _ in blobs}
        self._writing.update(events)
        try:
            return await self._put_many_local(blobs)
        finally:
            for digest, event in events.items():
                del self._writing[digest]
                event.set()

    async def _put_many_local(self, blobs: list[tuple[Digest, bytes]]) -> dict[Digest, Exception | None]:
        """Store blobs this tier lacks (distinct, non-empty, sized right); each to None or its
        error. Stores override it to write them together; this writes them concurrently."""
        out: dict[Digest, Exception | None] = {}
        limiter = trio.CapacityLimiter(BATCH_FETCHES)

        async def one(digest: Digest, data: bytes) -> None:
            async with limiter:
                try:
                    writer = self._new_writer(digest)
                except TriodeError as exc:
                    out[digest] = exc
                    return
                try:
                    await self._fill(writer, bytes_chunks(data))
                    await writer.commit()
                    self.counters["puts"] += 1
                    self.counters["bytes_written"] += digest.size
                    out[digest] = None
                except TriodeError as exc:
                    out[digest] = exc
                finally:
                    writer.discard()

        async with trio.open_nursery() as nursery:
            for digest, data in blobs:
                nursery.start_soon(one, digest, data)
        return out

    async def verify(self, digests: Iterable[Digest] | None = None) -> VerifyReport:
        """Re-hash stored blobs (these ``digests``, or all of them) and remove every one whose
        bytes no longer match its digest; this tier only. One verification at a time."""
        wanted = None if digests is None else list(dict.fromkeys(d for d in digests if d.size))
        async with self._verifying:
            report = VerifyReport()
            await self._verify_local(wanted, report)
        self.counters["verified"] += report.checked
        return report

    async def aclose(self) -> None:
        """Drop partial uploads (their temp files go with them)."""
        self.uploads.clear()


def _check_length(total: int, digest: Digest) -> None:
    if total > digest.size:
        raise DigestMismatch(f"upload is longer than the {digest.size} bytes of {digest}",
                             expected=str(digest))


async def _expect_no_bytes(chunks: AsyncIterable[bytes | memoryview]) -> None:
    async for chunk in chunks:
        if len(chunk):
            raise DigestMismatch(f"upload is longer than the 0 bytes of {EMPTY}", expected=str(EMPTY))
