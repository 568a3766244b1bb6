"""Staging: lay an action's input tree out in its work dir, by hard link where it is safe.

A hard link to the disk CAS costs one syscall per file, so it is the fast path. It is
safe only when the action can change neither the stored file's bytes nor its mode: the
link shares the CAS's inode, and changing it would change the stored blob for everyone.
That takes a read-only file with the executable bit the action wants, *and* an action
that does not own it and has no capability to override that (see :func:`link_policy`).
Any other input gets its own copy, as do inputs whose link fails (another filesystem,
the inode's link count is full, link restrictions) and blobs the local store cannot hand
out as a file (a memory store, or a blob the backing tier has and we do not yet:
``write_to`` reads it through).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from ..errors import BlobNotFound, MissingInputs
from ..model.action import Action, Input
from ..model.digest import Digest
from ..model.paths import parents
from ..model.store import LocalBlobStore

if TYPE_CHECKING:
    from .sandbox import Sandbox

__all__ = ["Staged", "stage_inputs", "link_policy", "tampered", "mode_for", "maybe_in_thread", "INLINE_FILES"]

#: Concurrent ``write_to`` fetches while staging one action.
FETCH_CONCURRENCY = 8
#: Up to this many files, file system work is done on the event loop: a thread hop
#: costs more than a few syscalls on a local disk.
INLINE_FILES = 8

T = TypeVar("T")


async def maybe_in_thread(in_thread: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread when it is big, inline when not.

    Inline, it is a cancellation point but does not yield: its callers run it between
    other steps of an action that do yield (a thread hop, a process wait), and each
    needless yield is a trip through the scheduler, several per action.
    """
    if in_thread:
        return await trio.to_thread.run_sync(fn, *args)
    await trio.lowlevel.checkpoint_if_cancelled()
    return fn(*args)


def mode_for(executable: bool) -> int:
    """Inputs are read-only: the action may not change them in place."""
    return 0o555 if executable else 0o444


@dataclass
class Staged:
    """What staging did: counts for info, and the linked inodes to check after the run."""

    linked: int = 0
    copied: int = 0
    fetched: int = 0
    #: (path in the work dir, stored file, digest, (ino, mtime_ns, mode, size)) of each hard
    #: link. Not the ctime: every new link to the inode (ours or another action's) changes it.
    #: Paths as strings: this list has an entry per input, and pathlib costs more than a link.
    links: list[tuple[str, str, Digest, tuple[int, ...]]] = field(default_factory=list)


def _fingerprint(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_ino, st.st_mtime_ns, st.st_mode, st.st_size)


def link_policy(setting: str, sandbox: Sandbox) -> tuple[bool, tuple[int, int] | None]:
    """Whether to hard-link inputs, and to whom linked files are given first, for this node.

    A link is only as safe as the stored file's read-only mode, and a mode protects a file
    only from a process that neither owns it nor has a capability (CAP_FOWNER,
    CAP_DAC_OVERRIDE) to ignore it. Under ``"auto"`` inputs are linked only when the
    sandbox runs actions that way: a root node's actions in bwrap have no capabilities, and
    each linked file is given to the sandbox's ``input_owner`` (nobody) first. Otherwise the
    action would own the file or could override its mode (no isolation; a node that is not
    root, whose uid owns the store), so inputs are copied. ``"always"`` links whatever the
    risk (then only what :func:`tampered` finds after the run is caught); ``"never"``
    always copies.
    """
    if setting not in ("auto", "always", "never"):
        raise ValueError(f"link_inputs must be auto, always or never, got {setting!r}")
    if setting == "never":
        return False, None
    if setting == "always":
        return True, None
    if sandbox.isolated and sandbox.input_owner is not None:
        return True, sandbox.input_owner
    return False, None


