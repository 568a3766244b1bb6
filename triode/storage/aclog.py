"""The action cache on disk: one append-only log of entries, indexed in memory.

A file per entry cost a new inode per action run, and on ext4 without a journal
(what our machines have) creating inodes after many deletes cost up to a millisecond
of CPU each: the cache write was the dearest part of a trivial action. The log makes
a write one ``write`` and one sync per batch (a ``syncfs``, so that the blobs an entry
names are durable before it is: see triode/storage/disk.py), a hit one ``pread``, and a miss
no system call beyond an ``fstat`` (to notice what other processes appended).

Layout of the directory::

    log    records, appended; replaced whole (renamed over) by compaction
    lock   flock: shared to read what others appended, exclusive to append or compact

A record is ``magic | u32 value length | u32 crc32(key + value) | key | value``, the
key being the action digest (32 bytes of SHA-256 and a u64 size) and the value the
msgpack action result; an empty value is a tombstone (a removed entry). Records name
their key and carry a checksum, so a torn tail or damaged bytes after a crash are
found and skipped (the scanner resynchronises on the next magic), never mistaken for
another action's result. The newest record of a key wins; once the log holds more
than ``max_entries`` records (or ``max_bytes``), compaction rewrites it with the
most recently used live entries, down to 90% of the limits: the least recently
written or hit go first. Use is tracked in memory (the index is kept in order of
use) and the rewritten log is in that order, so a process that opens it later starts
from it; hits since the last compaction are forgotten by a restart.

Several processes may share the directory (a node and ``triode run`` over the same
data dir): appends are exclusive, readers pick up what others appended when a miss
finds the log grown, and a process that finds its log replaced by another's
compaction reloads it.

This class does blocking I/O and keeps no lock of its own: the action cache calls
the read side on the event loop and the write side in one worker thread at a time,
and applies every result to the index on the event loop. Every scan holds the lock
(shared or exclusive) while writers hold it exclusively, so a scan never sees a write
in progress: a record cut short is a crash's torn write, dead for good.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..model.digest import Digest
from .disk import fsync_dir, sync_filesystem

__all__ = ["EntryLog", "Loaded", "Replaced", "entry_key", "MAX_VALUE"]

MAGIC = b"TAC1"
#: magic, value length, crc32 of key + value, key (sha256 bytes + u64 size).
_HEADER = struct.Struct("<4sII40s")
HEADER_SIZE = _HEADER.size
_KEY_AT = 12  # the checksummed bytes (key, then value) start here
#: Largest value a record holds (the action cache's own limit is lower).
MAX_VALUE = 64 * 1024 * 1024
_SCAN_CHUNK = 1024 * 1024
_OLD_SHARD_LEN = 2  # the file-per-entry layout this replaced: ab/HASH_SIZE


def entry_key(digest: Digest) -> bytes:
    return bytes.fromhex(digest.hash) + digest.size.to_bytes(8, "little")


def _record(key: bytes, value: bytes) -> bytes:
    crc = zlib.crc32(value, zlib.crc32(key))
    return _HEADER.pack(MAGIC, len(value), crc, key) + value


@dataclass(eq=False)
class Loaded:
    """A log file as scanned: where each key's newest record is, and the counts."""

    fd: int
    #: key -> offset << 32 | value length, least recently used first (written, or found
    #: by :meth:`EntryLog.locate`); as loaded from the file, that is the file's order.
    index: dict[bytes, int] = field(default_factory=dict)
    scanned: int = 0  # bytes of the file scanned so far
    records: int = 0  # records in the scanned part, superseded ones and tombstones included
    live: int = 0  # keys whose newest record is not a tombstone
    pins: int = 0  # worker threads using ``fd``: it is closed once none is, not under them


def _apply(loaded: Loaded, key: bytes, offset: int, length: int) -> None:
    """Index one record; the one further on in the file wins, whichever is seen first.

    A key that wins moves to the end of the index, which is kept in order of use.
    """
    old = loaded.index.get(key)
    if old is not None:
        if old >> 32 >= offset:
            return
        del loaded.index[key]
    loaded.index[key] = offset << 32 | length
    loaded.live += (length > 0) - (old is not None and old & 0xFFFFFFFF > 0)


