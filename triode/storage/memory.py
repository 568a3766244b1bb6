"""A CAS in memory, bounded in bytes, least recently used out first: for tests and embedding."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from ..chunks import INLINE_LIMIT, READ_CHUNK
from ..errors import BlobNotFound, ResourceExhausted, TooLarge
from ..model.digest import Digest, Hasher
from .cas import CAS, VERIFY_BATCH, Lease, Pins, VerifyReport, Writer

__all__ = ["MemoryCAS"]


class MemoryCAS(CAS):
    """Blobs in a dict, at most ``limit`` bytes of them (plus uploads in progress).

    Storing past the limit drops the least recently used blobs that nobody is
    reading or has leased. A blob larger than the whole limit is TooLarge.
    """

    kind = "memory"

    def __init__(self, limit: int = 256 * 1024 * 1024, **options: Any) -> None:
        super().__init__(**options)
        if limit <= 0:
            raise ValueError("MemoryCAS limit must be positive")
        self.limit = limit
        self.max_blob_size = min(self.max_blob_size, limit)
        self._blobs: OrderedDict[Digest, bytes] = OrderedDict()
        self._bytes = 0
        self._reserved = 0
        self._pins = Pins()  # by digest

    @property
    def size(self) -> int:
        """Bytes stored."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._blobs)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "blobs": len(self._blobs), "bytes": self._bytes, "limit": self.limit}

    async def _missing_local(self, digests: list[Digest]) -> list[Digest]:
        blobs = self._blobs
        missing = []
        for d in digests:
            if d in blobs:
                blobs.move_to_end(d)
            else:
                missing.append(d)
        return missing

    async def _get_small_local(self, digest: Digest) -> bytes | None:
        data = self._blobs.get(digest)
        if data is not None:
            self._blobs.move_to_end(digest)
            await trio.lowlevel.checkpoint()
        return data

    @asynccontextmanager
    async def _read_local(self, digest: Digest, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        data = self._blobs.get(digest)
        if data is None:
            raise BlobNotFound(f"blob {digest} is not stored", digest=str(digest))
        self._blobs.move_to_end(digest)
        self._pins.pin(digest)
        try:
            yield _Slices(data, offset)
        finally:
            self._pins.unpin(digest)

    def path_of(self, digest: Digest) -> Path | None:
        """Always None: blobs in memory have no file (callers fall back to :meth:`write_to`)."""
        return None

    def drop_damaged(self, digest: Digest, inode: int) -> bool:
        """Always False: a blob in memory is never linked, so no action can alter it."""
        return False

    def lease(self, digests: Iterable[Digest]) -> Lease:
        """Pin blobs against eviction while held (``with`` or ``async with``), as DiskCAS does."""
        return self._pins.lease(digests)

    def _drop_local(self, digest: Digest) -> bool:
        data = self._blobs.pop(digest, None)
        if data is None:
            return False
        self._bytes -= len(data)
        return True

    async def _verify_local(self, digests: list[Digest] | None, report: VerifyReport) -> None:
        wanted = list(self._blobs) if digests is None else digests
        for digest in wanted:
            data = self._blobs.get(digest)
            if data is None:
                if digests is not None:
                    report.missing.append(digest)
                continue
            hasher = Hasher()
            view = memoryview(data)
            for i in range(0, len(view), VERIFY_BATCH):  # bounded work per hop
                piece = view[i : i + VERIFY_BATCH]
                if len(piece) <= INLINE_LIMIT:
                    hasher.update(piece)
                    await trio.lowlevel.checkpoint()
                else:
                    await trio.to_thread.run_sync(hasher.update, piece)
            report.checked += 1
            report.bytes += len(data)
            if hasher.digest() != digest and self._blobs.get(digest) is data:
                self._drop_local(digest)
                self.counters["damaged_removed"] += 1
                report.damaged.append(digest)

    def _new_writer(self, digest: Digest) -> Writer:
        self._reserve(digest.size)
        return _MemoryWriter(self, digest)

    def _reserve(self, size: int) -> None:
        if size > self.limit:
            raise TooLarge(f"a blob of {size} bytes does not fit a memory store of {self.limit}",
                           size=size, limit=self.limit)
        self._evict(self.limit - size - self._reserved)
        if self._bytes + self._reserved + size > self.limit:
            raise ResourceExhausted(
                f"memory store is full ({self._bytes} stored, {self._reserved} being written, "
                f"limit {self.limit}) and what is left is in use", retry_after=1.0,
            )
        self._reserved += size

    def _evict(self, target: int) -> None:
        """Drop least recently used blobs not in use until at most ``target`` bytes remain."""
        if self._bytes <= target:
            return
        for digest in list(self._blobs):
            if self._bytes <= target:
                break
            if digest in self._pins:
                continue
            self._bytes -= len(self._blobs.pop(digest))
            self.counters["evictions"] += 1

    def _add(self, digest: Digest, data: bytes) -> None:
        self._reserved -= digest.size
        if digest not in self._blobs:
            self._blobs[digest] = data
            self._bytes += len(data)


class _Slices:
    def __init__(self, data: bytes, offset: int) -> None:
        self._view = memoryview(data)
        self._pos = offset

    def __aiter__(self) -> _Slices:
        return self

    async def __anext__(self) -> bytes:
        if self._pos >= len(self._view):
            raise StopAsyncIteration
        await trio.lowlevel.checkpoint()
        piece = self._view[self._pos : self._pos + READ_CHUNK]
        self._pos += len(piece)
        return bytes(piece)


class _MemoryWriter(Writer):
    def __init__(self, store: MemoryCAS, digest: Digest) -> None:
        super().__init__(digest)
        self._store_ = store
        self._buf = bytearray()

    async def write(self, chunks: list[bytes | memoryview]) -> None:
        size = sum(map(len, chunks))
        if size <= INLINE_LIMIT:
            self._write_sync(chunks)
        else:
            await trio.to_thread.run_sync(self._write_sync, chunks)

    def _write_sync(self, chunks: list[bytes | memoryview]) -> None:
        for chunk in chunks:
            self.hasher.update(chunk)
            self._buf += chunk

    async def _store(self) -> None:
        await trio.lowlevel.checkpoint()
        self._store_._add(self.digest, bytes(self._buf))  # no await after: stored means done
        self._buf = bytearray()

    def _drop(self) -> None:
        self._store_._reserved -= self.digest.size
        self._buf = bytearray()
