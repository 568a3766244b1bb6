"""The scheduler of one node: admission, de-duplication, local slots and forwarding.

All state lives in one :class:`~triode.sched.operations.OperationTable`; this module
adds the trio side: a dispatcher that moves the head of the queue to a free local
slot or, failing that, to a peer with free capacity (at most one hop), per-operation
wake-ups for waiters and watchers, and the waiter count that cancels an execution
when its last waiter leaves. Everything it starts runs in the nursery of
:meth:`Scheduler.run`, so it ends with the node.

The path of one job: :meth:`Scheduler.admit` asks the executor's ``lookup`` (a hit
completes at once), else queues it; :meth:`_place` gives it a slot and
:meth:`_run_local` calls the executor's ``run`` (or :meth:`_run_forward` hands it to a
peer); the outcome, an :class:`~triode.model.result.ExecuteOutcome`, completes the
operation. :meth:`Scheduler.admit_and_wait` is admit, wait, leave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import trio

from ..errors import Cancelled, Internal, TriodeError, Unavailable
from ..model.result import ExecuteOutcome
from .job import Executor, Job, NotAccepted, PeerLost, Placement
from .metrics import Registry
from .operations import Operation, OperationTable, State

__all__ = ["Scheduler", "outcome_or_raise"]

log = logging.getLogger("triode.sched")


class Scheduler:
    """Admits jobs, runs them on ``capacity`` local slots or forwards them to peers.

    ``placement`` is None on a node without peers. ``max_attempts`` bounds how many
    peers may die under one operation before it fails with :class:`Unavailable`.
    """

    def __init__(
        self,
        *,
        node: str,
        executor: Executor,
        capacity: int,
        max_queue: int,
        placement: Placement | None = None,
        retention: float = 600.0,
        max_retained: int = 10_000,
        max_attempts: int = 3,
        settle_timeout: float = 30.0,
        registry: Registry | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.node = node
        self.executor = executor
        self.capacity = capacity
        self.placement = placement
        self.max_attempts = max_attempts
        #: How long a last waiter that cancelled stays for the execution to unwind.
        self.settle_timeout = settle_timeout
        self.table = OperationTable(
            node=node, limit=max_queue, retention=retention, max_retained=max_retained,
            on_change=self._on_change,
        )
        self.local_running = 0
        self.forwarding = 0
        self._wake = trio.lowlevel.ParkingLot()
        self._load_lot = trio.lowlevel.ParkingLot()
        self._last_load = (0, 0)
        self._lookups: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None
        self.metrics = registry or Registry()
        m = self.metrics
        self.c_submitted = m.counter("triode_sched_submitted_total", "Executions asked for (every waiter)")
        self.c_deduplicated = m.counter(
            "triode_sched_deduplicated_total", "Submissions that joined an identical execution in flight")
        self.c_cached = m.counter("triode_sched_cached_total", "Submissions answered from the action cache")
        self.c_executed = m.counter("triode_sched_executed_total", "Executions run on this node", ("origin",))
        self.c_forwarded = m.counter("triode_sched_forwarded_total", "Executions forwarded to a peer")
        self.c_refused = m.counter("triode_sched_forward_refused_total", "Forwards a peer did not accept")
        self.c_retried = m.counter("triode_sched_retried_total", "Executions retried after a peer was lost")
        self.c_failed = m.counter("triode_sched_failed_total", "Executions that completed with an error")
        self.c_cancelled = m.counter("triode_sched_cancelled_total", "Executions cancelled")
        self.c_rejected = m.counter("triode_sched_rejected_total", "Submissions refused: queue full")
        self.h_queue = m.histogram("triode_sched_queue_seconds", "Time from admission to a slot")
        self.h_run = m.histogram("triode_sched_run_seconds", "Time an execution held a local slot")
        self.h_forward = m.histogram("triode_sched_forward_seconds", "Time of a forwarded execution")
        self.h_latency = m.histogram("triode_sched_latency_seconds", "Admission to completion")
        m.gauge("triode_sched_executing", "Executions holding a local slot",
                lambda: [({}, self.local_running)])
        m.gauge("triode_sched_forwarding", "Executions running on peers for us",
                lambda: [({}, self.forwarding)])
        m.gauge("triode_sched_queued", "Executions waiting for a slot", lambda: [({}, self.table.queued)])
        m.gauge("triode_sched_capacity", "Local slots", lambda: [({}, self.capacity)])

    # -- figures -----------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return self.capacity - self.local_running

    def load(self) -> dict[str, int]:
        """What peers are told about this node."""
        return {
            "executing": self.local_running,
            "capacity": self.capacity,
            "queued": self.table.queued,
            "queue_limit": self.table.limit,
        }

    async def load_changed(self) -> None:
        """Return at the next change of :meth:`load` (for gossip on change)."""
        await self._load_lot.park()

    def info(self) -> dict[str, Any]:
        return {
            **self.load(),
            "forwarding": self.forwarding,
            "retained": self.table.retained,
            "counters": {k: int(v) for k, v in {
                "submitted": self.c_submitted.value(),
                "deduplicated": self.c_deduplicated.value(),
                "cached": self.c_cached.value(),
                "executed": self.c_executed.value("local") + self.c_executed.value("forwarded"),
                "executed_for_peers": self.c_executed.value("forwarded"),
                "forwarded": self.c_forwarded.value(),
                "forward_refused": self.c_refused.value(),
                "retried": self.c_retried.value(),
                "failed": self.c_failed.value(),
                "cancelled": self.c_cancelled.value(),
                "rejected": self.c_rejected.value(),
            }.items()},
        }

    def poke(self) -> None:
        """Something placement depends on changed (a peer's load): look at the queue again."""
        self._place()

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; every execution started here is cancelled and joined on exit."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_loop)
            task_status.started()
            try:
                await self._dispatch()
            finally:
                self._nursery = None

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(min(max(self.table.retention / 10, 0.5), 30.0))
            self.table.expire(time.time())

    async def _dispatch(self) -> None:
        """Place what can start whenever woken. Most placements happen synchronously, right
        where a slot frees or a job arrives (:meth:`_place`); this task is the backstop."""
        while True:
            self._place()
            await self._wake.park()

    def _place(self) -> None:
        """Start every queued operation that can start now: on a free local slot, else on a
        peer with free capacity (never a job forwarded to us). No await: the table cannot
        change under it."""
        nursery = self._nursery
        if nursery is None or nursery.cancel_scope.cancel_called:
            return
        while (op := self.table.peek()) is not None:
            job: Job = op.payload
            if self.free_slots > 0:
                op = self._take()
                self.local_running += 1
                self._load_maybe_changed()
                op.running_on = self.node
                nursery.start_soon(self._run_local, op)
                continue
            peer = None
            if self.placement is not None and job.forwarded_from is None:
                peer = self.placement.pick(job)
            if peer is None:
                return
            op = self._take()
            self.forwarding += 1
            op.running_on = peer
            nursery.start_soon(self._run_forward, op, peer)

    def _take(self) -> Operation:
        op = self.table.take(time.time())
        assert op is not None
        self.h_queue.observe(op.started - op.created)  # type: ignore[operator]
        op.scope = trio.CancelScope()
        return op

    async def _run_local(self, op: Operation) -> None:
        job: Job = op.payload
        start = trio.current_time()
        self.c_executed.inc("forwarded" if job.forwarded_from else "local")
        scope = op.scope
        try:
            with scope:
                try:
                    queued = (op.started or op.created) - op.created
                    outcome = await self.executor.run(job, queued=queued)
                except TriodeError as exc:
                    self._finish(op, error=exc)
                except Exception as exc:
                    log.exception("executing %s failed", op.name)
                    self._finish(op, error=Internal(f"executing {op.name} failed on {self.node}: {exc!r}"))
                else:
                    self._finish(op, outcome=outcome)
            self._finish_cancelled(op, scope)
        finally:
            self.h_run.observe(trio.current_time() - start)
            self.local_running -= 1
            self._load_maybe_changed()
            self._place()  # the slot just freed

    async def _run_forward(self, op: Operation, peer: str) -> None:
        job: Job = op.payload
        assert self.placement is not None
        start = trio.current_time()

        def accepted(remote: str) -> None:
            owner, sep, _ = remote.rpartition("/")
            op.running_on = owner if sep else peer
            op.remote = remote or None
            self.table.touch(op)

        scope = op.scope
        try:
            with scope:
                try:
                    outcome = await self.placement.forward(peer, job, accepted)
                except NotAccepted as exc:
                    log.info("%s: %s; placing it again", op.name, exc)
                    self.c_refused.inc()
                    self._requeue(op, scope)
                except PeerLost as exc:
                    op.attempts += 1
                    if scope.cancel_called:
                        pass
                    elif op.attempts >= self.max_attempts:
                        self._finish(op, error=Unavailable(
                            f"{op.name}: {op.attempts} peers were lost while executing it, the last "
                            f"{exc.peer} ({exc.reason}); giving up", node=exc.peer, name=op.name))
                    else:
                        log.warning("%s: %s; retrying", op.name, exc)
                        self.c_retried.inc()
                        self._requeue(op, scope)
                except TriodeError as exc:
                    self._finish(op, error=exc)
                except Exception as exc:
                    log.exception("forwarding %s to %s failed", op.name, peer)
                    self._finish(op, error=Internal(f"forwarding {op.name} to {peer} failed: {exc!r}"))
                else:
                    self.c_forwarded.inc()
                    self.h_forward.observe(trio.current_time() - start)
                    self._finish(op, outcome=outcome)
            self._finish_cancelled(op, scope)
        finally:
            self.forwarding -= 1
            self._wake.unpark_all()  # a requeued job, or the peer's slot is free again

    def _finish(self, op: Operation, *, outcome: ExecuteOutcome | None = None,
                error: TriodeError | None = None) -> None:
        if op.done:
            return
        now = time.time()
        if error is not None:
            (self.c_cancelled if isinstance(error, Cancelled) else self.c_failed).inc()
        self.h_latency.observe(now - op.created)
        self.table.complete(op, outcome=outcome, error=error, now=now)

    def _requeue(self, op: Operation, scope: trio.CancelScope) -> None:
        if not scope.cancel_called:  # a cancel that raced the failure wins
            self.table.requeue(op)

    def _finish_cancelled(self, op: Operation, scope: trio.CancelScope) -> None:
        if op.state is State.EXECUTING and scope.cancel_called:
            self._finish(op, error=Cancelled(op.cancel_reason or f"{op.name} was cancelled",
                                             name=op.name))

    def _on_change(self, op: Operation) -> None:
        if op.lot is not None:
            op.lot.unpark_all()
        if op.done and op.finished_event is not None:
            op.finished_event.set()
        if op.state is State.QUEUED:  # the only change the dispatcher acts on (a requeue)
            self._wake.unpark_all()
        self._load_maybe_changed()

    def _load_maybe_changed(self) -> None:
        """Wake the gossip of our load only when it did change (a cache hit does not)."""
        load = (self.local_running, self.table.queued)
        if load != self._last_load:
            self._last_load = load
            self._load_lot.unpark_all()

    # -- the API -----------------------------------------------------------------------

    async def admit(
        self,
        job: Job,
        *,
        priority: int = 0,
        detached: bool = False,
        slot_only: bool = False,
    ) -> Operation:
        """Admit a job (or join the identical one in flight, or answer from the cache).

        Unless ``detached``, the caller becomes a waiter and must call :meth:`leave`
        when it stops waiting (:meth:`admit_and_wait` does both). ``slot_only`` admits only
        when a local slot is free now (a forwarded job: the forwarder keeps its queue).
        """
        self.c_submitted.inc()
        key = job.key if job.dedup else None
        while key is not None:
            op = self.table.inflight(key)
            if op is not None:
                return self._join(op, detached, joined=True)
            pending = self._lookups.get(key)
            if pending is None:
                break
            await pending.wait()
        if not job.skip_cache:
            done = trio.Event()
            if key is not None:
                self._lookups[key] = done
            try:
                hit = await self.executor.lookup(job)
            except TriodeError as exc:
                log.warning("cache lookup for %s failed, running it: %s", job.key, exc)
                hit = None
            finally:
                if key is not None:
                    del self._lookups[key]
                done.set()
            if hit is not None:
                self.c_cached.inc()
                return self.table.record_completed(key, hit, payload=job, now=time.time())
            if key is not None and (op := self.table.inflight(key)) is not None:
                return self._join(op, detached, joined=True)  # a skip-cache twin got in first
        # Queued operations that a free slot here or on a peer is about to take do not
        # count against the queue: it holds what the whole cluster has no room for.
        free = max(0, self.free_slots)
        if slot_only:
            limit = free
        else:
            spare = self.placement.spare() if self.placement is not None else 0
            limit = self.table.limit + free + spare
        try:
            op, joined = self.table.admit(key, priority=priority, payload=job, now=time.time(), limit=limit)
        except TriodeError:
            self.c_rejected.inc()
            raise
        return self._join(op, detached, joined=joined)

    def _join(self, op: Operation, detached: bool, *, joined: bool) -> Operation:
        if joined:
            self.c_deduplicated.inc()
        if detached:
            op.detached = True
        else:
            op.waiters += 1
        self.table.touch(op)
        if not joined:
            self._place()  # start it now if it can: no trip through the dispatcher task
        return op

    def leave(self, op: Operation) -> bool:
        """A waiter is gone; the last one to leave cancels a non-detached execution (True)."""
        if op.done:
            return False
        op.waiters -= 1
        self.table.touch(op)
        if op.waiters <= 0 and not op.detached:
            return self.cancel(op, reason=f"{op.name} was cancelled: every caller waiting for it left")
        return False

    def cancel(self, op: Operation, *, reason: str | None = None) -> bool:
        """Cancel for everyone: a queued operation is removed, an executing one is killed."""
        reason = reason or f"{op.name} was cancelled"
        if op.state is State.QUEUED:
            self.c_cancelled.inc()
            return self.table.cancel_queued(op, now=time.time(), reason=reason)
        if op.state is State.EXECUTING and op.scope is not None:
            op.cancel_reason = reason
            op.scope.cancel()
            return True
        return False

    async def wait(self, op: Operation) -> Operation:
        """Return once the operation has completed."""
        if not op.done:
            # Waiters wait for the end only: a thousand of them must not all wake at each
            # change (every waiter joining is one), which would cost n^2 wake-ups.
            if op.finished_event is None:
                op.finished_event = trio.Event()
            await op.finished_event.wait()
        return op

    async def watch(self, op: Operation) -> AsyncIterator[Operation]:
        """The operation now, then after each change, until (and including) completion."""
        seen = -1
        while True:
            if op.version != seen:
                seen = op.version
                yield op
                if op.done:
                    return
            else:
                await self._lot(op).park()

    def _lot(self, op: Operation) -> trio.lowlevel.ParkingLot:
        if op.lot is None:
            op.lot = trio.lowlevel.ParkingLot()
        return op.lot

    async def admit_and_wait(self, job: Job, *, priority: int = 0) -> Operation:
        """Admit, wait, leave: the completed operation (its outcome or error inside)."""
        op = await self.admit(job, priority=priority)
        try:
            return await self.wait(op)
        finally:
            await self.leave_and_settle(op)

    async def leave_and_settle(self, op: Operation) -> None:
        """:meth:`leave`; if that cancelled the execution, stay until its processes are gone.

        So the call that caused an execution lasts until the execution is over, even when
        cancelled (a node draining waits for it), bounded by ``settle_timeout``.
        """
        if self.leave(op):
            with trio.CancelScope(shield=True), trio.move_on_after(self.settle_timeout):
                await self.wait(op)


def outcome_or_raise(op: Operation) -> ExecuteOutcome:
    """The outcome of a completed operation, or its error raised."""
    if op.error is not None:
        err = op.error  # a fresh copy per waiter: raising one instance in many tasks tangles tracebacks
        raise type(err)(err.message, **err.details)
    assert op.outcome is not None
    return op.outcome

