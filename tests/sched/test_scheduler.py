"""The scheduler against fake executors: admission, de-duplication, cancellation, placement."""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from triode.errors import Cancelled, InvalidArgument, ResourceExhausted, ToolError, Unavailable
from triode.sched.job import Job
from triode.sched.operations import State
from triode.sched.scheduler import Scheduler, outcome_or_raise
from triode.testing import no_leaks

from .fakes import FakeExecutor, FakePlacement, job, outcome


@asynccontextmanager
async def running(**options):
    executor = options.pop("executor", None) or FakeExecutor()
    options.setdefault("capacity", 2)
    options.setdefault("max_queue", 10)
    sched = Scheduler(node="n1", executor=executor, **options)
    async with no_leaks(), trio.open_nursery() as nursery:
        await nursery.start(sched.run)
        try:
            yield sched, executor
        finally:
            nursery.cancel_scope.cancel()
    sched.table.check()


async def test_runs_at_most_capacity_at_once_and_in_priority_order():
    async with running(capacity=2) as (sched, ex), trio.open_nursery() as n:
        for i, prio in enumerate([0, 0, 0, 5, 1]):
            n.start_soon(lambda i=i, p=prio: sched.admit_and_wait(job(f"k{i}"), priority=p))
            await trio.testing.wait_all_tasks_blocked()
        await ex.wait_running(2)
        assert sched.table.queued == 3 and ex.max_running == 2
        for key in ["k0", "k1", "k3", "k4", "k2"]:
            ex.release(key)
            await trio.testing.wait_all_tasks_blocked()
        assert ex.order == ["k0", "k1", "k3", "k4", "k2"]
        assert ex.max_running == 2


async def test_full_queue_refuses_then_recovers():
    async with running(capacity=1, max_queue=2) as (sched, ex), trio.open_nursery() as n:
        for i in range(3):
            n.start_soon(sched.admit_and_wait, job(f"k{i}"))
        await ex.wait_running(1)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(ResourceExhausted) as info:
            await sched.admit_and_wait(job("one-too-many"))
        assert info.value.retry_after
        assert sched.info()["counters"]["rejected"] == 1
        for i in range(3):
            ex.release(f"k{i}")
        await trio.testing.wait_all_tasks_blocked()
        ex.release("after")
        op = await sched.admit_and_wait(job("after"))
        assert outcome_or_raise(op).result.exit_code == 0


async def test_identical_jobs_share_one_execution_and_one_waiter_leaving_does_not_matter():
    async with running() as (sched, ex):
        results = []
        scopes = []

        async def waiter(scope):
            with scope:
                op = await sched.admit_and_wait(job("same"))
                results.append(outcome_or_raise(op))

        async with trio.open_nursery() as n:
            for _ in range(50):
                scope = trio.CancelScope()
                scopes.append(scope)
                n.start_soon(waiter, scope)
            await ex.wait_running(1)
            await trio.testing.wait_all_tasks_blocked()
            op = sched.table.inflight("same")
            assert op.waiters == 50
            scopes[0].cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert op.waiters == 49 and op.state is State.EXECUTING
            ex.release("same")
        assert ex.started["same"] == 1 and ex.cancelled["same"] == 0
        assert len(results) == 49
        assert sched.info()["counters"]["deduplicated"] == 49


async def test_last_waiter_leaving_cancels_the_execution():
    async with running() as (sched, ex):
        async with trio.open_nursery() as n:
            for _ in range(3):
                n.start_soon(sched.admit_and_wait, job("x"))
            await ex.wait_running(1)
            n.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert ex.cancelled["x"] == 1
        (op,) = [op for op in sched.table if op.key == "x"]
        assert isinstance(op.error, Cancelled) and "every caller" in str(op.error)
        assert sched.local_running == 0


async def test_do_not_cache_jobs_are_not_shared():
    async with running() as (sched, ex), trio.open_nursery() as n:
        n.start_soon(sched.admit_and_wait, job("k", dedup=False))
        n.start_soon(sched.admit_and_wait, job("k", dedup=False))
        await ex.wait_running(2)
        ex.release("k")
    assert ex.started["k"] == 2


