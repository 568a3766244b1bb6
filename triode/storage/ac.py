"""The action cache: action digest to action result, a hit only while its blobs exist.

It takes and returns :class:`~triode.model.result.ActionResult` values. Entries are
stored as msgpack of their wire map (``ActionResult.to_wire``, docs/protocol.md, "Methods:
ac"), and checked by ``ActionResult.from_wire`` when read back. A result handed in is
typed already, so its shape is not checked again: one from the wire was checked when it
was decoded, one the executor built is right as built. On disk entries are records of
one append-only log beside the CAS (:mod:`.aclog`, which says why); without a data dir
they live in a bounded dict.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from ..chunks import INLINE_LIMIT
from ..errors import FailedPrecondition, InvalidArgument, TriodeError
from ..model.digest import Digest
from ..model.result import ActionResult
from .aclog import EntryLog, Replaced, entry_key
from .cas import CAS

if TYPE_CHECKING:
    from .tier import Backing

__all__ = ["ActionCache", "MAX_ENTRY_SIZE"]

#: The largest action result stored, encoded.
MAX_ENTRY_SIZE = 4 * 1024 * 1024
#: Bytes of log on disk past which the least recently used entries go (as past ``max_entries``).
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024


def _pack(result: ActionResult) -> bytes:
    raw: bytes = msgpack.packb(result.to_wire(), use_bin_type=True)
    if len(raw) > MAX_ENTRY_SIZE:
        raise InvalidArgument(f"action result is {len(raw)} bytes encoded, over {MAX_ENTRY_SIZE}")
    return raw


def _blobs_missing(missing: list[Digest]) -> FailedPrecondition:
    return FailedPrecondition(
        f"action result refers to {len(missing)} blob(s) not in the CAS (upload them first): "
        + ", ".join(map(str, missing[:5])),
        missing=[str(d) for d in missing],
    )


class ActionCache:
    """``get``/``update`` of action results keyed by action digest, checked against ``cas``.

    With ``root`` entries are records of a log under ``root`` (durable once ``update``
    returns, shared with other processes on the same directory); without it they stay
    in memory. Either way at most ``max_entries`` are kept and the least recently used
    (written or hit) go first: in memory one by one; on disk once the log passes
    ``max_entries`` records or ``max_bytes``, until a tenth of the room is free again
    (one compaction).
    """

    def __init__(
        self, cas: CAS, root: Path | None = None, *, max_entries: int = 100_000,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.cas = cas
        self.root = Path(root) if root is not None else None
        self.max_entries = max_entries
        self._memory: OrderedDict[Digest, bytes] = OrderedDict()
        self._log = EntryLog(self.root, max_entries=max_entries, max_bytes=max_bytes) if self.root else None
        self._writing = trio.Lock()  # one append or compaction at a time
        #: A tier behind this one (set by the storage part when the node has ``--backing``).
        self.backing: Backing | None = None
        self.counters: Counter[str] = Counter()

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "disk" if self.root else "memory", **self.counters}
        out["entries"] = len(self._memory) if self._log is None else self._log.current.live
        out["max_entries"] = self.max_entries
        if self._log is not None:
            out["log_bytes"] = self._log.current.scanned
        return out

    def close(self) -> None:
        """Close the log's files (a cache on disk holds a few open)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    async def _load(self, key: Digest) -> ActionResult | None:
        if self._log is None:
            raw = self._memory.get(key)
            if raw is not None:
                self._memory.move_to_end(key)
            await trio.lowlevel.checkpoint()
        else:
            raw = await self._read(key)
        if raw is None:
            return None
        try:
            return ActionResult.from_wire(msgpack.unpackb(raw, raw=False))
        except (ValueError, InvalidArgument, msgpack.ExtraData, msgpack.FormatError):
            return None  # a damaged entry is a miss, and the next update replaces it

    async def _read(self, key: Digest) -> bytes | None:
        """An entry's bytes from the log. A usual one (a few hundred bytes) is read on the
        event loop: a thread hop costs more CPU than the ``pread``."""
        log = self._log
        assert log is not None
        k = entry_key(key)
        await trio.lowlevel.checkpoint()
        while True:
            try:
                loc = log.locate(k)
                break
            except Replaced:
                await self._reload()
        if loc is None or loc & 0xFFFFFFFF <= INLINE_LIMIT:
            return None if loc is None else log.read(log.current, k, loc)
        loaded = log.pin()
        try:
            return await trio.to_thread.run_sync(log.read, loaded, k, loc)
        finally:
            log.unpin(loaded)

    async def _reload(self) -> None:
        """Another process compacted the log: load the new one (once, for every waiter)."""
        log = self._log
        assert log is not None
        stale = log.current
        async with self._writing:
            if log.current is stale:
                log.swap(await trio.to_thread.run_sync(log.reload))

    async def _store(self, key: Digest, result: ActionResult) -> None:
        await self._write([(key, _pack(result))])

    async def _write(self, entries: Sequence[tuple[Digest, bytes]]) -> None:
        """Store encoded entries (an empty one removes); on disk, all in one thread hop."""
        if self._log is None:
            for key, raw in entries:
                if raw:
                    self._memory[key] = raw
                    self._memory.move_to_end(key)
                else:
                    self._memory.pop(key, None)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)
            await trio.lowlevel.checkpoint()
            return
        if not entries:
            await trio.lowlevel.checkpoint()
            return
        log = self._log
        records = [(entry_key(key), raw) for key, raw in entries]
        async with self._writing:
            if await log.write(records):
                self.counters["compactions"] += 1

    async def get(self, action_digest: Digest) -> ActionResult | None:
        """The result stored for ``action_digest``, or None (also when one of its blobs is gone)."""
        result = await self._load(action_digest)
        if result is None and self.backing is not None:
            result = await self.backing.ac_get(action_digest)  # checked as it was decoded
            if result is not None:
                await self._store(action_digest, result)
        if result is None:
            self.counters["misses"] += 1
            return None
        if await self.cas.find_missing(result.blobs()):
            self.counters["misses_blobs_gone"] += 1
            return None
        self.counters["hits"] += 1
        return result

    async def update(self, action_digest: Digest, result: ActionResult) -> None:
        """Store ``result``; every blob it references must already be in the CAS."""
        (error,) = await self.update_many([(action_digest, result)])
        if error is not None:
            raise error

    async def update_many(
        self, entries: Sequence[tuple[Digest, ActionResult]]
    ) -> list[TriodeError | None]:
        """:meth:`update` for many entries at once: one lookup of their blobs, one thread hop.

        A node's engine writes its results this way, in batches behind their answers: on
        a virtual machine the thread hop costs more than the write it carries. Returns,
        per entry, None when it was stored or the error that kept it out (too large, a
        blob missing; the others are stored all the same); a failing disk raises for the
        whole batch. The results' shape is not checked (see the module's doc); their
        blobs are.
        """
        errors: list[TriodeError | None] = [None] * len(entries)
        checked: list[tuple[int, Digest, ActionResult, bytes, list[Digest]]] = []
        for i, (key, result) in enumerate(entries):
            try:
                checked.append((i, key, result, _pack(result), result.blobs()))
            except InvalidArgument as exc:
                errors[i] = exc
        needed = list({blob for *_, blobs in checked for blob in blobs})
        gone = set(await self.cas.find_missing(needed)) if needed else set()
        ready = []
        for i, key, result, raw, blobs in checked:
            missing = [blob for blob in blobs if blob in gone]
            if missing:
                errors[i] = _blobs_missing(missing)
            else:
                ready.append((i, key, result, raw))
        await self._write([(key, raw) for _, key, _, raw in ready])
        self.counters["updates"] += len(ready)
        if self.backing is not None:
            for i, key, result, _ in ready:
                try:
                    await self.backing.ac_update(key, result)
                except TriodeError as exc:
                    errors[i] = exc
        return errors

    async def remove(self, action_digest: Digest) -> None:
        await self._write([(action_digest, b"")])
