"""Work dirs: made ahead, removed behind, never counted as leaks while fresh, never too many."""

from __future__ import annotations

import os
import stat
import time
import uuid
from pathlib import Path

import pytest
import trio

from triode.engine.workdir import READY, STAMP_SLACK_NS, WorkDirs, scratch_of

from .conftest import eventually


def _fs_clock_past(where: Path, ns: int, within: float = 10.0) -> None:
    """Until the file system stamps a change in ``where`` later than ``ns`` (its clock is
    coarse and lags the real one): a change made after this cannot carry a stamp of ``ns``
    or before. Polled, with a bound far past any clock tick, instead of sleeping a guess."""
    probe = where / "clock-probe"
    probe.touch()
    try:
        deadline = time.monotonic() + within
        while os.stat(probe).st_ctime_ns <= ns:
            assert time.monotonic() < deadline, f"the file system clock did not pass {ns} in {within}s"
            time.sleep(0.005)
            os.utime(probe)  # a change now: stamped with the file system's clock
    finally:
        probe.unlink()


def test_dirs_being_made_ahead_are_not_leaks(tmp_path: Path) -> None:
    dirs = WorkDirs(tmp_path, "node")
    dirs.open()
    try:
        fresh = dirs._names()  # as the refiller and the remover do before their thread hop
        assert len(fresh) == READY
        assert dirs._names() == []  # the pool is full counting those: nobody makes more
        WorkDirs._make(fresh)  # the worker thread's part
        assert dirs.count() == 0
        dirs._making.difference_update(fresh)
        dirs._ready += fresh
        assert dirs.count() == 0
        (tmp_path / "node" / "left-behind").mkdir()
        assert dirs.count() == 1
    finally:
        dirs.close()
    assert not (tmp_path / "node").exists()


async def test_executions_get_fresh_empty_dirs_and_the_pool_stays_bounded(tmp_path: Path) -> None:
    dirs = WorkDirs(tmp_path, "node")
    dirs.open()
    seen: set[str] = set()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dirs.remover)
            await nursery.start(dirs.refiller)

            async def use(i: int) -> None:
                async with dirs.create() as root:
                    assert os.listdir(root) == []  # fresh and empty, never one handed out before
                    assert root.name not in seen
                    seen.add(root.name)
                    (root / "out").write_text(str(i))
                    await trio.lowlevel.checkpoint()

            for _ in range(5):
                async with trio.open_nursery() as batch:
                    for i in range(2 * READY):
                        batch.start_soon(use, i)
            assert await eventually(lambda: dirs.count() == 0, 10)
            assert await eventually(lambda: not dirs._making, 10)
            assert len(os.listdir(tmp_path / "node")) <= READY  # only the spare ones are left
            dirs.stop_remover()
    finally:
        dirs.close()
    assert len(seen) == 10 * READY


@pytest.mark.parametrize("stamped", [False, True], ids=["full-check", "stamp"])
def test_only_a_dir_left_as_it_was_is_taken_back(tmp_path: Path, stamped: bool) -> None:
    dirs = WorkDirs(tmp_path, "node")
    dirs.open()
    changes = ("file", "mode", "scratch", "subdir", "xattr")
    try:
        made = WorkDirs._make([dirs.root / uuid.uuid4().hex for _ in range(1 + len(changes))])
        # Handed out well after they were made, as most are (and changed after that).
        _fs_clock_past(tmp_path, max(stamp[4] for _, stamp in made) + 2 * STAMP_SLACK_NS)
        handed_out = time.time_ns()
        (untouched, stamp), *rest = made
        assert dirs._reuse(untouched, stamp if stamped else None, handed_out)
        assert dirs._ready[-1] == untouched and untouched.is_dir()
        for change, (root, stamp) in zip(changes, rest, strict=True):
            if change == "file":
                (root / "out").write_text("x")
            elif change == "mode":
                root.chmod(stat.S_IMODE(root.stat().st_mode) ^ 0o020)
            elif change == "scratch":
                scratch_of(root).mkdir()
            elif change == "subdir":
                (root / "sub").mkdir()
            else:
                try:
                    os.setxattr(root, "user.triode-test", b"x")
                except OSError:
                    continue  # no user xattrs on this file system
            assert not dirs._reuse(root, stamp if stamped else None, handed_out), change
            assert root.exists(), change  # left where it is, for the remover
    finally:
        dirs.close()
    assert not (tmp_path / "node").exists()


def test_an_unchanged_stamp_spares_the_listing_only_when_it_is_old_enough(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dirs = WorkDirs(tmp_path, "node")
    dirs.open()
    try:
        ((path, stamp),) = WorkDirs._make([dirs.root / uuid.uuid4().hex])
        listed = []
        real_scandir = os.scandir
        monkeypatch.setattr(os, "scandir", lambda p: listed.append(p) or real_scandir(p))
        # Changed within the file system's clock tick of its hand-out: the stamp proves nothing.
        assert dirs._reuse(path, stamp, stamp[4] + STAMP_SLACK_NS // 2)
        assert listed == [path]
        dirs._ready.remove(path)
        # Changed long before: the lstat is enough, and the new stamp is kept for next time.
        assert dirs._reuse(path, stamp, stamp[4] + 2 * STAMP_SLACK_NS)
        assert listed == [path]
        assert dirs._stamps[path] == stamp
        # Emptied again after a file came and went: the stamp moved, so it is listed again.
        dirs._ready.remove(path)
        _fs_clock_past(tmp_path, stamp[4])  # past the clock tick of the last change
        (path / "tmp").write_text("x")
        (path / "tmp").unlink()
        assert dirs._reuse(path, stamp, stamp[4] + 2 * STAMP_SLACK_NS)
        assert listed == [path, path]
    finally:
        dirs.close()


async def test_an_execution_that_wrote_nothing_gives_its_dir_back(tmp_path: Path) -> None:
    dirs = WorkDirs(tmp_path, "node")
    dirs.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dirs.remover)
            async with dirs.create() as root:
                inode = root.stat().st_ino
            assert dirs.count() == 0
            assert inode in {p.stat().st_ino for p in dirs._ready}
            dirs.stop_remover()
    finally:
        dirs.close()