async def test_cache_hit_completes_at_once_without_a_slot():
    async with running(capacity=1) as (sched, ex), trio.open_nursery() as n:
        ex.cache["hit"] = outcome("hit", cached=True)
        n.start_soon(sched.admit_and_wait, job("busy"))
        await ex.wait_running(1)
        op = await sched.admit_and_wait(job("hit"))  # the only slot is taken: still answered
        assert op.done and outcome_or_raise(op).cached is True
        assert ex.started["hit"] == 0
        skipped = trio.CancelScope()
        n.start_soon(lambda: _in(skipped, sched.admit_and_wait(job("hit", skip_cache=True))))
        await trio.testing.wait_all_tasks_blocked()
        assert sched.table.inflight("hit") is not None  # skip_cache queues it for real
        skipped.cancel()
        ex.release("busy")


async def _in(scope, coro):
    with scope:
        await coro


async def test_concurrent_misses_look_up_the_cache_once_and_run_once():
    async with running() as (sched, ex), trio.open_nursery() as n:
        for _ in range(20):
            n.start_soon(sched.admit_and_wait, job("k"))
        await ex.wait_running(1)
        await trio.testing.wait_all_tasks_blocked()
        assert ex.lookups == 1
        ex.release("k")
    assert ex.started["k"] == 1


async def test_detached_submit_cancel_by_name_queued_and_executing():
    async with running(capacity=1) as (sched, ex):
        a = await sched.admit(job("a"), detached=True)
        b = await sched.admit(job("b"), detached=True)
        await ex.wait_running(1)
        assert a.state is State.EXECUTING and b.state is State.QUEUED
        assert sched.cancel(b)
        assert b.done and isinstance(b.error, Cancelled) and sched.table.queued == 0
        assert sched.cancel(a)
        await sched.wait(a)
        assert isinstance(a.error, Cancelled) and ex.cancelled["a"] == 1
        with pytest.raises(Cancelled):
            outcome_or_raise(a)


async def test_watch_sees_every_state_to_completion():
    async with running(capacity=1) as (sched, ex):
        op = await sched.admit(job("w"), detached=True)
        states = []

        async def watch():
            async for snap in sched.watch(op):
                states.append(snap.state)

        async with trio.open_nursery() as n:
            n.start_soon(watch)
            await ex.wait_running(1)
            await trio.testing.wait_all_tasks_blocked()
            ex.release("w")
        assert states[-1] is State.COMPLETED
        assert State.EXECUTING in states


async def test_executor_error_completes_the_operation_with_it():
    ex = FakeExecutor()
    ex.fail["bad"] = ToolError("it threw")
    async with running(executor=ex) as (sched, _):
        ex.release("bad")
        op = await sched.admit_and_wait(job("bad"))
        assert isinstance(op.error, ToolError)
        assert sched.info()["counters"]["failed"] == 1


async def test_forwards_when_local_slots_are_full():
    placement = FakePlacement({"p1": 1, "p2": 1})
    async with running(capacity=1, placement=placement) as (sched, ex), trio.open_nursery() as n:
        for key in ["a", "b", "c", "d"]:
            n.start_soon(sched.admit_and_wait, job(key))
            await trio.testing.wait_all_tasks_blocked()
        assert ex.started["a"] == 1
        assert dict(placement.forwarded) == {"p1": 1, "p2": 1}
        assert sched.table.queued == 1  # d waits for whichever frees first
        placement.gates["b"].set()
        await trio.testing.wait_all_tasks_blocked()
        assert placement.forwarded["p1"] == 2  # d went to the freed peer
        placement.gates["d"].set()
        placement.gates["c"].set()
        ex.release("a")
    assert sched.info()["counters"]["forwarded"] == 3


async def test_a_forwarded_outcome_is_decoded_and_checked():
    placement = FakePlacement({"p1": 1, "p2": 1})
    placement.behaviour["p2"] = "garbage"
    async with running(capacity=1, placement=placement) as (sched, ex), trio.open_nursery() as n:
        n.start_soon(sched.admit_and_wait, job("busy"))
        await ex.wait_running(1)
        good = await sched.admit(job("x"), detached=True)
        bad = await sched.admit(job("y"), detached=True)
        await trio.testing.wait_all_tasks_blocked()
        assert (good.running_on, bad.running_on) == ("p1", "p2")
        placement.gates["x"].set()
        placement.gates["y"].set()
        await sched.wait(good)
        await sched.wait(bad)
        assert outcome_or_raise(good) == outcome("x", node="p1")
        with pytest.raises(InvalidArgument, match="exit_code"):
            outcome_or_raise(bad)
        ex.release("busy")


