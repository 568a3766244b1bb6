"""Named keys pointing at CAS blobs: ``(namespace, key) -> Digest``, bounded, blob-checked.

Some clients key values by something other than their content: ccache's keys hash
the compile, an HTTP or gRPC action cache keys a result by the action's hash. The
value goes into the CAS (verified and stored like any blob) and this store maps the
key to its digest. An entry counts only while its blob is stored: :meth:`get` of an
entry whose blob the CAS has evicted answers None and drops the entry, so a key never
outlives its value for long, and a key never leads to bytes that are not there.

On disk (a node with a data dir) entries are records of an append-only log under
``root`` (:class:`~triode.storage.aclog.EntryLog`, the action cache's log: one
``write`` and one ``fdatasync`` per batch of puts, crash-safe by checksum, shared by
processes on the same directory, compacted to the most recently used entries). A
record's 40-byte key is the SHA-256 of the namespace and key (plus 8 zero bytes);
its value is the digest followed by the namespace and key themselves, which a read
checks, so two names can never be confused. Without a data dir entries live in a
bounded dict. Either way at most ``max_entries`` are kept, least recently used
(written or hit) out first.

Concurrent puts share a write: whoever takes the writer's lock appends every put
queued by then in one thread hop and one ``fdatasync`` (group commit).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import trio

from ..errors import FailedPrecondition, InvalidArgument
from ..model.digest import Digest
from .aclog import EntryLog, Replaced
from .cas import CAS

__all__ = ["KeyValueStore", "MAX_KEY", "MAX_NAMESPACE"]

#: Longest key, in UTF-8 bytes.
MAX_KEY = 1024
#: Longest namespace, in UTF-8 bytes.
MAX_NAMESPACE = 256
#: Bytes of log past which the least recently used entries go (as past ``max_entries``).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_KEY_TAG = b"triode-kv-1\0"
_SIZE_BYTES = 8


def _check(namespace: str, key: str) -> tuple[bytes, bytes]:
    if not isinstance(namespace, str) or not isinstance(key, str):
        raise InvalidArgument("a key-value namespace and key are strings")
    ns, k = namespace.encode("utf-8", "surrogatepass"), key.encode("utf-8", "surrogatepass")
    if not 0 < len(ns) <= MAX_NAMESPACE or b"\0" in ns:
        raise InvalidArgument(
            f"a namespace is 1 to {MAX_NAMESPACE} bytes without NUL, got {namespace[:80]!r}"
        )
    if not 0 < len(k) <= MAX_KEY:
        raise InvalidArgument(f"a key is 1 to {MAX_KEY} bytes, got {len(k)}")
    return ns, k


def _record_key(ns: bytes, k: bytes) -> bytes:
    return hashlib.sha256(_KEY_TAG + ns + b"\0" + k).digest() + bytes(_SIZE_BYTES)


def _encode(ns: bytes, k: bytes, digest: Digest) -> bytes:
    return bytes.fromhex(digest.hash) + digest.size.to_bytes(_SIZE_BYTES, "little") + ns + b"\0" + k


def _decode(ns: bytes, k: bytes, raw: bytes) -> Digest | None:
    """The digest a record holds, or None when it is damaged or names another key."""
    if len(raw) < 32 + _SIZE_BYTES or raw[32 + _SIZE_BYTES :] != ns + b"\0" + k:
        return None
    return Digest(raw[:32].hex(), int.from_bytes(raw[32 : 32 + _SIZE_BYTES], "little"))


class _Queued:
    __slots__ = ("records", "done")

    def __init__(self, records: list[tuple[bytes, bytes]]) -> None:
        self.records = records
        self.done = False


class KeyValueStore:
    """``get``/``put`` of digests by ``(namespace, key)``; an entry lives while its blob does."""

    def __init__(
        self, cas: CAS, root: Path | None = None, *, max_entries: int = 1_000_000,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.cas = cas
        self.root = Path(root) if root is not None else None
        self.max_entries = max_entries
        self._memory: OrderedDict[tuple[bytes, bytes], Digest] = OrderedDict()
        self._log = EntryLog(self.root, max_entries=max_entries, max_bytes=max_bytes) if self.root else None
        self._writing = trio.Lock()  # one append or compaction at a time
        self._queue: list[_Queued] = []
        self.counters: dict[str, int] = {"hits": 0, "misses": 0, "misses_blob_gone": 0, "puts": 0,
                                         "compactions": 0}

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "disk" if self.root else "memory", **self.counters}
        out["entries"] = len(self._memory) if self._log is None else self._log.current.live
        out["max_entries"] = self.max_entries
        return out

    def close(self) -> None:
        """Close the log's files (a store on disk holds a few open)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    # -- the API ---------------------------------------------------------------------------

    async def get(self, namespace: str, key: str) -> Digest | None:
        """The digest stored under ``key``, or None: never stored, or its blob is gone."""
        ns, k = _check(namespace, key)
        digest = await self._load(ns, k)
        if digest is None:
            self.counters["misses"] += 1
            return None
        if await self.cas.find_missing([digest]):
            self.counters["misses_blob_gone"] += 1
            await self._write([(ns, k, None)])  # the blob was evicted: the entry goes too
            return None
        self.counters["hits"] += 1
        return digest

    async def put(self, namespace: str, key: str, digest: Digest) -> None:
        """Point ``key`` at ``digest``, whose blob must be stored already (FailedPrecondition)."""
        ns, k = _check(namespace, key)
        if not isinstance(digest, Digest):
            raise InvalidArgument(f"a key-value entry points at a Digest, got {type(digest).__name__}")
        if await self.cas.find_missing([digest]):
            raise FailedPrecondition(
                f"blob {digest} is not in the CAS; store it before pointing {namespace}/{key[:80]} at it",
                missing=[str(digest)],
            )
        await self._write([(ns, k, digest)])
        self.counters["puts"] += 1

    async def remove(self, namespace: str, key: str) -> None:
        ns, k = _check(namespace, key)
        await self._write([(ns, k, None)])

    # -- storage ---------------------------------------------------------------------------

    async def _load(self, ns: bytes, k: bytes) -> Digest | None:
        await trio.lowlevel.checkpoint()
        log = self._log
        if log is None:
            digest = self._memory.get((ns, k))
            if digest is not None:
                self._memory.move_to_end((ns, k))
            return digest
        rkey = _record_key(ns, k)
        while True:
            try:
                loc = log.locate(rkey)
                break
            except Replaced:
                await self._reload()
        if loc is None:
            return None
        raw = log.read(log.current, rkey, loc)  # a record is ~100 bytes: read on the loop
        return None if raw is None else _decode(ns, k, raw)

    async def _reload(self) -> None:
        """Another process compacted the log: load the new one (once, for every waiter)."""
        log = self._log
        assert log is not None
        stale = log.current
        async with self._writing:
            if log.current is stale:
                log.swap(await trio.to_thread.run_sync(log.reload))

    async def _write(self, entries: list[tuple[bytes, bytes, Digest | None]]) -> None:
        """Store entries (a None digest removes); on disk with whatever else is queued."""
        if self._log is None:
            for ns, k, digest in entries:
                if digest is None:
                    self._memory.pop((ns, k), None)
                else:
                    self._memory[(ns, k)] = digest
                    self._memory.move_to_end((ns, k))
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)
            await trio.lowlevel.checkpoint()
            return
        mine = _Queued([
            (_record_key(ns, k), b"" if digest is None else _encode(ns, k, digest))
            for ns, k, digest in entries
        ])
        self._queue.append(mine)
        async with self._writing:
            if not mine.done:
                batch, self._queue = self._queue, []
                try:
                    await self._append([r for q in batch for r in q.records])
                except BaseException:
                    # Nothing was written (a failed append is cut back): the others queued
                    # with us try again when they get the lock, and each sees its own error.
                    self._queue[:0] = [q for q in batch if q is not mine]
                    raise
                for q in batch:
                    q.done = True

    async def _append(self, records: list[tuple[bytes, bytes]]) -> None:
        """Append in one thread hop (called holding ``_writing``); compact past the limits."""
        log = self._log
        assert log is not None
        if await log.write(records):
            self.counters["compactions"] += 1
