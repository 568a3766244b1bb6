"""Fake executors and placements: the scheduler tested without processes or sockets."""

from __future__ import annotations

from collections import Counter
from typing import Any

import trio

from triode.errors import TriodeError
from triode.model.digest import Digest
from triode.model.result import ActionResult, ExecuteOutcome
from triode.sched.job import Job, NotAccepted, PeerLost


def job(key: str, *, dedup: bool = True, skip_cache: bool = False, action: Any = None) -> Job:
    return Job(key=key, action=action, wire={"key": key}, skip_cache=skip_cache, dedup=dedup)


def outcome(key: str, *, node: str = "fake", cached: bool = False) -> ExecuteOutcome:
    """What running the job ``key`` gives (its action digest is the digest of the key)."""
    return ExecuteOutcome(Digest.of(key.encode()), cached, ActionResult(0, node=node))


class FakeExecutor:
    """Runs a job by waiting for its gate (``release(key)``), or ``job.action`` seconds."""

    def __init__(self) -> None:
        self.cache: dict[str, ExecuteOutcome] = {}
        self.started: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()
        self.order: list[str] = []
        self.running = 0
        self.max_running = 0
        self.lookups = 0
        self.fail: dict[str, TriodeError] = {}
        self._gates: dict[str, trio.Event] = {}
        self.changed = trio.Event()

    def gate(self, key: str) -> trio.Event:
        return self._gates.setdefault(key, trio.Event())

    def release(self, key: str) -> None:
        self.gate(key).set()

    async def lookup(self, job: Job) -> ExecuteOutcome | None:
        self.lookups += 1
        await trio.lowlevel.checkpoint()
        return self.cache.get(job.key)

    async def run(self, job: Job, *, queued: float = 0.0) -> ExecuteOutcome:
        self.started[job.key] += 1
        self.order.append(job.key)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.changed.set()
        self.changed = trio.Event()
        try:
            if isinstance(job.action, (int, float)):
                await trio.sleep(job.action)
            else:
                await self.gate(job.key).wait()
            if job.key in self.fail:
                raise self.fail[job.key]
            self.finished[job.key] += 1
            return outcome(job.key)
        except trio.Cancelled:
            self.cancelled[job.key] += 1
            raise
        finally:
            self.running -= 1

    async def wait_running(self, n: int) -> None:
        while self.running < n:
            await self.changed.wait()


class FakePlacement:
    """Peers as names with a number of free slots; ``behaviour[peer]`` says how forwards end."""

    def __init__(self, free: dict[str, int]) -> None:
        self.free = dict(free)
        self.behaviour: dict[str, str] = {}  # "ok" | "refuse" | "lose" | "garbage"
        self.forwarded: Counter[str] = Counter()
        self.gates: dict[str, trio.Event] = {}

    def pick(self, job: Job) -> str | None:
        for peer, n in sorted(self.free.items()):
            if n > 0:
                self.free[peer] -= 1
                return peer
        return None

    def spare(self) -> int:
        return sum(self.free.values())

    async def forward(self, peer: str, job: Job, accepted) -> ExecuteOutcome:
        """As a cluster's: the peer's reply, decoded and checked as the cluster does."""
        try:
            how = self.behaviour.get(peer, "ok")
            await trio.lowlevel.checkpoint()
            if how == "refuse":
                self.free[peer] = 0
                raise NotAccepted(peer, "full")
            accepted(f"{peer}/1")
            self.forwarded[peer] += 1
            if how == "lose":
                self.free[peer] = 0
                raise PeerLost(peer, "connection closed")
            await self.gates.setdefault(job.key, trio.Event()).wait()
            if how == "garbage":
                return ExecuteOutcome.from_wire({"action_digest": Digest.of(job.key.encode()).to_wire(),
                                                 "cached": False, "result": {"exit_code": "0"}})
            return ExecuteOutcome.from_wire(outcome(job.key, node=peer).to_wire())
        finally:
            if self.behaviour.get(peer, "ok") == "ok":
                self.free[peer] += 1
