"""Blobs as async iterators of chunks: from bytes, from a file, into a file, hashed.

Shared by the stores, the client and the node: anything that moves a blob in pieces.
Bulk work goes to a worker thread in big pieces; small work stays on the event loop
(see docs/design.md, "Thread hops are expensive").
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import trio

from .model.digest import Digest, Hasher

__all__ = [
    "INLINE_LIMIT",
    "READ_CHUNK",
    "bytes_chunks",
    "collect",
    "digest_of",
    "file_chunks",
    "hash_file",
    "hash_file_sync",
    "write_chunks",
]

#: Bytes read per thread hop when streaming a blob out of a store or a file. A hop
#: costs 20-250 us of CPU (more on virtual machines), so bulk work goes in big pieces.
READ_CHUNK = 4 * 1024 * 1024
#: Below this, hashing or reading inline costs less than a thread hop.
INLINE_LIMIT = 64 * 1024


async def digest_of(data: bytes | bytearray | memoryview) -> Digest:
    """The digest of ``data``, hashed off the event loop when it is large."""
    if len(data) <= INLINE_LIMIT:
        return Digest.of(data)
    return await trio.to_thread.run_sync(Digest.of, data)


def hash_file_sync(path: Path) -> Digest:
    """The digest of a local file, read in large blocks (blocking: call it from a thread)."""
    hasher = Hasher()
    with open(path, "rb") as f:
        while block := f.read(READ_CHUNK):
            hasher.update(block)
    return hasher.digest()


async def hash_file(path: Path) -> Digest:
    """The digest of a local file, hashed in a worker thread."""
    return await trio.to_thread.run_sync(hash_file_sync, Path(path))


class bytes_chunks:  # noqa: N801 - used like a function
    """An async iterator over ``data`` in slices of ``size`` (memoryviews: no copies)."""

    def __init__(self, data: bytes | bytearray | memoryview, size: int = READ_CHUNK) -> None:
        self._view = memoryview(data).cast("B")
        self._size = size
        self._pos = 0

    def __aiter__(self) -> bytes_chunks:
        return self

    async def __anext__(self) -> memoryview:
        if self._pos >= len(self._view):
            raise StopAsyncIteration
        await trio.lowlevel.checkpoint()
        piece = self._view[self._pos : self._pos + self._size]
        self._pos += len(piece)
        return piece


class file_chunks:  # noqa: N801 - used like a function
    """An async iterator over a local file from ``offset``, read in a worker thread.

    Use it as an async context manager (or call :meth:`close`) so the file is closed
    even when the reader stops early.
    """

    def __init__(self, path: Path, offset: int = 0, size: int = READ_CHUNK) -> None:
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._file.seek(offset)
        self._size = size

    async def __aenter__(self) -> file_chunks:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def __aiter__(self) -> file_chunks:
        return self

    async def __anext__(self) -> bytes:
        block = await trio.to_thread.run_sync(self._file.read, self._size)
        if not block:
            self.close()
            raise StopAsyncIteration
        return block


async def collect(chunks: AsyncIterator[bytes | memoryview]) -> bytes:
    """The chunks as one ``bytes``, each copied in as it arrives.

    Copying while the sender is still at work, into a buffer that ``getvalue()`` hands
    over without a copy, leaves no copy of the whole blob for the end, when there is
    nothing left to overlap it with (a quarter of a 256 MiB download here, page faults
    included). The caller bounds the size.
    """
    buffer = io.BytesIO()
    async for chunk in chunks:
        buffer.write(chunk)
    return buffer.getvalue()


async def write_chunks(reader: AbstractAsyncContextManager[AsyncIterator[bytes]], path: Path) -> None:
    """Write what ``reader`` yields to ``path``: a temp file beside it, renamed once complete."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.part")
    f = await trio.to_thread.run_sync(open, tmp, "wb")
    try:
        with f:
            async with reader as chunks:
                async for chunk in chunks:
                    if len(chunk) <= INLINE_LIMIT:
                        f.write(chunk)
                    else:
                        await trio.to_thread.run_sync(f.write, chunk)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
