"""What a store is, as every layer sees it: the interfaces of the CAS and the action cache.

The disk and memory stores (``triode.storage``) and the client's remote faces
(``triode.client``) satisfy these structurally, without importing them, so the engine,
staging, the backing tier and input pushing are typed against the interface and work
with any of them. Kept in the shared model so that no core part imports another.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .digest import Digest

if TYPE_CHECKING:
    from contextlib import AbstractAsyncContextManager

    from .result import ActionResult

__all__ = ["BlobStore", "LocalBlobStore", "ActionStore", "RemoteStorage"]


class BlobStore(Protocol):
    """A content-addressed store of blobs: local (disk, memory) or a node's, over the wire.

    Every write is verified against its digest before it is stored; every read of a
    whole blob is verified before it is handed over.
    """

    async def find_missing(self, digests: Iterable[Digest]) -> list[Digest]: ...

    async def contains(self, digest: Digest) -> bool: ...

    async def put(self, data: bytes | bytearray | memoryview, digest: Digest | None = None) -> Digest: ...

    async def put_stream(self, chunks: AsyncIterable[bytes | memoryview], digest: Digest) -> Digest: ...

    async def put_file(self, path: Path, digest: Digest | None = None) -> Digest: ...

    async def get(self, digest: Digest, *, limit: int | None = None) -> bytes: ...

    def open_read(
        self, digest: Digest, offset: int = 0
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...

    async def write_to(self, digest: Digest, path: Path) -> None: ...

    async def batch_read(self, digests: Iterable[Digest]) -> dict[Digest, bytes | None]: ...

    async def batch_update(self, blobs: Iterable[tuple[Digest, bytes]]) -> dict[Digest, Exception | None]: ...

    def info(self) -> dict[str, Any]: ...


class LocalBlobStore(BlobStore, Protocol):
    """A store on this node, which the engine stages inputs from and leases while it runs."""

    def lease(self, digests: Iterable[Digest]) -> AbstractContextManager[Any]: ...

    def path_of(self, digest: Digest) -> Path | None:
        """The file holding the blob, to hard-link (None: not a disk store, or not here)."""
        ...

    def drop_damaged(self, digest: Digest, inode: int) -> bool:
        """Forget a stored blob whose file (this inode) an action changed in place."""
        ...


class ActionStore(Protocol):
    """An action cache: action digest to the result of running it."""

    async def get(self, action_digest: Digest) -> ActionResult | None: ...

    async def update(self, action_digest: Digest, result: ActionResult) -> None: ...


class RemoteStorage(Protocol):
    """Another node's storage over a live connection: what the backing tier holds on to."""

    @property
    def cas(self) -> BlobStore: ...

    @property
    def ac(self) -> ActionStore: ...

    @property
    def closed(self) -> bool: ...

    @property
    def close_reason(self) -> Exception | None: ...

    async def wait_closed(self) -> None: ...
