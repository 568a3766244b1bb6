"""The disk CAS: one read-only file per blob under ``cas/ab/HASH``, raw bytes.

Raw at rest so the engine can hard-link inputs into work directories. A blob is
written to a temp file in ``tmp/`` (same filesystem), hashed and counted as it is
written, made read-only and renamed into place: a node that crashes or is killed
leaves either the whole blob under its name or nothing (plus a temp file, swept when
a store opens the directory again).

A blob is not fsynced before it is acknowledged (see "What a power cut can lose" in
docs/design.md): a per-blob fsync cost two journal commits, more than ten times the
rest of a small write, and a cache can afford to lose its last writes to a power cut
as long as it never serves a wrong byte and never keeps a result whose blobs it lost.
So: the action cache makes an entry durable with :func:`sync_filesystem` (``syncfs``
of the data dir's filesystem), which first makes every blob written before it durable;
a blob cut short by the crash has the wrong size (ext4 and XFS record a file's size
only as its data reaches the disk), and a blob of the wrong size is absent to every
lookup and read here, so it is uploaded again; and a clean close syncs the store.

The 256 ``cas/ab`` directories are made when the store opens, so a write never makes a
directory: with two levels (``cas/ab/cd``, 65,536 directories, the first layout) most
blobs of a young store paid a mkdir and a directory fsync. A store in that layout is
moved to this one when it opens (a rename per blob, once). bazel-remote and BuildGrid
lay their disk stores out the same way; ext4's hashed directories keep lookups fast with
hundreds of thousands of entries in each.

The store keeps its own record of use (an LRU index of hash to size, in memory,
saved on close and rebuilt by a stat-level :meth:`DiskCAS.scan`) for eviction; the
filesystem stays the truth about what exists, so serving needs no index at all.

``cas/`` and ``tmp/`` are private to the node's user (0700): hard-linked inputs of a root
node's isolated actions belong to ``nobody`` (triode/engine/sandbox.py), and nobody's
processes must not reach them. A blob file whose bytes no longer match its name (damaged
on disk, found by :meth:`DiskCAS.verify` or by a whole read of a small blob, which is
hashed anyway) is removed, never served.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import trio

from ..chunks import INLINE_LIMIT, READ_CHUNK
from ..concurrency import single_error
from ..errors import BlobNotFound, DigestMismatch, ResourceExhausted, TooLarge, TriodeError
from ..model.digest import EMPTY, Digest, Hasher
from .cas import CAS, VERIFY_BATCH, VERIFY_FILES, Lease, Pins, VerifyReport, Writer

__all__ = [
    "DiskCAS", "Lease", "sweep_temp", "atomic_write", "atomic_write_many", "fsync_dir", "sync_filesystem",
]

#: A temp file whose writer is gone for this long is swept even if its pid was reused.
TEMP_MAX_AGE = 24 * 3600.0
_INDEX_FILE = "lru.msgpack"
#: Blobs removed as damaged that a later "not stored" error still names as such.
_DROPPED_REMEMBERED = 1024

log = logging.getLogger("triode.storage")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp(tmp_dir: Path) -> int:
    """Remove temp files left by writers that are gone (a crashed process). Returns the count."""
    removed = 0
    now = time.time()
    try:
        entries = list(os.scandir(tmp_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        pid_text = entry.name.split(".", 1)[0]
        try:
            stale = not pid_text.isdigit() or not _pid_alive(int(pid_text))
            stale = stale or now - entry.stat(follow_symlinks=False).st_mtime > TEMP_MAX_AGE
            if stale:
                os.unlink(entry.path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed


def _libc_function(name: str, *argtypes: Any) -> Any:
    """A libc function by name (Linux only), or None where there is none."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    return fn


_sync_file_range = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2
_syncfs = _libc_function("syncfs", ctypes.c_int)


