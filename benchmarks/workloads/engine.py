"""Actions: trivial executions end to end, cache hits, and staging of many small inputs.

* ``engine.trivial``: ``true`` as an action (no inputs, a fresh action each time so
  every one runs and writes the action cache), from a client over TCP to a ``triode
  node`` process. Both sides keep the same number of runs in flight. Three figures:
  a node with ``--isolation none`` against a raw ``trio.run_process(["true"])`` loop
  (the engine's own cost; target at least 0.5x); an isolated node (the default)
  against a raw loop of the same bubblewrap sandbox around ``true`` (target at least
  0.5x); and the isolated node against the raw unsandboxed loop, which shows the whole
  price of isolation (no target: the sandbox's namespaces and exec cost more than the
  engine does, see docs/design.md, "Isolation of actions").
* ``engine.cached``: the same action answered from the action cache, against a bare
  ``node.ping`` round trip at the same concurrency (the floor any call pays). Target:
  at least 5,000 hits/s (absolute).
* ``engine.staging``: an action with 1,000 small input files in 10 directories, staged
  by an in-process executor over a disk CAS; the figure is the engine's own staging
  time per file (lookup, lease, directories, hard links), against a bare ``os.link``
  loop making the same tree from the same stored files. Target: at most 50 us per
  file (absolute).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid

import trio

import triode
from triode.engine.executor import Executor
from triode.engine.sandbox import bwrap_prefix, find_bwrap
from triode.engine.workdir import WorkDirs
from triode.model.action import Action, Input
from triode.storage.ac import ActionCache
from triode.storage.disk import DiskCAS

from ..harness import Bench, at_least, at_most, run_concurrently, workload

#: Runs kept in flight by both sides of ``engine.trivial``.
TRIVIAL_CONCURRENCY = 4
#: Calls kept in flight by both sides of ``engine.cached``.
CACHED_CONCURRENCY = 32


@workload("engine.trivial", help="trivial actions/s end to end vs raw loops, with and without isolation")
def trivial(b: Bench) -> None:
    n = 100 if b.quick else 400
    slots = ("--max-concurrency", str(TRIVIAL_CONCURRENCY))  # as many slots as runs in flight
    bwrap = find_bwrap()
    with b.spawn_node(*slots, "--isolation", "none") as bare, b.spawn_node(*slots) as isolated:

        def actions(address: str) -> float:
            async def main() -> float:
                tag = uuid.uuid4().hex
                async with triode.connect(address) as client:

                    async def one(i: int) -> None:
                        outcome = await client.execute(Action(("true",), env={"RUN": f"{tag}-{i}"}))
                        assert outcome.exit_code == 0 and not outcome.cached

                    return n / await run_concurrently(range(n), TRIVIAL_CONCURRENCY, one)

            return trio.run(main)

        def raw(argv: list[str]) -> float:
            async def main() -> float:
                async def one(i: int) -> None:
                    await trio.run_process(argv)

                return n / await run_concurrently(range(n), TRIVIAL_CONCURRENCY, one)

            return trio.run(main)

        note = f"{TRIVIAL_CONCURRENCY} in flight on both sides"
        b.compare("actions/s, --isolation none", "1/s", subject=lambda: actions(bare),
                  baseline=("raw trio.run_process", lambda: raw(["true"])), target=at_least(0.5), note=note)
        if bwrap is None:
            b.progress("  engine.trivial: no bwrap (apt-get install bubblewrap): isolated figures skipped")
            return
        sandbox = [*bwrap_prefix(bwrap, root=os.geteuid() == 0, network="host", protect=()), "--", "true"]
        b.compare("actions/s, isolated (default)", "1/s", subject=lambda: actions(isolated),
                  baseline=("raw loop of the same bwrap sandbox", lambda: raw(sandbox)),
                  target=at_least(0.5), note=note)
        b.compare("actions/s, isolated (default), beside no sandbox", "1/s",
                  subject=lambda: actions(isolated),
                  baseline=("raw trio.run_process", lambda: raw(["true"])), note=note)


@workload("engine.cached", help="action cache hits per second vs bare pings at the same concurrency")
def cached(b: Bench) -> None:
    n = 2000 if b.quick else 10000
    with b.spawn_node() as address:
        action = Action(("true",), env={"CACHED": uuid.uuid4().hex})

        async def prime() -> None:
            async with triode.connect(address) as client:
                await client.execute(action)

        trio.run(prime)

        def subject() -> float:
            async def main() -> float:
                async with triode.connect(address) as client:

                    async def one(i: int) -> None:
                        outcome = await client.execute(action)
                        assert outcome.cached

                    return n / await run_concurrently(range(n), CACHED_CONCURRENCY, one)

            return trio.run(main)

        def baseline() -> float:
            async def main() -> float:
                async with triode.connect(address) as client:

                    async def one(i: int) -> None:
                        await client.ping()

                    return n / await run_concurrently(range(n), CACHED_CONCURRENCY, one)

            return trio.run(main)

        b.compare("cache hits", "hits/s", subject=subject, baseline=("node.ping", baseline),
                  target=at_least(5_000, "hits/s"), note=f"{CACHED_CONCURRENCY} in flight on both sides")


@workload("engine.staging", help="staging time per input file (1,000 files) vs a bare os.link loop")
def staging(b: Bench) -> None:
    files = 1000
    data = b.tmpdir / "staging"
    cas = DiskCAS(data)
    ac = ActionCache(cas, data / "ac")
    workdirs = WorkDirs(data / "work", "bench")
    workdirs.open()
    executor = Executor(cas, ac, workdirs, node_id="bench")
    inputs: dict[str, Input] = {}

    async def fill() -> None:
        for i in range(files):
            digest = await cas.put(f"file {i}\n".encode() * 8)
            inputs[f"d{i % 10}/f{i:04}.txt"] = Input(digest)

    trio.run(fill)
    action = Action(("true",), inputs=inputs)
    sources = {path: cas.path_of(entry.digest) for path, entry in inputs.items()}

    def subject() -> float:
        async def main() -> float:
            outcome = await executor.run_action(action)
            return outcome.result.timings.staging / files * 1e6

        return trio.run(main)

    def baseline() -> float:
        root = data / "raw"
        start = time.perf_counter()
        root.mkdir()
        for d in range(10):
            (root / f"d{d}").mkdir()
        for path, src in sources.items():
            os.link(src, root / path)  # type: ignore[arg-type]
        took = time.perf_counter() - start
        shutil.rmtree(root)
        return took / files * 1e6

    try:
        b.compare("staging per file", "us", subject=subject, baseline=("bare os.link loop", baseline),
                  better="lower", target=at_most(50, "us"))
    finally:
        workdirs.close()
        shutil.rmtree(data, ignore_errors=True)


__all__ = ["trivial", "cached", "staging"]
