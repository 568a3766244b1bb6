"""Operations and the one table that holds them: the admission queue *is* the operations map.

The scheduler this replaces kept a queue and a map of operations side by side and
updated them at different moments, so an operation could be recorded but not
queued, or queued but not recorded. Here there is a single :class:`OperationTable`;
every change to it is one synchronous method (no I/O, no ``await``), so no other
task can ever observe the two halves disagree. :meth:`OperationTable.check` states
the invariant; the tests drive the table with a hypothesis state machine and call
it after every step.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import Cancelled, NotFound, ResourceExhausted, TriodeError
from ..model.result import ExecuteOutcome

__all__ = ["State", "Operation", "OperationTable"]


class State(enum.Enum):
    QUEUED = "queued"
    EXECUTING = "executing"
    COMPLETED = "completed"


@dataclass(eq=False)
class Operation:
    """One execution. Identical actions in flight share one Operation (see ``waiters``)."""

    name: str
    #: De-duplication key (the action digest), or None for an action never shared.
    key: str | None
    priority: int
    seq: int
    created: float
    #: What the executor runs; opaque to the table.
    payload: Any = None
    state: State = State.QUEUED
    started: float | None = None
    finished: float | None = None
    #: The executor's outcome once completed successfully.
    outcome: ExecuteOutcome | None = None
    #: The error it completed with instead.
    error: TriodeError | None = None
    #: Callers waiting on the result; the execution is cancelled when the last one leaves.
    waiters: int = 0
    #: Submitted without a waiter: runs to the end unless cancelled by name.
    detached: bool = False
    #: The node running it (this node, or the peer it was forwarded to).
    running_on: str | None = None
    #: The peer's name for it, once forwarded and accepted.
    remote: str | None = None
    #: How many times a peer died under it.
    attempts: int = 0
    #: Bumped on every visible change, so watchers can tell one snapshot from the next.
    version: int = 0
    #: Set by the scheduler while it executes, to cancel it (opaque to the table).
    scope: Any = field(default=None, repr=False)
    #: Where the scheduler parks tasks watching for changes, and waiting for the end
    #: (opaque to the table: trio objects, made only when someone waits).
    lot: Any = field(default=None, repr=False)
    finished_event: Any = field(default=None, repr=False)
    cancel_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.state is State.COMPLETED

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "name": self.name,
            "state": self.state.value,
            "action_digest": self.key,
            "priority": self.priority,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "running_on": self.running_on,
            "remote": self.remote,
            "waiters": self.waiters,
            "attempts": self.attempts,
            "version": self.version,
        }
        if self.outcome is not None:
            wire["outcome"] = self.outcome.to_wire()
        if self.error is not None:
            code, message, details = self.error.to_wire()
            wire["error"] = {"code": code, "message": message, "details": details}
        return wire


class OperationTable:
    """Queued, executing and recently completed operations, changed only as a whole.

    ``limit`` bounds the queued operations (admission beyond it is ResourceExhausted);
    completed ones are kept for ``retention`` seconds, at most ``max_retained`` of them.
    ``on_change(op)`` is called synchronously after each change an observer can see.
    """

    def __init__(
        self,
        *,
        node: str,
        limit: int,
        retention: float = 600.0,
        max_retained: int = 10_000,
        on_change: Callable[[Operation], None] | None = None,
        retry_after: float = 1.0,
    ) -> None:
        if limit < 0:
            raise ValueError("queue limit must be >= 0")
        self.node = node
        self.limit = limit
        self.retention = retention
        self.max_retained = max_retained
        self.retry_after = retry_after
        self._on_change = on_change or (lambda op: None)
        self._ops: dict[str, Operation] = {}  # every queued and executing operation
        self._heap: list[tuple[int, int, Operation]] = []  # (-priority, seq, op): exactly the queued ones
        self._by_key: dict[str, Operation] = {}  # in-flight operations that may be shared
        self._executing = 0
        self._completed: OrderedDict[str, Operation] = OrderedDict()  # in completion order
        self._seq = itertools.count()
        self._ids = itertools.count(1)

    # -- reading -----------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._heap)

    @property
    def executing(self) -> int:
        return self._executing

    @property
    def retained(self) -> int:
        return len(self._completed)

    def get(self, name: str) -> Operation:
        op = self._ops.get(name) or self._completed.get(name)
        if op is None:
            raise NotFound(
                f"no operation {name!r} on node {self.node} (unknown, or completed longer ago "
                f"than the retention of {self.retention:g}s)",
                name=name,
            )
        return op

    def inflight(self, key: str) -> Operation | None:
        """The queued or executing operation for this key, to join instead of running again."""
        return self._by_key.get(key)

    def peek(self) -> Operation | None:
        """The operation :meth:`take` would return."""
        return self._heap[0][2] if self._heap else None

    def __iter__(self) -> Iterator[Operation]:
        """Queued and executing operations, then completed ones (oldest first)."""
        yield from list(self._ops.values())
        yield from list(self._completed.values())

    def check(self) -> None:
        """Assert the invariant: the queue and the map agree, and every count matches."""
        queued = [op for _, _, op in self._heap]
        assert len(set(map(id, queued))) == len(queued), "an operation is queued twice"
        assert all(op.state is State.QUEUED for op in queued), "a queued entry is not in state queued"
        assert all(self._ops.get(op.name) is op for op in queued), "queued but not recorded"
        recorded_queued = [op for op in self._ops.values() if op.state is State.QUEUED]
        assert len(recorded_queued) == len(queued), "recorded as queued but not in the queue"
        executing = [op for op in self._ops.values() if op.state is State.EXECUTING]
        assert len(executing) == self._executing, "executing count is off"
        assert all(op.state is not State.COMPLETED for op in self._ops.values())
        assert all(op.state is State.COMPLETED for op in self._completed.values())
        assert not (self._ops.keys() & self._completed.keys()), "an operation is both live and completed"
        for key, op in self._by_key.items():
            assert op.key == key and self._ops.get(op.name) is op, "de-dup index points at a dead operation"
        shared = [op for op in self._ops.values() if op.key is not None]
        assert len(shared) == len(self._by_key), "a shared operation is missing from the de-dup index"
        assert len(self._completed) <= self.max_retained

    # -- changing ----------------------------------------------------------------------

    def _new(self, key: str | None, priority: int, payload: Any, now: float) -> Operation:
        name = f"{self.node}/{next(self._ids):08d}"
        return Operation(
            name=name, key=key, priority=priority, seq=next(self._seq), created=now, payload=payload
        )

    def admit(
        self,
        key: str | None,
        *,
        priority: int = 0,
        payload: Any = None,
        now: float,
        limit: int | None = None,
    ) -> tuple[Operation, bool]:
        """Join the in-flight operation for ``key``, or queue a new one: ``(op, joined)``.

        A new operation is recorded and queued in the same step. ``limit`` overrides
        the queue limit for this admission (a forwarded action is only taken when a
        slot is free). Raises ResourceExhausted, with a retry hint, when full.
        """
        if key is not None and (existing := self._by_key.get(key)) is not None:
            return existing, True
        limit = self.limit if limit is None else limit
        if len(self._heap) >= limit:
            raise ResourceExhausted(
                f"node {self.node} is full: {self._executing} executing, {len(self._heap)} queued "
                f"(limit {limit}); retry later",
                retry_after=self.retry_after,
                node=self.node,
            )
        op = self._new(key, priority, payload, now)
        self._ops[op.name] = op
        heapq.heappush(self._heap, (-priority, op.seq, op))
        if key is not None:
            self._by_key[key] = op
        self._changed(op)
        return op, False

    def record_completed(
        self, key: str | None, outcome: ExecuteOutcome, *, payload: Any = None, now: float
    ) -> Operation:
        """An operation that completed at once (a cache hit): recorded, never queued."""
        op = self._new(key, 0, payload, now)
        op.state = State.COMPLETED
        op.started = op.finished = now
        op.outcome = outcome
        op.running_on = self.node
        self._retain(op, now)
        self._changed(op)
        return op

    def take(self, now: float) -> Operation | None:
        """Pop the highest-priority queued operation (oldest first) and mark it executing."""
        if not self._heap:
            return None
        _, _, op = heapq.heappop(self._heap)
        op.state = State.EXECUTING
        op.started = now
        self._executing += 1
        self._changed(op)
        return op

    def requeue(self, op: Operation) -> None:
        """Put an executing operation back in the queue, in its old place (its peer failed).

        Allowed past the limit: the operation was admitted already, and the total stays
        bounded by the queue limit plus the operations executing.
        """
        if op.state is not State.EXECUTING or self._ops.get(op.name) is not op:
            raise ValueError(f"{op.name} is not executing")
        op.state = State.QUEUED
        op.started = None
        op.running_on = None
        op.remote = None
        op.scope = None
        self._executing -= 1
        heapq.heappush(self._heap, (-op.priority, op.seq, op))
        self._changed(op)

    def complete(
        self,
        op: Operation,
        *,
        outcome: ExecuteOutcome | None = None,
        error: TriodeError | None = None,
        now: float,
    ) -> None:
        """Finish a queued or executing operation with an outcome or an error."""
        if (outcome is None) == (error is None):
            raise ValueError("complete() takes exactly one of outcome and error")
        if self._ops.get(op.name) is not op:
            return  # completed already (cancelled and finished racing): first one wins
        if op.state is State.QUEUED:
            self._heap = [entry for entry in self._heap if entry[2] is not op]
            heapq.heapify(self._heap)
        else:
            self._executing -= 1
        del self._ops[op.name]
        if op.key is not None:
            del self._by_key[op.key]
        op.state = State.COMPLETED
        op.finished = now
        op.outcome = outcome
        op.error = error
        op.scope = None
        self._retain(op, now)
        self._changed(op)

    def cancel_queued(self, op: Operation, *, now: float, reason: str) -> bool:
        """Remove a queued operation (it completes as Cancelled). False if it is not queued."""
        if op.state is not State.QUEUED or self._ops.get(op.name) is not op:
            return False
        self.complete(op, error=Cancelled(reason, name=op.name), now=now)
        return True

    def touch(self, op: Operation) -> None:
        """Report a change the table does not make itself (waiters, where it runs)."""
        self._changed(op)

    def expire(self, now: float) -> int:
        """Forget completed operations past their retention. Returns how many."""
        gone = 0
        while self._completed:
            op = next(iter(self._completed.values()))
            if op.finished is not None and now - op.finished < self.retention:
                break
            self._completed.popitem(last=False)
            gone += 1
        return gone

    def _retain(self, op: Operation, now: float) -> None:
        self._completed[op.name] = op
        while len(self._completed) > self.max_retained:
            self._completed.popitem(last=False)
        self.expire(now)

    def _changed(self, op: Operation) -> None:
        op.version += 1
        self._on_change(op)
