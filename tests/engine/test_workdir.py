"""Work dirs: made ahead, removed behind, never counted as leaks while fresh, never too many."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import trio

from triode.engine.workdir import READY, WorkDirs

from .conftest import eventually


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


async def test_a_dir_left_as_it_was_is_reused_under_a_new_name_and_any_other_is_removed(
    tmp_path: Path,
) -> None:
    dirs = WorkDirs(tmp_path, "node")
    dirs.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dirs.remover)
            async with dirs.create() as untouched:
                pass
            assert not untouched.exists()  # renamed: paths stay unique per execution
            assert len(dirs._ready) == 1 and dirs.count() == 0
            reused = dirs._ready[0]

            changed = []
            for change in ("file", "mode", "scratch", "subdir"):
                async with dirs.create() as root:
                    if change == "file":
                        (root / "out").write_text("x")
                    elif change == "mode":
                        root.chmod(stat.S_IMODE(root.stat().st_mode) ^ 0o020)
                    elif change == "scratch":
                        (root.parent / (root.name + ".scratch")).mkdir()
                    else:
                        (root / "sub").mkdir()
                    changed.append(root)
                assert dirs._ready == [], change  # not put back
            assert await eventually(lambda: dirs.count() == 0, 10)
            assert not any(p.exists() for p in changed)
            assert reused not in dirs._ready  # it was handed out again first
            dirs.stop_remover()
    finally:
        dirs.close()
    assert not (tmp_path / "node").exists()