def sync_filesystem(fd: int) -> None:
    """Make everything written to ``fd``'s filesystem durable, this file's data among it:
    the barrier that keeps action-cache entries from outliving their blobs."""
    if _syncfs is None:
        os.sync()
        return
    if _syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs: {os.strerror(err)}")


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes out now (without waiting), so that a
    large upload leaves little dirty data for the next sync. Best effort: Linux only."""
    if _sync_file_range is not None and length >= 1024 * 1024:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _ensure_dir(path: Path) -> None:
    """Make ``path`` (and parents), fsyncing each new one's parent so the entry survives a crash."""
    if path.is_dir():
        return
    _ensure_dir(path.parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    fsync_dir(path.parent)


def _flatten_shard(shard: Path) -> int:
    """Move blobs of the two-level layout (``cas/ab/cd/HASH``) up into ``shard``; how many."""
    moved = 0
    for mid in os.scandir(shard):
        if not (len(mid.name) == 2 and mid.is_dir(follow_symlinks=False)):
            continue
        for entry in os.scandir(mid.path):
            if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                os.replace(entry.path, shard / entry.name)
                moved += 1
        try:
            os.rmdir(mid.path)
        except OSError:  # something else is in there: left for a person to look at
            log.warning("%s is not empty after moving its blobs up; left in place", mid.path)
    if moved:
        fsync_dir(shard)
    return moved


def _os_error(exc: OSError, what: str) -> Exception:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ResourceExhausted(f"{what}: the disk is full", retry_after=5.0)
    return exc


def atomic_write(tmp_dir: Path, final: Path, data: bytes, *, mode: int = 0o444) -> None:
    """Write ``data`` to ``final`` all-or-nothing: temp file, fsync, rename, fsync the dir."""
    atomic_write_many(tmp_dir, [(final, data)], mode)


def atomic_write_many(tmp_dir: Path, files: Sequence[tuple[Path, bytes]], mode: int = 0o444) -> None:
    """:func:`atomic_write` for several files, each directory fsynced once after the renames
    (also when a later file fails: the ones already in place are made durable all the same)."""
    parents: dict[Path, None] = {}
    try:
        for final, data in files:
            tmp = tmp_dir / f"{os.getpid()}.{final.name[:16]}.{os.urandom(6).hex()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
                _ensure_dir(final.parent)
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            parents[final.parent] = None
    finally:
        for parent in parents:
            fsync_dir(parent)


class DiskCAS(CAS):
    """Blobs as files under ``root/cas``; ``limit`` bytes at most when given (see eviction)."""

    kind = "disk"

    def __init__(
        self,
        root: Path,
        *,
        limit: int | None = None,
        high_watermark: float = 0.90,
        low_watermark: float = 0.75,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not 0 < low_watermark <= high_watermark <= 1:
            raise ValueError("watermarks need 0 < low <= high <= 1")
        self.root = Path(root)
        self.blob_dir = self.root / "cas"
        self.tmp_dir = self.root / "tmp"
        self._blob_root = str(self.blob_dir)
        _ensure_dir(self.blob_dir)
        _ensure_dir(self.tmp_dir)
        for private in (self.blob_dir, self.tmp_dir):  # see the module docstring
            os.chmod(private, 0o700)
        self._make_shards()
        self.limit = limit
        if limit is not None:
            self.max_blob_size = min(self.max_blob_size, limit)
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        #: Temp files of crashed writers removed when the store opened.
        self.swept = sweep_temp(self.tmp_dir)
        self._index: OrderedDict[str, int] = OrderedDict()  # hash -> size, least recently used first
        self._bytes = 0
        self._reserved = 0
        self._pins = Pins()  # by hash
        self._evicting: set[str] = set()
        #: Hashes of blobs removed as damaged, most recent last (for clearer errors).
        self._dropped: OrderedDict[str, None] = OrderedDict()
        self._space = trio.Event()  # set when writers should wake the janitor
        #: Whether the index covers every blob on disk (after :meth:`scan`).
        self.scanned = False
        self.scan_seconds: float | None = None
        empty = self._path(EMPTY.hash)
        if not empty.exists():
            atomic_write(self.tmp_dir, empty, b"")

    # -- layout ----------------------------------------------------------------------------

    def _path(self, h: str) -> Path:
        return self.blob_dir / h[:2] / h

    def _str_path(self, h: str) -> str:
        return f"{self._blob_root}/{h[:2]}/{h}"  # pathlib costs more than the stat

    def blob_file(self, h: str) -> str:
        """Where the blob of hash ``h`` is (or would be) stored; for a stat, not for writing."""
        return self._str_path(h)

    def _make_shards(self) -> None:
        """Make the 256 ``cas/ab`` directories (and move an older two-level store into them)."""
        made = False
        for i in range(256):
            shard = self.blob_dir / f"{i:02x}"
            if not shard.is_dir():
                os.mkdir(shard)
                made = True
            moved = _flatten_shard(shard)
            if moved:
                log.info("store %s: moved %d blobs of %s to the one-level layout", self.root, moved, shard)
        if made:
            fsync_dir(self.blob_dir)

    @property
    def size(self) -> int:
        """Bytes of blobs the index knows of (all of them once scanned)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._index)

    def info(self) -> dict[str, Any]:
        return {
            **super().info(),
            "root": str(self.root),
            "blobs": len(self._index),
            "bytes": self._bytes,
            "writing_bytes": self._reserved,
            "limit": self.limit,
            "scanned": self.scanned,
            "scan_seconds": self.scan_seconds,
            "leased_or_reading": len(self._pins),
        }

    # -- the record of use -----------------------------------------------------------------

    def _seen(self, h: str, size: int) -> None:
        index = self._index
        known = index.get(h)
        if known == size:
            index.move_to_end(h)
            return
        if known is not None:  # a file cut short by a crash, since stored again
            self._bytes -= known
            index.move_to_end(h)
        index[h] = size
        self._bytes += size

    # -- the primitives --------------------------------------------------------------------

    def _present_sync(self, digests: list[Digest]) -> list[bool]:
        out = []
        path = self._str_path
        for d in digests:
            try:
                out.append(os.stat(path(d.hash)).st_size == d.size)
            except FileNotFoundError:
                out.append(False)
        return out

    async def _missing_local(self, digests: list[Digest]) -> list[Digest]:
        # The index answers for what it knows. Until the start-up scan has finished it
        # may not know a stored blob, so the rest is looked up on disk; after it, what the
        # index does not know is missing (at worst a blob another process put in our
        # data dir is uploaded again, harmlessly: reads always go to the disk).
        index = self._index
        on_disk: set[Digest] = set()
        unknown = [] if self.scanned else [d for d in digests if index.get(d.hash) != d.size]
        if len(unknown) > 16:
            found = await trio.to_thread.run_sync(self._present_sync, unknown)
            on_disk = {d for d, here in zip(unknown, found, strict=True) if here}
        else:
            await trio.lowlevel.checkpoint()
            if unknown:
                on_disk = {d for d, here in zip(unknown, self._present_sync(unknown), strict=True) if here}
        # Nothing yields from here on, so the answer is current when the caller gets it
        # (a blob stored during the hop above is in the index by now).
        missing = []
        evicting = self._evicting
        seen = self._seen
        for d in digests:
            if d.hash in evicting or (index.get(d.hash) != d.size and d not in on_disk):
                missing.append(d)
            else:
                seen(d.hash, d.size)
        return missing

    def _open_blob(self, digest: Digest) -> int:
        """An fd of the stored blob, or BlobNotFound (also for a file of the wrong size)."""
        if digest.hash in self._evicting:
            raise BlobNotFound(f"blob {digest} is not stored", digest=str(digest))
        try:
            fd = os.open(self._str_path(digest.hash), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            why = (" (its stored copy no longer matched its digest and was removed: upload it again)"
                   if digest.hash in self._dropped else "")
            raise BlobNotFound(f"blob {digest} is not stored{why}", digest=str(digest)) from None
        if os.fstat(fd).st_size != digest.size:
            os.close(fd)
            raise BlobNotFound(f"blob {digest} is not stored (a blob of that hash has another size)",
                               digest=str(digest))
        self._seen(digest.hash, digest.size)
        return fd

    async def _get_small_local(self, digest: Digest) -> bytes | None:
        await trio.lowlevel.checkpoint()
        try:
            fd = self._open_blob(digest)
        except BlobNotFound:
            return None
        try:
            data = os.pread(fd, digest.size, 0)
            # Read whole, so hashed here: a few us per KiB buys never serving damaged bytes.
            if hashlib.sha256(data).hexdigest() == digest.hash and len(data) == digest.size:
                return data
            self._damaged(digest, os.fstat(fd).st_ino, "a read")
            return None
        finally:
            os.close(fd)

    @asynccontextmanager
    async def _read_local(self, digest: Digest, offset: int) -> AsyncIterator[AsyncIterator[bytes]]:
        fd = self._open_blob(digest)
        self._pins.pin(digest.hash)
        try:
            yield _FdChunks(fd, offset, digest.size)
        finally:
            self._pins.unpin(digest.hash)
            os.close(fd)

    async def _put_many_local(self, blobs: list[tuple[Digest, bytes]]) -> dict[Digest, Exception | None]:
        # One thread hop verifies, writes and renames the lot: a thread hop and two
        # tasks per blob cost more than the blob's own system calls.
        out: dict[Digest, Exception | None] = {}
        reserved: list[tuple[Digest, bytes]] = []
        for digest, data in blobs:
            try:
                self._reserve(digest.size)
            except TriodeError as exc:
                out[digest] = exc
                continue
            reserved.append((digest, data))
        try:
            errors = await trio.to_thread.run_sync(self._store_many_sync, reserved)
        finally:
            self._reserved -= sum(d.size for d, _ in reserved)
        for (digest, _), error in zip(reserved, errors, strict=True):
            out[digest] = error
            if error is None:
                self._seen(digest.hash, digest.size)
                self.counters["puts"] += 1
                self.counters["bytes_written"] += digest.size
        return out

    def _store_many_sync(self, blobs: list[tuple[Digest, bytes]]) -> list[Exception | None]:
        """Each blob verified, written to a temp file and renamed into place (a worker thread)."""
        out: list[Exception | None] = []
        for digest, data in blobs:
            hasher = Hasher()
            hasher.update(data)
            try:
                hasher.verify(digest)
            except DigestMismatch as exc:
                out.append(exc)
                continue
            try:
                writer = _DiskWriter(self, digest)
            except OSError as exc:
                out.append(_os_error(exc, f"cannot start writing {digest}"))
                continue
            try:
                writer._write_sync([data], 0)
                writer._store_sync()
            except OSError as exc:
                writer._drop_file()
                out.append(_os_error(exc, f"cannot store {digest}"))
                continue
            out.append(None)
        return out

    def _new_writer(self, digest: Digest) -> Writer:
        self._reserve(digest.size)
        try:
            return _DiskWriter(self, digest)
        except OSError as exc:
            self._reserved -= digest.size
            raise _os_error(exc, f"cannot start writing {digest}") from None

    # -- DiskCAS only ----------------------------------------------------------------------

    def path_of(self, digest: Digest) -> Path | None:
        """The stored, read-only file of ``digest`` (for hard-linking), or None when absent.

        Hold a :meth:`lease` on it first if it must not be evicted while in use.
        """
        h = digest.hash
        if h in self._evicting:
            return None
        if self._index.get(h) == digest.size:
            # Known to be stored: no stat. The store alone removes blobs (eviction, or
            # drop_damaged), and a caller that finds the file gone treats it as missing.
            self._index.move_to_end(h)
            return Path(self._str_path(h))
        path = self._path(h)
        try:
            if os.stat(path).st_size != digest.size:
                return None
        except FileNotFoundError:
            return None
        self._seen(h, digest.size)
        return path

    def drop_damaged(self, digest: Digest, inode: int) -> bool:
        """Remove the stored file of ``digest`` if it is still inode ``inode``, whose bytes were
        found altered (an action wrote through its hard link): it no longer matches its name."""
        path = self._str_path(digest.hash)
        try:
            if os.stat(path).st_ino != inode:
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        size = self._index.pop(digest.hash, None)
        if size is not None:
            self._bytes -= size
        self._dropped[digest.hash] = None
        self._dropped.move_to_end(digest.hash)
        while len(self._dropped) > _DROPPED_REMEMBERED:
            self._dropped.popitem(last=False)
        if digest.hash == EMPTY.hash:  # always stored: a fresh one takes its place
            atomic_write(self.tmp_dir, self._path(EMPTY.hash), b"")
        return True

    def _damaged(self, digest: Digest, inode: int, found_by: str) -> None:
        if self.drop_damaged(digest, inode):
            self.counters["damaged_removed"] += 1
            log.error("blob %s: its stored bytes no longer match its digest (found by %s); removed", digest,
                      found_by)

    def _drop_local(self, digest: Digest) -> bool:
        try:
            inode = os.stat(self._str_path(digest.hash)).st_ino
        except FileNotFoundError:
            return False
        return self.drop_damaged(digest, inode)

    # -- verification ----------------------------------------------------------------------

    def _list_tops(self) -> list[str]:
        return sorted(e.path for e in os.scandir(self.blob_dir) if e.is_dir(follow_symlinks=False))

    @staticmethod
    def _list_blobs(top: str) -> list[tuple[str, int]]:
        """(hash, size) of every blob file in one ``cas/xx`` dir."""
        found = []
        for entry in os.scandir(top):
            if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                try:
                    found.append((entry.name, entry.stat(follow_symlinks=False).st_size))
                except FileNotFoundError:
                    continue
        return found

    def _sizes(self, hashes: list[str]) -> list[int | None]:
        out: list[int | None] = []
        for h in hashes:
            try:
                out.append(os.stat(self._str_path(h)).st_size)
            except FileNotFoundError:
                out.append(None)
        return out

    def _check_files(self, hashes: list[str]) -> list[tuple[str, int, int, bool] | None]:
        """(hash, size, inode, intact) of each small blob file, read whole (None: gone)."""
        out: list[tuple[str, int, int, bool] | None] = []
        for h in hashes:
            try:
                fd = os.open(self._str_path(h), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                out.append(None)
                continue
            try:
                st = os.fstat(fd)
                sha = hashlib.sha256()
                while block := os.read(fd, READ_CHUNK):
                    sha.update(block)
            finally:
                os.close(fd)
            out.append((h, st.st_size, st.st_ino, sha.hexdigest() == h))
        return out

    async def _check_large(self, h: str) -> tuple[str, int, int, bool] | None:
        """As :meth:`_check_files` for one large blob, :data:`VERIFY_BATCH` bytes per hop."""
        try:
            fd = await trio.to_thread.run_sync(os.open, self._str_path(h), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            hasher = Hasher()
            while await trio.to_thread.run_sync(_hash_some, fd, hasher, VERIFY_BATCH):
                pass
            return h, hasher.size, os.fstat(fd).st_ino, hasher.digest().hash == h
        finally:
            os.close(fd)

    async def _verify_local(self, digests: list[Digest] | None, report: VerifyReport) -> None:
        if digests is None:
            for top in await trio.to_thread.run_sync(self._list_tops):
                await self._verify_files(await trio.to_thread.run_sync(self._list_blobs, top), report)
            return
        sizes = await trio.to_thread.run_sync(self._sizes, [d.hash for d in digests])
        here = [(d.hash, size) for d, size in zip(digests, sizes, strict=True) if size is not None]
        intact = await self._verify_files(here, report)
        for d, size in zip(digests, sizes, strict=True):
            if size is None or (d.hash in intact and intact[d.hash] != d.size):
                report.missing.append(d)  # (another size under that hash is another blob)

    async def _verify_files(self, files: list[tuple[str, int]], report: VerifyReport) -> dict[str, int]:
        """Re-hash these blob files, small ones many per hop; returns the intact ones' sizes."""
        intact: dict[str, int] = {}
        batch: list[str] = []
        batched = 0

        async def settle(results: list[tuple[str, int, int, bool] | None]) -> None:
            for result in results:
                if result is None:
                    continue  # evicted meanwhile
                h, size, inode, ok = result
                report.checked += 1
                report.bytes += size
                if ok:
                    intact[h] = size
                    continue
                digest = Digest(h, self._index.get(h, size))
                self._damaged(digest, inode, "verify")
                report.damaged.append(digest)

        for h, size in files:
            if size > VERIFY_BATCH:
                await settle([await self._check_large(h)])
                continue
            batch.append(h)
            batched += size
            if batched >= VERIFY_BATCH or len(batch) >= VERIFY_FILES:
                await settle(await trio.to_thread.run_sync(self._check_files, batch))
                batch, batched = [], 0
        if batch:
            await settle(await trio.to_thread.run_sync(self._check_files, batch))
        return intact

    def lease(self, digests: Iterable[Digest]) -> Lease:
        """Pin blobs against eviction: ``with cas.lease(digests): ...`` (or ``async with``)."""
        return self._pins.lease(d.hash for d in digests)

    # -- limits and eviction ---------------------------------------------------------------

    def _reserve(self, size: int) -> None:
        """Count a blob being written against the limit; evict inline or refuse if it does not fit."""
        if self.limit is None:
            self._reserved += size
            return
        if size > self.limit:
            raise TooLarge(f"a blob of {size} bytes does not fit a store limited to {self.limit}",
                           size=size, limit=self.limit)
        if self._bytes + self._reserved + size > self.limit:
            victims = self._select_victims(self.limit - self._reserved - size)
            self._unlink(victims)
            if self._bytes + self._reserved + size > self.limit:
                self.counters["refused_full"] += 1
                raise ResourceExhausted(
                    f"store at {self.root} is full ({self._bytes} bytes stored, {self._reserved} being "
                    f"written, limit {self.limit}) and the rest is leased or being read",
                    retry_after=1.0,
                )
        self._reserved += size
        if self.over_high_watermark():
            self._space.set()

    def over_high_watermark(self) -> bool:
        return self.limit is not None and self._bytes + self._reserved > self.limit * self.high_watermark

    async def wait_over_high_watermark(self) -> None:
        """Wait until the store passes its high watermark (for the janitor)."""
        while not self.over_high_watermark():
            self._space = trio.Event()
            await self._space.wait()

    def _select_victims(self, target: int) -> list[tuple[str, int]]:
        """Take least recently used blobs nobody holds out of the index until ``target`` remains."""
        if self._bytes <= target:
            return []
        victims = []
        freed = 0
        pins = self._pins
        for h, size in self._index.items():
            if self._bytes - freed <= target:
                break
            if h in pins or h == EMPTY.hash:
                continue
            victims.append((h, size))
            freed += size
        for h, _ in victims:
            del self._index[h]
            self._evicting.add(h)
        self._bytes -= freed
        return victims

    def _unlink(self, victims: list[tuple[str, int]]) -> None:
        try:
            for h, _ in victims:
                try:
                    os.unlink(self._path(h))
                except FileNotFoundError:
                    pass
        finally:
            for h, _ in victims:
                self._evicting.discard(h)
            self.counters["evictions"] += len(victims)
            self.counters["evicted_bytes"] += sum(s for _, s in victims)

    async def evict(self, target: int | None = None) -> int:
        """Evict least recently used blobs until at most ``target`` bytes (default: the low
        watermark) are stored; leased blobs and blobs being read stay. Returns the count."""
        if target is None:
            if self.limit is None:
                return 0
            target = int(self.limit * self.low_watermark) - self._reserved
        victims = self._select_victims(max(target, 0))
        if victims:
            await trio.to_thread.run_sync(self._unlink, victims)
        return len(victims)

    # -- start and stop --------------------------------------------------------------------

    def _scan_sync(self) -> dict[str, tuple[int, float]]:
        found: dict[str, tuple[int, float]] = {}
        for top in os.scandir(self.blob_dir):
            if not top.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(top.path):
                if len(entry.name) == 64 and entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    found[entry.name] = (st.st_size, st.st_mtime)
        return found

    def _load_order(self) -> list[str]:
        try:
            with open(self.root / _INDEX_FILE, "rb") as f:
                order = msgpack.unpack(f, raw=False)
        except (FileNotFoundError, ValueError, msgpack.ExtraData, msgpack.FormatError):
            return []
        return order if isinstance(order, list) else []

    async def scan(self) -> None:
        """Build the index from a stat of every blob file (no blob is read).

        The order of use saved by the last :meth:`save_index` comes first, blobs it
        did not know (stored by a run that crashed) after it by modification time.
        """
        start = time.monotonic()
        found, order = await trio.to_thread.run_sync(lambda: (self._scan_sync(), self._load_order()))
        known = self._index
        rebuilt: OrderedDict[str, int] = OrderedDict()
        added = 0
        for h in order:
            if isinstance(h, str) and h in found and h not in known and h not in rebuilt:
                rebuilt[h] = found.pop(h)[0]
                added += rebuilt[h]
        for h, (size, _) in sorted(found.items(), key=lambda kv: kv[1][1]):
            if h not in known and h not in rebuilt and len(h) == 64:
                rebuilt[h] = size
                added += size
        # What was used during the scan is more recent than anything the scan found.
        rebuilt.update(known)
        self._index = rebuilt
        self._bytes += added
        self.scanned = True
        self.scan_seconds = time.monotonic() - start
        if self.over_high_watermark():
            self._space.set()

    def save_index(self) -> None:
        """Save the order of use, so a restart evicts what was least recently used (blocking)."""
        if self.scanned:
            atomic_write(self.tmp_dir, self.root / _INDEX_FILE, msgpack.packb(list(self._index)), mode=0o644)

    async def aclose(self) -> None:
        await super().aclose()
        await trio.to_thread.run_sync(self._close_sync)

    def _close_sync(self) -> None:
        self.save_index()
        fd = os.open(self.blob_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            sync_filesystem(fd)  # a clean stop leaves every acknowledged blob durable
        finally:
            os.close(fd)


def _hash_some(fd: int, hasher: Hasher, n: int) -> int:
    """Hash up to ``n`` more bytes of ``fd`` (read from where the hasher is); 0 at the end."""
    block = os.pread(fd, n, hasher.size)
    hasher.update(block)
    return len(block)


class _FdChunks:
    """Chunks of an open blob file from an offset; large reads go to a worker thread."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        self._fd = fd
        self._pos = offset
        self._size = size

    def __aiter__(self) -> _FdChunks:
        return self

    async def __anext__(self) -> bytes:
        n = min(READ_CHUNK, self._size - self._pos)
        if n <= 0:
            raise StopAsyncIteration
        if n <= INLINE_LIMIT:
            await trio.lowlevel.checkpoint()
            block = os.pread(self._fd, n, self._pos)
        else:
            block = await trio.to_thread.run_sync(os.pread, self._fd, n, self._pos)
        if not block:
            raise BlobNotFound("blob file ended early")
        self._pos += len(block)
        return block


class _DiskWriter(Writer):
    def __init__(self, store: DiskCAS, digest: Digest) -> None:
        super().__init__(digest)
        self._cas = store
        self.tmp = store.tmp_dir / f"{os.getpid()}.{digest.hash[:16]}.{os.urandom(6).hex()}"
        self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    async def write(self, chunks: list[bytes | memoryview]) -> None:
        if sum(map(len, chunks)) <= INLINE_LIMIT:
            self.hasher.update_all(chunks)
            self._write_sync(chunks, self.hasher.size - sum(map(len, chunks)))
            await trio.lowlevel.checkpoint()
            return
        # Hash and write in two worker threads at once (both release the GIL): a large
        # upload then costs the slower of the two, not their sum.
        start = self.hasher.size
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, self.hasher.update_all, chunks)
                await trio.to_thread.run_sync(self._write_sync, chunks, start)
        except BaseExceptionGroup as group:
            raise single_error(group) from None

    def _write_sync(self, chunks: list[bytes | memoryview], start: int) -> None:
        fd = self._fd
        assert fd is not None
        written = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                written += len(view)
                while view:
                    view = view[os.write(fd, view) :]
        except OSError as exc:
            raise _os_error(exc, f"cannot write {self.digest}") from None
        _start_writeback(fd, start, written)

    def _store_sync(self) -> None:
        """Close the temp file read-only and rename it into place."""
        fd = self._fd
        assert fd is not None
        try:
            os.fchmod(fd, 0o444)
        finally:
            self._fd = None
            os.close(fd)
        final = self._cas._str_path(self.digest.hash)
        try:
            os.replace(self.tmp, final)
        except FileNotFoundError:  # its shard was removed behind the store's back
            _ensure_dir(Path(final).parent)
            os.replace(self.tmp, final)

    async def _store(self) -> None:
        try:
            if self.digest.size <= INLINE_LIMIT:
                self._store_sync()  # a few microseconds: cheaper than a thread hop
            else:
                await trio.to_thread.run_sync(self._store_sync)
        except OSError as exc:
            raise _os_error(exc, f"cannot store {self.digest}") from None
        # No await from here on: once stored, the writer is done.
        store = self._cas
        store._reserved -= self.digest.size
        store._seen(self.digest.hash, self.digest.size)

    def _drop(self) -> None:
        self._cas._reserved -= self.digest.size
        self._drop_file()

    def _drop_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)
