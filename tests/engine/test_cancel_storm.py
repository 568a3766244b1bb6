"""1,000 executions cancelled at random moments: nothing of any of them is left behind."""

from __future__ import annotations

import os
import random
from pathlib import Path

import trio

from triode.model.action import Action, Input
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

        def action_for(i: int) -> Action:
            # Varied so that none is a cache hit.
            return Action(
                ("/bin/sh", "-c", f"cat in.txt > out.txt; exit {i % 2}"),
                inputs={"in.txt": Input(blob)},
                outputs=("out.txt",),
                env={"N": str(i)},
            )

        # Cancel anywhere from before the cache lookup to a little after a typical run
        # ends (staging, running, collecting): the window follows this machine's speed,
        # so about two thirds are cut short whether an execution takes 3 ms or 30.
        took = []
        for i in range(5):
            start = trio.current_time()
            await rig.executor.lookup_or_run(action_for(-1 - i))
            took.append(trio.current_time() - start)
        window = 1.5 * sorted(took)[2]
        await eventually(lambda: rig.executor.info()["cache_writes_pending"] == 0, 2)
        tasks0, fds0, children0 = len(live_tasks()), dict(open_fds()), dict(child_processes())
        before = snapshot()
        outcomes = {"cancelled": 0, "finished": 0}
        for i in range(N):
            with trio.move_on_after(rng.uniform(0, window)) as scope:
                await rig.executor.lookup_or_run(action_for(i))
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
        rig.close()
