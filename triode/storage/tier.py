"""The backing tier: another node holding the authoritative copy behind this node's store.

Writes go through (a put succeeds once the backing node has the blob), reads come
through (a local miss is fetched from the backing node and kept), and ``find_missing``
asks the backing node once per batch. Concurrent readers of one missing blob share a
single fetch; it runs in the storage part's nursery, not in any reader's task, so a
reader that is cancelled or leaves early does not take the others' data with it. The
fetch is cancelled only when nobody waits for it any more. A failed fetch is reported
to every waiter and forgotten, so the next reader tries again.

The connection is kept by :meth:`Backing.run`, which reconnects by itself; while it is
down, whatever needs the backing node fails at once with :class:`Unavailable` naming
it, and what the local tier holds keeps being served.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio

from ..chunks import bytes_chunks
from ..errors import BlobNotFound, ConnectionClosed, TriodeError, Unavailable
from ..model.digest import Digest
from ..model.result import ActionResult
from ..model.store import RemoteStorage

__all__ = ["Backing"]

log = logging.getLogger("triode.storage.tier")

#: Blobs up to this size are fetched with (coalesced) batch reads rather than streams.
SMALL_FETCH = 64 * 1024


class _Fetch:
    __slots__ = ("done", "error", "waiters", "scope")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: TriodeError | None = None
        self.waiters = 0
        self.scope = trio.CancelScope()


class LocalTier(Protocol):
    """What the tier reads from and fills: the store in front of it, its own bytes only."""

    async def get(self, digest: Digest, *, limit: int | None = None) -> bytes: ...

    def _read_local(
        self, digest: Digest, offset: int
    ) -> AbstractAsyncContextManager[AsyncIterator[bytes]]: ...

    async def _put_local(self, chunks: AsyncIterable[bytes | memoryview], digest: Digest) -> bool: ...


class Backing:
    """The link to a backing node and the tiered operations over it."""

    def __init__(
        self,
        address: str,
        connect: Callable[[], AbstractAsyncContextManager[RemoteStorage]],
        nursery: trio.Nursery,
        *,
        max_backoff: float = 2.0,
    ) -> None:
        self.address = address
        self._connect = connect
        self._nursery = nursery
        self._max_backoff = max_backoff
        self._remote: RemoteStorage | None = None
        self._error = "not connected yet"
        self._connected = trio.Event()
        self._fetches: dict[Digest, _Fetch] = {}
        self.counters: Counter[str] = Counter()

    # -- the link --------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep a connection to the backing node, reconnecting with backoff when it drops."""
        backoff = 0.05
        while True:
            try:
                async with self._connect() as remote:
                    self._remote = remote
                    self._connected.set()
                    self.counters["connects"] += 1
                    backoff = 0.05
                    log.info("connected to backing node %s", self.address)
                    await remote.wait_closed()
                    reason = remote.close_reason
                    self._error = f"lost the connection: {reason}" if reason else "connection closed"
            except (TriodeError, OSError) as exc:
                self._error = str(exc) or type(exc).__name__
            except Exception as exc:  # whatever else ends a connection must not end the node
                log.warning("connection to backing node %s failed", self.address, exc_info=True)
                self._error = repr(exc)
            finally:
                self._remote = None
                self._connected = trio.Event()
            log.info("backing node %s unavailable: %s", self.address, self._error)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self._max_backoff)

    async def wait_connected(self) -> None:
        await self._connected.wait()

    @property
    def connected(self) -> bool:
        return self._remote is not None

    def remote(self) -> RemoteStorage:
        """The live link, or Unavailable at once (no waiting for a node that is down)."""
        remote = self._remote
        if remote is None or remote.closed:
            self.counters["unavailable"] += 1
            raise Unavailable(
                f"backing node {self.address} is unavailable ({self._error}); "
                "what this node holds locally is still served",
                node=self.address,
            )
        return remote

    def _lost(self, exc: ConnectionClosed) -> Unavailable:
        self.counters["unavailable"] += 1
        return Unavailable(f"backing node {self.address} is unavailable: {exc}", node=self.address)

    def info(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "connected": self.connected,
            "error": None if self.connected else self._error,
            "fetches_in_flight": len(self._fetches),
            **self.counters,
        }

    # -- CAS -------------------------------------------------------------------------------

    async def find_missing(self, digests: list[Digest]) -> list[Digest]:
        """Which of ``digests`` the backing node lacks (one call per batch)."""
        remote = self.remote()
        self.counters["find_missing_calls"] += 1
        try:
            return await remote.cas.find_missing(digests)
        except ConnectionClosed as exc:
            raise self._lost(exc) from None

    async def write_through(self, store: LocalTier, digest: Digest, *, check_first: bool) -> None:
        """Make sure the backing node has ``digest`` (which ``store`` holds)."""
        remote = self.remote()
        try:
            if check_first and not await remote.cas.find_missing([digest]):
                return
            if digest.size <= SMALL_FETCH:
                await remote.cas.put(await store.get(digest), digest)
            else:
                async with store._read_local(digest, 0) as chunks:
                    await remote.cas.put_stream(chunks, digest)
        except ConnectionClosed as exc:
            raise self._lost(exc) from None
        self.counters["written_through"] += 1

    async def fetch(self, store: LocalTier, digest: Digest) -> None:
        """Bring ``digest`` into ``store`` from the backing node, sharing one fetch per blob.

        Raises BlobNotFound when the backing node lacks it too, Unavailable when it is down.
        """
        fetch = self._fetches.get(digest)
        if fetch is None:
            self.remote()  # fail fast, before starting anything
            fetch = self._fetches[digest] = _Fetch()
            self._nursery.start_soon(self._run_fetch, store, digest, fetch)
        else:
            self.counters["fetches_shared"] += 1
        fetch.waiters += 1
        try:
            await fetch.done.wait()
        finally:
            fetch.waiters -= 1
            if fetch.waiters == 0 and not fetch.done.is_set():
                fetch.scope.cancel()  # nobody wants it any more; a later reader starts afresh
                if self._fetches.get(digest) is fetch:
                    del self._fetches[digest]
        if fetch.error is not None:
            raise fetch.error.copy()

    async def _run_fetch(self, store: LocalTier, digest: Digest, fetch: _Fetch) -> None:
        try:
            with fetch.scope:
                remote = self.remote()
                self.counters["fetches"] += 1
                if digest.size <= SMALL_FETCH:
                    data = await remote.cas.get(digest)
                    await store._put_local(bytes_chunks(data), digest)
                else:
                    async with remote.cas.open_read(digest) as chunks:
                        await store._put_local(chunks, digest)
                self.counters["fetched_bytes"] += digest.size
        except BlobNotFound:
            fetch.error = BlobNotFound(
                f"blob {digest} is stored neither here nor on backing node {self.address}",
                digest=str(digest),
            )
        except ConnectionClosed as exc:
            fetch.error = self._lost(exc)
        except TriodeError as exc:
            self.counters["fetch_failures"] += 1
            fetch.error = exc
        except Exception as exc:  # a bug must reach the waiters, not kill the node
            log.exception("fetching %s from %s failed", digest, self.address)
            fetch.error = Unavailable(f"fetching {digest} from backing node {self.address} failed: {exc!r}",
                                      node=self.address)
        finally:
            if fetch.error is None and fetch.scope.cancelled_caught:
                fetch.error = Unavailable(f"fetch of {digest} was abandoned", node=self.address)
            if self._fetches.get(digest) is fetch:
                del self._fetches[digest]
            fetch.done.set()

    # -- action cache ----------------------------------------------------------------------

    async def ac_get(self, action_digest: Digest) -> ActionResult | None:
        remote = self.remote()
        try:
            return await remote.ac.get(action_digest)
        except ConnectionClosed as exc:
            raise self._lost(exc) from None

    async def ac_update(self, action_digest: Digest, result: ActionResult) -> None:
        remote = self.remote()
        try:
            await remote.ac.update(action_digest, result)
        except ConnectionClosed as exc:
            raise self._lost(exc) from None

