"""1,000 executions cancelled at random moments: nothing of any of them is left behind."""

from __future__ import annotations

import os
import random
from pathlib import Path

import trio

from triode.engine.action import Action, Input
from triode.testing import child_processes, live_tasks, open_fds, snapshot

from .conftest import eventually, make_rig

N = 1000


def _zombies() -> list[int]:
    return [pid for pid, state in child_processes().items() if state == "Z"]


async def test_thousand_random_cancellations_leak_nothing(tmp_path: Path) -> None:
    rig = make_rig(tmp_path / "data", grace=0.2)
    try:
        blob = await rig.cas.put(b"input bytes\n")
        rng = random.Random(1234)
        tasks0, fds0, children0 = len(live_tasks()), dict(open_fds()), dict(child_processes())
        before = snapshot()
        outcomes = {"cancelled": 0, "finished": 0}
        for i in range(N):
            # Vary the action so none is a cache hit, and cancel anywhere from before the
            # cache lookup to after the process ended (staging, running, collecting).
            action = Action(
                ("/bin/sh", "-c", f"cat in.txt > out.txt; exit {i % 2}"),
                inputs={"in.txt": Input(blob)},
                outputs=("out.txt",),
                env={"N": str(i)},
            )
            with trio.move_on_after(rng.uniform(0, 0.012)) as scope:
                await rig.executor.execute(action)
            outcomes["cancelled" if scope.cancelled_caught else "finished"] += 1
        # Counted one by one, so a failure says which kind leaked.
        await eventually(lambda: not snapshot().leaks_since(before), 2)
        assert len(live_tasks()) == tasks0, "tasks leaked"
        assert {fd: t for fd, t in open_fds().items() if fds0.get(fd) != t} == {}, "fds leaked"
        assert {p: s for p, s in child_processes().items() if p not in children0} == {}, "processes leaked"
        assert _zombies() == []
        assert rig.workdirs.count() == 0, "work dirs leaked"
        assert os.listdir(rig.data / "tmp") == []
        # The storm really did cancel at many moments, and let some through.
        assert outcomes["cancelled"] > N // 4 and outcomes["finished"] > 0, outcomes
        assert rig.executor.counters["running"] == 0
        assert rig.executor.counters["cancelled"] == outcomes["cancelled"]
    finally:
        rig.workdirs.close()
