"""The scheduler and cluster: forwarding overhead, scaling across nodes, de-duplication fan-in.

Every node is a ``triode node`` process on loopback; the client is this process.

* ``sched.forward``: seconds per trivial action (``true``, a fresh action each time so
  every one runs) submitted one at a time to a node whose only slot is held by a long
  sleep, so each is forwarded to its peer; baseline: the same actions sent straight to
  a single node. The ratio is the price of the extra hop (no target in the issue). A
  second figure does the same with an action that writes a 1 MiB output file, which the
  node that was asked copies from the peer before it answers.
* ``sched.scaling``: throughput of capacity-bound actions that sleep and write a 1 MiB
  output file (2 slots per node, 40 actions per node, all submitted at once to the
  first node) on 2 and 3 nodes against 1 node; the first node copies every forwarded
  action's output before it answers. Target: at least 2.7x at 3 nodes (1.8x at 2). A
  third figure puts 1 node beside a raw ``trio.run_process`` loop keeping 2 of the same
  commands in flight.
* ``sched.dedup``: 1,000 concurrent identical submissions of a 0.5 s action (run
  once, shared by all) from 5 connections, against one submission of it. The
  difference is the cost of 1,000 calls (decode and digest the action, join, answer)
  on client and node sharing 2 cores; the issue sets no target.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import trio

import triode
from triode.model.action import Action
from triode.model.result import ExecuteOutcome

from ..harness import Bench, at_least, workload

SLOTS = 2
SLEEP = 0.2
#: Bytes of the output file the output-writing actions leave (read by the node that was asked).
OUTPUT = 1024 * 1024
#: Sleeps, then writes OUTPUT random bytes to out.bin.
SLEEP_AND_WRITE = f"sleep {SLEEP}; head -c {OUTPUT} /dev/urandom > out.bin"


async def _wait_peers(address: str, count: int) -> None:
    async with triode.connect(address) as client:
        with trio.fail_after(30):
            while True:
                peers = (await client.status())["sched"]["peers"]
                if sum(1 for p in peers if p["state"] == "alive" and p["load"]) >= count:
                    return
                await trio.sleep(0.05)


@contextlib.contextmanager
def _cluster(b: Bench, n: int, *args: str) -> Iterator[list[str]]:
    """``n`` node processes, the first the seed of the others; yields once they see each other."""
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(b.spawn_node(*args))
        addresses = [first]
        for _ in range(n - 1):
            addresses.append(stack.enter_context(b.spawn_node("--peer", first, *args)))
        for address in addresses:
            trio.run(_wait_peers, address, n - 1)
        yield addresses


def _sleep(tag: str, seconds: float = SLEEP) -> Action:
    return Action(argv=("sleep", str(seconds)), env={"TAG": tag}, timeout=120)


def _sleep_and_write(tag: str) -> Action:
    return Action(argv=("sh", "-c", SLEEP_AND_WRITE), env={"TAG": tag}, outputs=("out.bin",), timeout=120)


def _trivial(tag: str) -> Action:
    return Action(("true",), env={"RUN": tag})


def _write_output(tag: str) -> Action:
    return Action(("sh", "-c", f"head -c {OUTPUT} /dev/urandom > out.bin"), env={"RUN": tag},
                  outputs=("out.bin",))


@workload("sched.forward", help="seconds per forwarded trivial action vs the same sent to one node")
def forward(b: Bench) -> None:
    n = 30 if b.quick else 100
    with _cluster(b, 2, "--max-concurrency", "1") as (front, back):

        def run_one_by_one(address: str, make: Callable[[str], Action] = _trivial) -> float:
            async def main() -> float:
                tag = uuid.uuid4().hex
                async with triode.connect(address) as client:
                    start = time.perf_counter()
                    for i in range(n):
                        outcome = await client.operations.execute(make(f"{tag}-{i}"))
                        assert outcome.exit_code == 0 and not outcome.cached
                    took = (time.perf_counter() - start) / n
                    # Whole where it was asked: the output is readable from this node.
                    for f in outcome.result.output_files:
                        assert not await client.cas.find_missing([f.digest])
                    return took

            return trio.run(main)

        async def hold(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
            async with triode.connect(front) as client:
                op = await client.operations.submit(_sleep(uuid.uuid4().hex, 3600))
                task_status.started(op["name"])

        def forwarded(make: Callable[[str], Action]) -> float:
            async def occupy_then_run() -> str:
                async with trio.open_nursery() as nursery:
                    name = await nursery.start(hold)
                async with triode.connect(front) as client:
                    # Another process's state: nothing to wait on but the answer to a poll.
                    while (await client.operations.get(name))["state"] != "executing":  # noqa: ASYNC110
                        await trio.sleep(0.01)
                return name

            name = trio.run(occupy_then_run)
            try:
                return run_one_by_one(front, make)
            finally:
                trio.run(_cancel, front, name)

        b.compare("forwarded action", "s/action", subject=lambda: forwarded(_trivial),
                  baseline=("same action on one node", lambda: run_one_by_one(back)), better="lower")
        b.compare("forwarded action, 1 MiB output file", "s/action", subject=lambda: forwarded(_write_output),
                  baseline=("same action on one node", lambda: run_one_by_one(back, _write_output)),
                  better="lower")


async def _cancel(address: str, name: str) -> None:
    async with triode.connect(address) as client:
        await client.operations.cancel(name)


async def _throughput(address: str, count: int) -> float:
    tag = uuid.uuid4().hex
    async with triode.connect(address) as client:

        async def one(i: int) -> None:
            outcome = await client.operations.execute(_sleep_and_write(f"{tag}-{i}"))
            assert outcome.exit_code == 0 and outcome.result.output_files[0].digest.size == OUTPUT

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
        return count / (time.perf_counter() - start)


@workload("sched.scaling", help="capacity-bound actions/s (sleep, 1 MiB output) on 2 and 3 nodes vs 1 node")
def scaling(b: Bench) -> None:
    per_node = 12 if b.quick else 40
    slots = ("--max-concurrency", str(SLOTS))
    with _cluster(b, 1, *slots) as one, _cluster(b, 2, *slots) as two, _cluster(b, 3, *slots) as three:

        def on(address: str, nodes: int):  # type: ignore[no-untyped-def]
            return lambda: trio.run(_throughput, address, per_node * nodes)

        def raw() -> float:
            async def main() -> float:
                count = per_node
                limiter = trio.CapacityLimiter(SLOTS)

                async def one() -> None:
                    async with limiter:
                        with tempfile.TemporaryDirectory() as work:
                            await trio.run_process(["sh", "-c", SLEEP_AND_WRITE], cwd=work)

                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for _ in range(count):
                        nursery.start_soon(one)
                return count / (time.perf_counter() - start)

            return trio.run(main)

        b.compare("1 node, 2 slots", "actions/s", subject=on(one[0], 1),
                  baseline=("raw trio.run_process, 2 at once", raw))
        # The raw loop writes its file and drops it; the node stores and (on 2 or 3 nodes)
        # copies it to the first node too.
        b.compare("2 nodes, 2 slots each", "actions/s", subject=on(two[0], 2),
                  baseline=("1 node", on(one[0], 1)), target=at_least(1.8))
        b.compare("3 nodes, 2 slots each", "actions/s", subject=on(three[0], 3),
                  baseline=("1 node", on(one[0], 1)), target=at_least(2.7))


@workload("sched.dedup", help="1,000 identical concurrent submissions vs one")
def dedup(b: Bench) -> None:
    waiters = 200 if b.quick else 1000
    per_connection = 200  # under the 256 calls a connection may have in flight

    with b.spawn_node("--max-concurrency", "2") as address:

        def fan_in(count: int) -> float:
            async def main() -> float:
                action = _sleep(uuid.uuid4().hex, 0.5)
                outcomes: list[ExecuteOutcome] = []
                async with contextlib.AsyncExitStack() as stack:
                    clients = [await stack.enter_async_context(triode.connect(address))
                               for _ in range(max(1, -(-count // per_connection)))]

                    async def one(i: int) -> None:
                        outcomes.append(await clients[i % len(clients)].operations.execute(action))

                    start = time.perf_counter()
                    async with trio.open_nursery() as nursery:
                        for i in range(count):
                            nursery.start_soon(one, i)
                    took = time.perf_counter() - start
                assert len({o.operation for o in outcomes}) == 1
                return took

            return trio.run(main)

        b.compare(f"{waiters} waiters on one execution", "s", subject=lambda: fan_in(waiters),
                  baseline=("one waiter", lambda: fan_in(1)), better="lower")
