"""An executor over a real disk CAS and action cache, without a node around it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from triode.engine.executor import EngineConfig, Executor
from triode.engine.workdir import WorkDirs
from triode.storage.ac import ActionCache
from triode.storage.disk import DiskCAS
from triode.testing import no_leaks


@dataclass
class Rig:
    cas: DiskCAS
    ac: ActionCache
    workdirs: WorkDirs
    executor: Executor
    data: Path

    def close(self) -> None:
        self.workdirs.close()
        self.ac.close()


def make_rig(
    data: Path, *, grace: float = 0.5, output_cap: int = 1024 * 1024, link_inputs: str = "always"
) -> Rig:
    cas = DiskCAS(data)
    ac = ActionCache(cas, data / "ac")
    workdirs = WorkDirs(data / "work", "node-test")
    workdirs.open()
    config = EngineConfig(grace=grace, output_cap=output_cap, link_inputs=link_inputs)
    return Rig(cas, ac, workdirs, Executor(cas, ac, workdirs, node_id="node-test", config=config), data)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path / "data")
    try:
        async with no_leaks():
            yield r
        assert r.workdirs.count() == 0, "a work dir was left behind"
    finally:
        r.close()


async def eventually(done: Callable[[], bool], within: float) -> bool:
    """Poll ``done`` (a look at /proc: there is no event to wait on) until true or ``within`` s."""
    with trio.move_on_after(within):
        while not done():  # noqa: ASYNC110 - polling the kernel's view, nothing to wait on
            await trio.sleep(0.02)
    return done()