async def test_refused_forward_is_placed_again_locally():
    placement = FakePlacement({"p1": 1})
    placement.behaviour["p1"] = "refuse"
    async with running(capacity=1, placement=placement) as (sched, ex), trio.open_nursery() as n:
        n.start_soon(sched.admit_and_wait, job("a"))
        await ex.wait_running(1)
        n.start_soon(sched.admit_and_wait, job("b"))
        await trio.testing.wait_all_tasks_blocked()
        assert sched.table.queued == 1 and sched.info()["counters"]["forward_refused"] == 1
        ex.release("a")
        ex.release("b")
    assert ex.finished["b"] == 1


async def test_peer_lost_retries_elsewhere_then_fails_clearly():
    placement = FakePlacement({"p1": 1, "p2": 1, "p3": 1})
    for p in ("p1", "p2", "p3"):
        placement.behaviour[p] = "lose"
    async with (
        running(capacity=1, placement=placement, max_attempts=3) as (sched, ex),
        trio.open_nursery() as n,
    ):
        n.start_soon(sched.admit_and_wait, job("busy"))
        await ex.wait_running(1)
        op = await sched.admit_and_wait(job("x"))
        assert isinstance(op.error, Unavailable) and "3 peers were lost" in str(op.error)
        assert sum(placement.forwarded.values()) == 3
        ex.release("busy")


async def test_peer_lost_once_then_runs_locally():
    placement = FakePlacement({"p1": 1})
    placement.behaviour["p1"] = "lose"
    async with running(capacity=1, placement=placement) as (sched, ex), trio.open_nursery() as n:
        n.start_soon(sched.admit_and_wait, job("busy"))
        await ex.wait_running(1)
        n.start_soon(sched.admit_and_wait, job("x"))
        await trio.testing.wait_all_tasks_blocked()
        assert placement.forwarded["p1"] == 1 and sched.table.queued == 1
        ex.release("busy")
        ex.release("x")
    assert ex.finished["x"] == 1 and sched.info()["counters"]["retried"] == 1


async def test_cancelling_a_forwarded_operation_cancels_the_forward():
    placement = FakePlacement({"p1": 1})
    async with running(capacity=1, placement=placement) as (sched, ex), trio.open_nursery() as n:
        n.start_soon(sched.admit_and_wait, job("busy"))
        await ex.wait_running(1)
        op = await sched.admit(job("x"), detached=True)
        await trio.testing.wait_all_tasks_blocked()
        assert op.running_on == "p1" and op.remote == "p1/1"
        sched.cancel(op)
        await sched.wait(op)
        assert isinstance(op.error, Cancelled) and placement.free["p1"] == 1
        ex.release("busy")


async def test_slot_only_admission_for_forwarded_jobs():
    async with running(capacity=1) as (sched, ex), trio.open_nursery() as n:
        n.start_soon(sched.admit_and_wait, job("a"))
        await ex.wait_running(1)
        with pytest.raises(ResourceExhausted):
            await sched.admit(job("b"), slot_only=True)
        ex.release("a")


async def test_leaving_the_scheduler_cancels_and_joins_everything():
    ex = FakeExecutor()
    async with running(executor=ex, capacity=2) as (sched, _):
        for i in range(5):
            await sched.admit(job(f"k{i}"), detached=True)
        await ex.wait_running(2)
    assert ex.cancelled["k0"] == 1 and ex.cancelled["k1"] == 1 and ex.running == 0


async def test_a_forwarded_job_is_never_forwarded_again():
    placement = FakePlacement({"p1": 1})
    async with running(capacity=1, placement=placement) as (sched, ex), trio.open_nursery() as n:
        n.start_soon(sched.admit_and_wait, job("busy"))
        await ex.wait_running(1)
        forwarded = Job(key="hop", action=None, forwarded_from="other-node")
        n.start_soon(sched.admit_and_wait, forwarded)
        await trio.testing.wait_all_tasks_blocked()
        assert sched.table.queued == 1 and not placement.forwarded  # one hop at most
        ex.release("busy")
        ex.release("hop")
    assert ex.finished["hop"] == 1