def _stage_local(
    root: Path, action: Action, sources: dict[Digest, Path | None], link: bool = True,
    give_to: tuple[int, int] | None = None,
) -> tuple[Staged, list[tuple[str, Input]]]:
    """The synchronous part, run in one worker thread: dirs, links and local copies.

    ``sources`` maps each input digest to its stored file (None when the store has
    none); ``give_to`` is the ``(uid, gid)`` a linked file must belong to (see
    :func:`link_policy`). Returns what it did and the inputs it could not find as a local file.
    """
    staged = Staged()
    dirs: set[str] = set(action.directories)
    for path in action.inputs:
        parent = path.rpartition("/")[0]
        while parent and parent not in dirs:  # the usual sibling's parents are in already
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    for path in action.directories:
        dirs.update(parents(path))
    for path in action.symlinks:
        dirs.update(parents(path))
    if action.cwd:
        dirs.add(action.cwd)
        dirs.update(parents(action.cwd))
    base = os.fspath(root)
    for d in sorted(dirs, key=lambda p: p.count("/")):
        os.mkdir(f"{base}/{d}")
    remote: list[tuple[str, Input]] = []
    for path, entry in action.inputs.items():
        dest = f"{base}/{path}"
        digest, executable = entry
        if digest.size == 0:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode_for(executable))
            os.close(fd)
            staged.copied += 1
            continue
        src_path = sources.get(digest)
        if src_path is None:
            remote.append((path, entry))
            continue
        src = os.fspath(src_path)
        # Link first and look at the inode after: one stat instead of two. A stored file
        # that is writable or has the wrong executable bit is unlinked again and copied.
        try:
            if not link:
                raise OSError(errno.EPERM, "hard links are off")
            os.link(src, dest)
        except FileNotFoundError:  # evicted since path_of (a lease prevents it with DiskCAS)
            remote.append((path, entry))
            continue
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EMLINK, errno.EPERM, errno.EACCES):
                raise
        else:
            st = os.stat(dest)
            if bool(st.st_mode & stat.S_IXUSR) == executable and not st.st_mode & 0o222:
                if give_to is not None and (st.st_uid, st.st_gid) != give_to:
                    # Once per blob: the action must not own what it may not change.
                    os.chown(dest, *give_to)
                staged.linked += 1
                staged.links.append((dest, src, digest, _fingerprint(st)))
                continue
            os.unlink(dest)
        try:
            shutil.copyfile(src, dest)
        except FileNotFoundError:  # evicted since path_of
            remote.append((path, entry))
            continue
        os.chmod(dest, mode_for(executable))
        staged.copied += 1
    # Symlinks last: no other input is staged through one (the action refuses a tree where
    # a symlink is a file's directory), and each target stays inside the root (checked too).
    for path, target in action.symlinks.items():
        os.symlink(target, f"{base}/{path}")
    return staged, remote


async def stage_inputs(
    root: Path, action: Action, cas: LocalBlobStore, *, link: bool = True,
    give_to: tuple[int, int] | None = None,
) -> Staged:
    """Stage every input of ``action`` under ``root`` (which exists and is empty); linked
    files belong to ``give_to`` when it is given (see :func:`link_policy`).

    Raises :class:`MissingInputs` listing the digests neither the local store nor its
    backing tier has.
    """
    # path_of is asked here, on the event loop, not in the worker thread: it touches the
    # store's in-memory index, which only the loop may change.
    path_of = cas.path_of
    sources: dict[Digest, Path | None] = {}
    for i, digest in enumerate(action.input_digests()):
        sources[digest] = path_of(digest)
        if i % 256 == 255:
            await trio.lowlevel.checkpoint()
    # What is not a local file may still be in the store (memory) or its backing tier.
    elsewhere = [d for d, p in sources.items() if p is None and d.size]
    if elsewhere:
        _raise_missing(await cas.find_missing(elsewhere))
    big = len(action.inputs) + len(action.directories) + len(action.symlinks) > INLINE_FILES
    staged, remote = await maybe_in_thread(big, _stage_local, root, action, sources, link, give_to)
    if not remote:
        return staged
    missing: list[str] = []
    limit = trio.Semaphore(FETCH_CONCURRENCY)

    async def fetch(path: str, entry: Input) -> None:
        async with limit:
            dest = root / path
            try:
                await cas.write_to(entry.digest, dest)
            except BlobNotFound:
                missing.append(str(entry.digest))
                return
            os.chmod(dest, mode_for(entry.executable))
            staged.fetched += 1

    async with trio.open_nursery() as nursery:
        for path, entry in remote:
            nursery.start_soon(fetch, path, entry)
    _raise_missing(missing)
    return staged


def _raise_missing(missing: list[Any]) -> None:
    if missing:
        names = sorted({str(d) for d in missing})
        raise MissingInputs(
            f"{len(names)} input blob(s) of the action are not in the CAS: upload them and retry "
            f"(e.g. {names[0]})",
            missing=names,
        )


def tampered(staged: Staged) -> list[tuple[str, Digest, int]]:
    """Hard-linked inputs whose inode changed during the run (the action wrote to the CAS file).

    Returns (path in the work dir, digest, inode) for each.
    """
    changed = []
    for path, _, digest, before in staged.links:
        try:
            after = _fingerprint(os.stat(path))
        except FileNotFoundError:
            continue  # unlinking our link leaves the CAS file alone
        if after[0] == before[0] and after != before:  # same inode (not replaced), changed
            changed.append((path, digest, after[0]))
    return changed
