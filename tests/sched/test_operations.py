"""The operation table: the queue and the operations map can never disagree."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from triode.errors import Cancelled, NotFound, ResourceExhausted, TriodeError
from triode.model.digest import Digest
from triode.model.result import ActionResult, ExecuteOutcome
from triode.sched.operations import OperationTable, State


def outcome(exit_code: int = 0, *, cached: bool = False) -> ExecuteOutcome:
    return ExecuteOutcome(Digest.of(b"action"), cached, ActionResult(exit_code, node="n"))


def test_priority_then_first_come_first_served():
    t = OperationTable(node="n", limit=10)
    a, _ = t.admit("a", priority=0, now=0)
    b, _ = t.admit("b", priority=5, now=0)
    c, _ = t.admit("c", priority=0, now=0)
    d, _ = t.admit("d", priority=5, now=0)
    assert [t.take(1) for _ in range(4)] == [b, d, a, c]
    assert t.take(1) is None
    t.check()


def test_full_queue_is_resource_exhausted_with_retry_hint_and_records_nothing():
    t = OperationTable(node="n", limit=2, retry_after=0.5)
    t.admit("a", now=0)
    t.admit("b", now=0)
    with pytest.raises(ResourceExhausted) as info:
        t.admit("c", now=0)
    assert info.value.retry_after == 0.5
    assert "full" in str(info.value)
    assert t.queued == 2 and len(list(t)) == 2
    assert t.inflight("c") is None
    t.check()
    # Joining an identical operation needs no room.
    op, joined = t.admit("a", now=0)
    assert joined and op.key == "a"


def test_names_say_the_node_and_are_unique():
    t = OperationTable(node="node-x", limit=100)
    names = {t.admit(None, now=0)[0].name for _ in range(50)}
    assert len(names) == 50
    assert all(n.startswith("node-x/") for n in names)


def test_cancel_queued_removes_it_and_completes_it():
    t = OperationTable(node="n", limit=10)
    a, _ = t.admit("a", now=0)
    b, _ = t.admit("b", now=0)
    assert t.cancel_queued(a, now=1, reason="no")
    assert a.state is State.COMPLETED and isinstance(a.error, Cancelled)
    assert t.take(2) is b
    assert not t.cancel_queued(b, now=2, reason="executing: not queued")
    t.check()


def test_requeue_keeps_its_place():
    t = OperationTable(node="n", limit=10)
    a, _ = t.admit("a", now=0)
    b, _ = t.admit("b", now=0)
    assert t.take(1) is a
    t.requeue(a)
    assert t.take(1) is a and t.take(1) is b
    t.check()


def test_retention_is_bounded_in_time_and_count():
    t = OperationTable(node="n", limit=100, retention=10, max_retained=3)
    ops = []
    for i in range(5):
        op, _ = t.admit(str(i), now=i)
        t.take(i)
        t.complete(op, outcome=outcome(i), now=i)
        ops.append(op)
    assert t.retained == 3
    with pytest.raises(NotFound):
        t.get(ops[0].name)
    assert t.get(ops[4].name).outcome == outcome(4)
    t.expire(now=13.5)  # ops 2 and 3 finished at 2 and 3: past 10 s
    assert [op.name for op in t] == [ops[4].name]
    t.check()


def test_cache_hit_is_completed_and_never_queued():
    t = OperationTable(node="n", limit=0)
    op = t.record_completed("k", outcome(cached=True), now=0)
    assert op.state is State.COMPLETED and t.queued == 0 and t.inflight("k") is None
    assert t.get(op.name) is op
    t.check()


def test_the_wire_map_holds_the_outcome_as_execute_answers_it():
    t = OperationTable(node="n", limit=10)
    op = t.record_completed("k", outcome(cached=True), now=0)
    wire = op.to_wire()
    assert wire["outcome"] == {
        "action_digest": Digest.of(b"action").to_wire(), "cached": True,
        "result": ActionResult(0, node="n").to_wire(),
    }
    assert ExecuteOutcome.from_wire(wire["outcome"]) == op.outcome
    assert "error" not in wire


def test_complete_twice_keeps_the_first():
    t = OperationTable(node="n", limit=10)
    op, _ = t.admit("a", now=0)
    t.take(0)
    t.complete(op, outcome=outcome(1), now=1)
    t.complete(op, error=TriodeError("late"), now=2)
    assert op.outcome == outcome(1) and op.error is None
    t.check()


class TableMachine(RuleBasedStateMachine):
    """Any sequence of admissions, takes, requeues, cancels and completions keeps the invariant."""

    def __init__(self) -> None:
        super().__init__()
        self.changes = 0
        self.t = OperationTable(node="n", limit=5, max_retained=4, on_change=self._count)
        self.now = 0.0

    def _count(self, op):
        self.changes += 1

    def _ops(self, state):
        return [op for op in self.t if op.state is state]

    @rule(key=st.one_of(st.none(), st.sampled_from("abcdefg")), priority=st.integers(-2, 2))
    def admit(self, key, priority):
        before = (self.t.queued, self.t.inflight(key) if key else None)
        try:
            op, joined = self.t.admit(key, priority=priority, now=self.now)
        except ResourceExhausted:
            assert self.t.queued == before[0] >= self.t.limit  # a requeue may pass the limit
            return
        if joined:
            assert op is before[1]
        else:
            assert op.state is State.QUEUED and self.t.get(op.name) is op

    @rule()
    def take(self):
        expected = self.t.peek()
        op = self.t.take(self.now)
        assert op is expected
        if op is not None:
            assert op.state is State.EXECUTING

    @precondition(lambda self: any(op.state is State.EXECUTING for op in self.t))
    @rule(data=st.data())
    def requeue(self, data):
        op = data.draw(st.sampled_from(self._ops(State.EXECUTING)))
        self.t.requeue(op)

    @precondition(lambda self: any(not op.done for op in self.t))
    @rule(data=st.data(), fail=st.booleans())
    def complete(self, data, fail):
        op = data.draw(st.sampled_from([op for op in self.t if not op.done]))
        if fail:
            self.t.complete(op, error=TriodeError("boom"), now=self.now)
        else:
            self.t.complete(op, outcome=outcome(), now=self.now)
        assert op.done

    @precondition(lambda self: any(op.state is State.QUEUED for op in self.t))
    @rule(data=st.data())
    def cancel(self, data):
        op = data.draw(st.sampled_from(self._ops(State.QUEUED)))
        assert self.t.cancel_queued(op, now=self.now, reason="test")

    @rule(key=st.sampled_from("xyz"))
    def cache_hit(self, key):
        self.t.record_completed(key, outcome(cached=True), now=self.now)

    @rule(dt=st.floats(0, 1000))
    def time_passes(self, dt):
        self.now += dt
        self.t.expire(self.now)

    @invariant()
    def consistent(self):
        self.t.check()


TestTableMachine = TableMachine.TestCase
TestTableMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
