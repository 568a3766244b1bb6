"""Random interleavings of submit, leave, cancel and completion against the live scheduler.

After every step: the table's invariant holds, no more than ``capacity`` jobs run, every
running job is one the table says is executing, and no operation is left running or
queued once its last waiter has gone. At the end every waiter has an answer
and nothing is left running.
"""

from __future__ import annotations

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from triode.sched.operations import State
from triode.sched.scheduler import Scheduler

from .fakes import FakeExecutor, FakePlacement, job

KEYS = "abcde"

steps = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.sampled_from(KEYS), st.integers(-1, 1), st.booleans()),
        st.tuples(st.just("leave"), st.integers(0, 30)),
        st.tuples(st.just("cancel"), st.integers(0, 30)),
        st.tuples(st.just("release"), st.sampled_from(KEYS)),
        st.tuples(st.just("release_peer"), st.sampled_from(KEYS)),
    ),
    min_size=4,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(steps=steps, capacity=st.integers(1, 2), queue=st.integers(0, 4), peers=st.integers(0, 2))
def test_random_interleavings_keep_every_promise(steps, capacity, queue, peers):
    trio.run(_run, steps, capacity, queue, peers)


async def _run(steps, capacity, queue, peers):
    ex = FakeExecutor()
    placement = FakePlacement({f"p{i}": 1 for i in range(peers)}) if peers else None
    sched = Scheduler(node="n", executor=ex, capacity=capacity, max_queue=queue, placement=placement)
    waiters: list[tuple[trio.CancelScope, list]] = []
    ops = []

    async def waiter(key, priority, scope, answer):
        with scope:
            try:
                op = await sched.admit_and_wait(job(key), priority=priority)
                answer.append(op.state)
            except Exception as exc:  # ResourceExhausted when full
                answer.append(type(exc).__name__)
        if scope.cancelled_caught:
            answer.append("left")

    def check():
        sched.table.check()
        assert ex.running <= capacity and sched.local_running <= capacity
        executing = sum(1 for op in sched.table if op.state is State.EXECUTING)
        assert executing == sched.local_running + sched.forwarding
        # Nothing runs for nobody: an execution whose last waiter left has been cancelled.
        for op in sched.table:
            assert op.done or op.detached or op.waiters > 0, op

    async with trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        async with trio.open_nursery() as callers:
            for step in steps:
                kind = step[0]
                if kind == "submit":
                    _, key, priority, detached = step
                    if detached:
                        try:
                            ops.append(await sched.admit(job(key), priority=priority, detached=True))
                        except Exception:
                            pass
                    else:
                        scope, answer = trio.CancelScope(), []
                        waiters.append((scope, answer))
                        callers.start_soon(waiter, key, priority, scope, answer)
                elif kind == "leave" and waiters:
                    waiters[step[1] % len(waiters)][0].cancel()
                elif kind == "cancel" and ops:
                    sched.cancel(ops[step[1] % len(ops)])
                elif kind == "release":
                    ex.release(step[1])
                    ex._gates.pop(step[1], None)  # the next run of this key waits again
                elif kind == "release_peer" and placement is not None:
                    placement.gates.setdefault(step[1], trio.Event()).set()
                    placement.gates.pop(step[1], None)
                await trio.testing.wait_all_tasks_blocked()
                check()
            # Let everything finish: open every gate until nothing is left.
            for _ in range(100):
                if not any(not op.done for op in sched.table):
                    break
                for key in KEYS:
                    ex.release(key)
                    if placement is not None:
                        placement.gates.setdefault(key, trio.Event()).set()
                await trio.testing.wait_all_tasks_blocked()
                check()
        assert all(answer for _, answer in waiters), "a waiter never got an answer"
        assert all(op.done for op in ops)
        assert ex.running == 0 and sched.local_running == 0 and sched.forwarding == 0
        nursery.cancel_scope.cancel()
