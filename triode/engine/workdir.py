"""Work directories: one fresh directory per execution, always removed, even after a crash.

A node keeps its work dirs under ``<data>/work/<node-id>/`` and holds an flock on
``<data>/work/<node-id>.lock`` for as long as it runs. Several nodes (a daemon and the
embedded nodes of ``triode run``) may share one data dir, so a node starting up removes
only the directories whose lock nobody holds: those a crashed node left behind. Before
it removes them it kills whatever still runs in them: a node that was SIGKILLed could
not stop its actions, which run in sessions (and sandboxes) of their own.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import trio

from ..procgroup import group_alive, kill_groups_working_in

__all__ = ["WorkDirs", "remove_tree", "scratch_of"]

#: Finished work dirs queued for removal behind their executions.
REMOVE_BEHIND = 64
#: Fresh work dirs made ahead of need.
READY = 16
#: How much older than its hand-out a dir's last change must be for an unchanged lstat to
#: show it untouched: file systems stamp changes with a coarse clock that lags the real one
#: by up to a tick (10 ms at HZ=100), so a change just after hand-out could carry the same
#: stamp as a change just before it.
STAMP_SLACK_NS = 50_000_000

#: What an lstat says of a dir that any change to it (an entry made or removed, chmod, an
#: extended attribute, a new inode in its place) would alter: inode, mode, links, mtime, ctime.
Stamp = tuple[int, int, int, int, int]

log = logging.getLogger("triode.engine")


def _wait_gone(groups: list[int], timeout: float = 2.0) -> None:
    """Wait (a little; a node opens its work dirs in a worker thread) for SIGKILLed groups
    to be gone before their dirs go."""
    deadline = time.monotonic() + timeout
    while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.01)


def remove_tree(path: Path) -> None:
    """Remove ``path`` however the action left it: read-only dirs and files included."""
    try:
        shutil.rmtree(path)
        return
    except FileNotFoundError:
        return
    except OSError:
        pass
    # The action made directories unwritable or unreadable: give them back to us, without
    # following any symlink it planted (chmod follows links), then try again.
    try:
        os.chmod(path, 0o700)
    except OSError:
        pass
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            sub = os.path.join(dirpath, name)
            if not os.path.islink(sub):
                try:
                    os.chmod(sub, 0o700)
                except OSError:
                    pass
    shutil.rmtree(path, ignore_errors=True)
    if os.path.lexists(path):
        log.warning("could not remove work dir %s", path)


def _remove_if_bare(path: Path) -> bool:
    """Remove a work dir holding nothing but empty directories, inline; False if it holds more."""
    try:
        for entry in os.scandir(path):
            if not entry.is_dir(follow_symlinks=False):
                return False
            os.rmdir(entry.path)
        os.rmdir(path)
    except OSError:
        return False
    return True


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_mode, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns)


def scratch_of(work: Path) -> Path:
    """Where an execution keeps files that are not its action's (spilled output): beside it.

    Created only when needed; removed with the work dir.
    """
    return work.with_name(work.name + ".scratch")


def _remove(path: Path) -> None:
    if not _remove_if_bare(path):
        remove_tree(path)
    scratch = scratch_of(path)
    if os.path.lexists(scratch):
        remove_tree(scratch)


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        _remove(path)


class WorkDirs:
    """Where this node's executions get their directories."""

    def __init__(self, base: Path, node_id: str) -> None:
        self.base = base
        self.root = base / node_id
        self._lock_path = base / f"{node_id}.lock"
        self._lock_fd: int | None = None
        self._removals: trio.MemorySendChannel[Path] | None = None
        #: Fresh dirs made ahead (refiller, remover); never handed out twice.
        self._ready: list[Path] = []
        #: The stamp of each ready dir as it was last seen untouched (see _reuse).
        self._stamps: dict[Path, Stamp] = {}
        #: Fresh dirs a worker thread is making right now.
        self._making: set[Path] = set()
        self._low = trio.Event()
        self._stopping = False
        #: The permission bits of a dir as made (set by open); a reused dir must have them.
        self._fresh_mode = 0o755

    def open(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self._remove_abandoned()
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # another node's clean-up removed the file we locked: lock the new one
        self._lock_fd = fd
        self.root.mkdir(exist_ok=True)
        probe = self.root / f"probe-{uuid.uuid4().hex}"
        probe.mkdir()
        self._fresh_mode = stat.S_IMODE(probe.stat().st_mode)  # what mkdir gives under our umask
        probe.rmdir()

    def close(self) -> None:
        remove_tree(self.root)
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            try:
                os.unlink(self._lock_path)
            finally:
                os.close(fd)

    def _remove_abandoned(self) -> None:
        for lock in self.base.glob("*.lock"):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live node holds it
                left = lock.with_suffix("")
                stopped = kill_groups_working_in(left)
                if stopped:
                    log.warning("stopped %d process groups a killed node left running in %s",
                                len(stopped), left)
                    _wait_gone(stopped)
                log.info("removing work dirs left by a stopped node: %s", left)
                remove_tree(left)
                lock.unlink(missing_ok=True)
            finally:
                os.close(fd)

    @asynccontextmanager
    async def create(self) -> AsyncIterator[Path]:
        """A fresh, empty directory; removed (shielded from cancellation) when the block ends.

        Its scratch space (see :func:`scratch_of`) goes with it. With :meth:`remover`
        running, the removal happens just behind the block's end, off its caller's path.
        A dir left exactly as it was handed out is renamed and kept for a later execution
        instead (see :meth:`_reuse`).
        """
        stamp = None
        if self._ready:
            path = self._ready.pop()
            stamp = self._stamps.pop(path, None)
            if len(self._ready) < READY // 4:
                self._low.set()  # the remover tops the pool up too; this is the backstop
        else:
            # None made ahead (no refiller, or it is behind): in a worker thread, as a mkdir
            # can take milliseconds (ext4 searching for a free inode), which the event loop
            # must not wait out. Shielded, so a dir that was made is also removed.
            path = self.root / uuid.uuid4().hex
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(path.mkdir)
        handed_out = time.time_ns()
        try:
            yield path
        finally:
            if not self._reuse(path, stamp, handed_out):
                await self._remove_behind(path)

    async def _remove_behind(self, path: Path) -> None:
        """Hand ``path`` to :meth:`remover`, or remove it now when no remover takes it."""
        try:
            if self._removals is None:
                raise trio.ClosedResourceError
            self._removals.send_nowait(path)
        except (trio.WouldBlock, trio.ClosedResourceError):
            # In a worker thread even when bare: an rmdir waits for the file system's
            # journal, milliseconds while other threads fsync (the action cache does).
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_remove, path)

    def _reuse(self, path: Path, stamp: Stamp | None = None, handed_out: int = 0) -> bool:
        """Put back a work dir its action left exactly as it got it, for a later execution.

        Removing it and making another frees an inode and allocates one; on ext4 without
        a journal a freed inode is skipped by every allocation for a minute or more, each
        skip a read of the inode table, so steady churn makes every create in the file
        system slower (we measured a create at 35 us before and 900 us after). An action
        that wrote nothing is the usual case for short commands. The checks (empty, same
        mode, no extended attributes, no scratch) make sure the next action cannot tell;
        it gets the same path, as a build tool's stable exec root would. (A rename to a
        fresh name cost a third of this check, and a process left in the dir keeps it
        across a rename all the same: its cwd is the inode.) A process that escaped its
        group and still sits in the dir could reach the next action here, as it could any
        path this node's user can write to: reuse gives it nothing it did not have.

        Most dirs come back with the ``stamp`` they were handed out with, last changed
        well before ``handed_out`` (ns): one lstat then shows that nothing was made in
        them, nothing removed, no mode or attribute changed (each would move the ctime,
        which no call can set back), and the listing and attribute checks are skipped.
        """
        # The pool may be full (the refiller tops it up while dirs are out); a dir coming
        # back is worth more than a fresh one, which cost a mkdir. It stays bounded: every
        # dir in it was made while it held fewer than READY, or is one handed out before.
        if self._stopping or len(self._ready) >= 2 * READY:
            return False
        try:
            st = os.lstat(path)
            seen = _stamp(st)
            if seen != stamp or seen[4] >= handed_out - STAMP_SLACK_NS:
                if stat.S_IMODE(st.st_mode) != self._fresh_mode or os.listxattr(path):
                    return False
                with os.scandir(path) as entries:
                    if next(entries, None) is not None:
                        return False
            if os.path.lexists(scratch_of(path)):
                return False
        except OSError:
            return False
        self._ready.append(path)
        self._stamps[path] = seen
        return True

    async def remover(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Remove finished work dirs behind their executions, and make fresh ones to replace
        them in the same thread hop (a hop costs the event loop more than the mkdirs do).
        Returns once :meth:`stop_remover` is called and the queue is empty. Run it in the
        engine's nursery."""
        send, receive = trio.open_memory_channel[Path](REMOVE_BEHIND)
        self._removals = send
        task_status.started()
        async with receive:
            async for path in receive:
                batch = [path]  # whatever else is queued goes in the same thread hop
                while True:
                    try:
                        batch.append(receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                fresh = self._names()
                try:
                    with trio.CancelScope(shield=True):
                        made = await trio.to_thread.run_sync(self._recycle, batch, fresh)
                finally:
                    self._making.difference_update(fresh)
                self._add_ready(made)  # (close() removes any left unused)

    def _add_ready(self, made: list[tuple[Path, Stamp]]) -> None:
        for path, stamp in made:
            self._ready.append(path)
            self._stamps[path] = stamp

    def _recycle(self, finished: list[Path], fresh: list[Path]) -> list[tuple[Path, Stamp]]:
        """Remove ``finished``, then make the ``fresh`` dirs (none if that fails: the
        refiller, or the executions themselves, try again and report the error)."""
        _remove_all(finished)
        try:
            return self._make(fresh)
        except OSError as exc:
            log.warning("cannot make work dirs ahead in %s: %s", self.root, exc)
            return []

    async def refiller(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep up to :data:`READY` fresh, empty dirs made ahead, so an execution does not wait
        for a mkdir (which, like rmdir, can wait for the journal). Returns on stop_remover."""
        self._low = trio.Event()
        self._low.set()
        task_status.started()
        while not self._stopping:
            await self._low.wait()
            self._low = trio.Event()
            if self._stopping:
                break
            fresh = self._names()
            if fresh:
                try:
                    self._add_ready(await trio.to_thread.run_sync(self._make, fresh))
                except OSError as exc:  # executions make their own, and get the error themselves
                    log.warning("cannot make work dirs ahead in %s: %s", self.root, exc)
                    return
                finally:
                    self._making.difference_update(fresh)

    def _names(self) -> list[Path]:
        """Names for the dirs that would bring the pool back to :data:`READY`, marked as being
        made (so two tasks never both fill it, and :meth:`count` does not take them for leaks)."""
        want = 0 if self._stopping else READY - len(self._ready) - len(self._making)
        fresh = [self.root / uuid.uuid4().hex for _ in range(max(0, want))]
        self._making.update(fresh)
        return fresh

    @staticmethod
    def _make(fresh: list[Path]) -> list[tuple[Path, Stamp]]:
        """Make the ``fresh`` dirs, each with its stamp (see :meth:`_reuse`), or none."""
        made: list[tuple[Path, Stamp]] = []
        try:
            for path in fresh:
                path.mkdir()
                made.append((path, _stamp(os.lstat(path))))
        except OSError:
            _remove_all([path for path, _ in made])
            raise
        return made

    def stop_remover(self) -> None:
        """Stop :meth:`remover` (once its queue is done) and :meth:`refiller`."""
        self._stopping = True
        self._low.set()
        if self._removals is not None:
            self._removals.close()

    def count(self) -> int:
        """Work dirs in use or not yet removed right now (the leak tests count them): every
        entry but the fresh ones made ahead or being made."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return 0
        spare = {p.name for p in self._ready} | {p.name for p in self._making}
        return sum(1 for name in names if name not in spare)


@contextmanager
def temporary_base() -> Iterator[Path]:
    """A base for nodes without a data dir, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="triode-work-"))
    try:
        yield path
    finally:
        remove_tree(path)