class _Reader:
    """Windows of a file read ahead in large chunks, for scanning records in order."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.base = 0

    def window(self, lo: int, hi: int) -> bool:
        """Make bytes ``lo:hi`` of the file available in ``buf`` (False: the file ends first)."""
        if not (self.base <= lo and hi <= self.base + len(self.buf)):
            self.buf, self.base = os.pread(self.fd, max(hi - lo, _SCAN_CHUNK), lo), lo
        return hi <= self.base + len(self.buf)

    def record_at(self, pos: int, end: int) -> tuple[bytes, int] | None:
        """(key, value length) of the whole, intact record at ``pos``, else None."""
        if pos + HEADER_SIZE > end or not self.window(pos, pos + HEADER_SIZE):
            return None
        magic, length, crc, key = _HEADER.unpack_from(self.buf, pos - self.base)
        stop = pos + HEADER_SIZE + length
        if magic != MAGIC or length > MAX_VALUE or stop > end or not self.window(pos, stop):
            return None
        if zlib.crc32(memoryview(self.buf)[pos - self.base + _KEY_AT : stop - self.base]) != crc:
            return None
        return key, length

    def next_record(self, pos: int, end: int) -> int | None:
        """Where the next intact record at or after ``pos`` starts, if there is one."""
        while pos + HEADER_SIZE <= end:
            if not self.window(pos, min(pos + _SCAN_CHUNK, end)):
                return None
            found = self.buf.find(MAGIC, pos - self.base, min(len(self.buf), end - self.base))
            if found < 0:
                # On past what was searched, less a magic's length: one may straddle windows.
                pos = min(self.base + len(self.buf), end) - len(MAGIC) + 1
                continue
            pos = self.base + found
            if self.record_at(pos, end) is not None:
                return pos
            pos += 1
        return None


def _scan(loaded: Loaded, end: int) -> None:
    """Index the records from ``loaded.scanned`` up to ``end`` (called under the lock).

    Damaged bytes, a torn record included, are skipped to the next intact record; with
    none after them they are dead (appends only ever go after them), so the scan always
    ends at ``end``.
    """
    reader = _Reader(loaded.fd)
    pos: int | None = loaded.scanned
    while pos is not None and pos < end:
        found = reader.record_at(pos, end)
        if found is None:
            pos = reader.next_record(pos + 1, end)
            continue
        key, length = found
        _apply(loaded, key, pos, length)
        loaded.records += 1
        pos += HEADER_SIZE + length
    loaded.scanned = max(end, loaded.scanned)


class _Flock:
    def __init__(self, fd: int, how: int) -> None:
        self.fd, self.how = fd, how

    def __enter__(self) -> None:
        fcntl.flock(self.fd, self.how)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


def _most_recent_first(index: dict[bytes, int], order: Sequence[bytes]) -> list[int]:
    """Where the live records are, most recently used first.

    Records ``order`` does not know were appended by others since it was taken, so they
    are the newest of all (newest written first); then ``order`` from its end.
    """
    known = set(order)
    fresh = sorted((loc for key, loc in index.items() if key not in known and loc & 0xFFFFFFFF), reverse=True)
    used = [loc for key in reversed(order) if (loc := index.get(key, 0)) & 0xFFFFFFFF]
    return fresh + used


class Replaced(Exception):
    """Another process compacted the log: reload it (:meth:`EntryLog.reload`) and retry."""


class EntryLog:
    """The files of one log directory; see the module docstring for who calls what."""

    def __init__(self, root: Path, *, max_entries: int, max_bytes: int) -> None:
        self.root = Path(root)
        self.path = self.root / "log"
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        # Two open files of the lock: flock locks belong to an open file, and the event
        # loop's shared lock must not convert the writer thread's exclusive one.
        self._read_lock = os.open(self.root / "lock", flags, 0o644)
        self._write_lock = os.open(self.root / "lock", flags, 0o644)
        try:
            with _Flock(self._write_lock, fcntl.LOCK_EX):
                created = not self.path.exists()
                self.current = self._load()
                if created:
                    fsync_dir(self.root)
                for leftover in self.root.glob("log.*.tmp"):  # a compaction that crashed
                    leftover.unlink()
                self._migrate()
        except BaseException:
            os.close(self._read_lock)
            os.close(self._write_lock)
            raise

    def close(self) -> None:
        os.close(self.current.fd)
        os.close(self._read_lock)
        os.close(self._write_lock)

    # -- the event loop's side -------------------------------------------------------------

    def locate(self, key: bytes) -> int | None:
        """Where ``key``'s value is (for :meth:`read`), None for a miss.

        A miss first scans what other processes appended since the last look. Raises
        :class:`Replaced` when another process compacted the log.
        """
        current = self.current
        loc = current.index.get(key)
        if loc is None:
            st = os.fstat(current.fd)
            if st.st_nlink == 0:
                raise Replaced
            if st.st_size > current.scanned and self._catch_up(st.st_size):
                loc = current.index.get(key)
        if loc is None or not loc & 0xFFFFFFFF:
            return None
        index = current.index
        index[key] = index.pop(key)  # used now: the last to go at compaction
        return loc

    def _catch_up(self, end: int) -> bool:
        """Scan others' appends, unless one holds the lock (a compaction): then later."""
        try:
            fcntl.flock(self._read_lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            _scan(self.current, end)
        finally:
            fcntl.flock(self._read_lock, fcntl.LOCK_UN)
        return True

    def applied(self, loaded: Loaded, start: int, records: list[tuple[bytes, int, int]], end: int) -> None:
        """Index what :meth:`append` wrote (records as key, offset, value length)."""
        for key, offset, length in records:
            _apply(loaded, key, offset, length)
        if start == loaded.scanned:  # nobody else wrote in between: no need to read it back
            loaded.records += len(records)
            loaded.scanned = end

    def pin(self) -> Loaded:
        """The current file, kept open for a worker thread until :meth:`unpin`."""
        self.current.pins += 1
        return self.current

    def unpin(self, loaded: Loaded) -> None:
        loaded.pins -= 1
        if not loaded.pins and loaded is not self.current:
            os.close(loaded.fd)

    def swap(self, loaded: Loaded) -> None:
        """Serve from a freshly loaded file from now on."""
        old, self.current = self.current, loaded
        if not old.pins:
            os.close(old.fd)

    async def write(self, records: list[tuple[bytes, bytes]]) -> bool:
        """Append ``records`` in one thread hop, again over a reloaded log if another process
        replaced it meanwhile, then compact when past the limits. Call it holding the
        caller's write lock; returns whether it compacted."""
        while True:
            loaded = self.pin()
            try:
                written = await trio.to_thread.run_sync(self.append, loaded, records)
                break
            except Replaced:
                self.swap(await trio.to_thread.run_sync(self.reload))
            finally:
                self.unpin(loaded)
        self.applied(loaded, *written)
        if not self.over_limits():
            return False
        self.swap(await trio.to_thread.run_sync(self.compact, self.use_order()))
        return True

    def over_limits(self) -> bool:
        return self.current.records > self.max_entries or self.current.scanned > self.max_bytes

    def use_order(self) -> list[bytes]:
        """The keys this process knows, least recently used first (for :meth:`compact`)."""
        return list(self.current.index)

    # -- either side -----------------------------------------------------------------------

    @staticmethod
    def read(loaded: Loaded, key: bytes, loc: int) -> bytes | None:
        """``key``'s value at ``loc``, checked against its record (None when damaged)."""
        offset, length = loc >> 32, loc & 0xFFFFFFFF
        raw = os.pread(loaded.fd, HEADER_SIZE + length, offset)
        if len(raw) == HEADER_SIZE + length:
            magic, _, crc, found = _HEADER.unpack_from(raw)
            if magic == MAGIC and found == key and zlib.crc32(memoryview(raw)[_KEY_AT:]) == crc:
                return raw[HEADER_SIZE:]
        return None

    # -- a worker thread's side ------------------------------------------------------------

    def append(
        self, loaded: Loaded, entries: list[tuple[bytes, bytes]]
    ) -> tuple[int, list[tuple[bytes, int, int]], int]:
        """Append records (an empty value is a tombstone) to a pinned file; durable on return.

        Returns the start offset, each record's (key, offset, value length) and the end.
        Raises :class:`Replaced` when another process compacted the log first.
        """
        with _Flock(self._write_lock, fcntl.LOCK_EX):
            return self._append_locked(loaded, entries)

    def _append_locked(
        self, loaded: Loaded, entries: list[tuple[bytes, bytes]]
    ) -> tuple[int, list[tuple[bytes, int, int]], int]:
        fd = loaded.fd
        st = os.fstat(fd)
        if st.st_nlink == 0:
            raise Replaced
        start = st.st_size  # O_APPEND, and nobody else appends while we hold the lock
        records, offset = [], start
        for key, value in entries:
            records.append((key, offset, len(value)))
            offset += HEADER_SIZE + len(value)
        view = memoryview(b"".join(_record(key, value) for key, value in entries))
        try:
            while view:
                view = view[os.write(fd, view) :]
            sync_filesystem(fd)  # the blobs written before this entry first (docs/design.md)
        except BaseException:
            os.ftruncate(fd, start)  # no half record left for the next append to follow
            raise
        return start, records, offset

    def reload(self) -> Loaded:
        """The log as it is now, scanned from the start (after another process replaced it)."""
        with _Flock(self._write_lock, fcntl.LOCK_SH):
            return self._load()

    def compact(self, order: Sequence[bytes]) -> Loaded:
        """Rewrite the log with its most recently used live entries, down to 90% of both limits.

        ``order`` is :meth:`use_order`, taken on the event loop.
        """
        with _Flock(self._write_lock, fcntl.LOCK_EX):
            old = self._load()  # what is there now, others' appends included
            try:
                keep_entries = self.max_entries - self.max_entries // 10
                keep_bytes = self.max_bytes - self.max_bytes // 10
                chosen, size = [], 0
                for loc in _most_recent_first(old.index, order)[:keep_entries]:
                    size += HEADER_SIZE + (loc & 0xFFFFFFFF)
                    if size > keep_bytes:
                        break
                    chosen.append(loc)
                tmp = self.root / f"log.{os.getpid()}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                try:
                    with os.fdopen(fd, "wb", closefd=False) as out:
                        for loc in reversed(chosen):  # least recently used first, as indexed
                            out.write(os.pread(old.fd, HEADER_SIZE + (loc & 0xFFFFFFFF), loc >> 32))
                    os.fsync(fd)
                    os.replace(tmp, self.path)
                except BaseException:
                    tmp.unlink(missing_ok=True)
                    raise
                finally:
                    os.close(fd)
            finally:
                os.close(old.fd)
            fsync_dir(self.root)
            return self._load()

    def _load(self) -> Loaded:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            loaded = Loaded(fd)
            _scan(loaded, os.fstat(fd).st_size)
        except BaseException:
            os.close(fd)
            raise
        return loaded

    def _migrate(self) -> None:
        """Move entries of the file-per-entry layout this replaced (``ab/HASH_SIZE``) in.

        Runs under the exclusive lock as the log opens. Each file goes once its record is
        durable, so a crash half way leaves an entry in both places, never in neither.
        """
        for shard in sorted(os.scandir(self.root), key=lambda e: e.name):
            if len(shard.name) != _OLD_SHARD_LEN or not shard.is_dir(follow_symlinks=False):
                continue
            entries, files = [], []
            for entry in os.scandir(shard.path):
                name, _, size = entry.name.partition("_")
                try:
                    key = entry_key(Digest(name, int(size)))
                    with open(entry.path, "rb") as f:
                        value = f.read(MAX_VALUE + 1)
                except (ValueError, OSError):
                    continue  # not an entry: a stray file stays for a person to look at
                if 0 < len(value) <= MAX_VALUE:
                    entries.append((key, value))
                files.append(entry.path)
            if entries:
                self.applied(self.current, *self._append_locked(self.current, entries))
            for path in files:
                os.unlink(path)
            try:
                os.rmdir(shard.path)
            except OSError:
                pass
