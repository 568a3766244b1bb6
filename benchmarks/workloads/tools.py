"""Tools: a warm worker call against starting a fresh runtime, on bun and on node.

The Go runtime Triode replaces started a bun process per call; the baseline here is
exactly that cold start (``bun -e`` / ``node -e`` printing a JSON answer), measured in
the same run, so the ratio says what warm workers buy on this machine.

Latency percentiles (``tools.latency``, ``tools.oneshot``) are taken the same way on both
sides: the harness's nearest-rank :func:`~benchmarks.harness.percentile` over the same
number of samples per repetition (p50 and p99 from one set of samples), so a p99 is the
same order statistic for Triode and for the baseline.
Target (``tools.latency``): a warm call at least 10x faster than a fresh start, p50 and p99.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import trio

from triode.engine.sandbox import Sandbox, probe
from triode.errors import RuntimeMissing
from triode.tools import find_runtime, open_tool_pool

from ..harness import Bench, at_most, workload

TOOLS = """
export function echo(input) { return input; }
"""
COLD = "const input = JSON.parse(process.argv[1]); console.log(JSON.stringify(input));"
INPUT = {"query": "hello", "n": 3}


def _entrypoint(b: Bench) -> Path:
    path = b.tmpdir / "bench_tools.mjs"
    path.write_text(TOOLS)
    return path


def _runtimes() -> list[tuple[str, str]]:
    found = []
    for name in ("bun", "node"):
        try:
            found.append((name, find_runtime(name).executable))
        except RuntimeMissing as exc:
            print(f"tools: skipping {name}: {exc}")
    return found


def _warm_latencies(entry: Path, runtime: str, calls: int) -> list[float]:
    """Seconds per call on one warm worker (the worker is started before timing)."""

    async def main() -> list[float]:
        async with open_tool_pool(size=1, runtime=runtime) as pool:
            await pool.warm(entry)
            for _ in range(5):
                await pool.call(entry, "echo", INPUT)
            out = []
            for _ in range(calls):
                start = time.perf_counter()
                await pool.call(entry, "echo", INPUT)
                out.append(time.perf_counter() - start)
            return out

    return trio.run(main)


def _cold_latency(executable: str) -> float:
    """Seconds for one fresh runtime to start, answer and exit."""
    start = time.perf_counter()
    done = subprocess.run(
        [executable, "-e", COLD, '{"query":"hello","n":3}'], capture_output=True, check=True
    )
    elapsed = time.perf_counter() - start
    assert done.stdout.strip() == b'{"query":"hello","n":3}'
    return elapsed


@workload(
    "tools.latency",
    help="warm tool call p50/p99 vs fresh bun -e / node -e starts (nearest rank, 200 samples a side)",
)
def latency(b: Bench) -> None:
    entry = _entrypoint(b)
    samples = 30 if b.quick else 200  # on both sides: p99 of 200 is the 3rd largest, of 30 the largest
    for name, executable in _runtimes():

        def warm(name: str = name) -> list[float]:
            return [s * 1000 for s in _warm_latencies(entry, name, samples)]

        def cold(executable: str = executable) -> list[float]:
            return [_cold_latency(executable) * 1000 for _ in range(samples)]

        b.compare_percentiles(
            f"{name} call latency {{p}}",
            "ms",
            samples=samples,
            subject=warm,
            baseline=(f"fresh `{name} -e`, {{p}} of {samples}", cold),
            better="lower",
            target=at_most(0.1),
            note=f"{samples} sequential calls on one warm worker vs {samples} fresh starts",
        )


@workload("tools.throughput", help="tool calls per second with a pool of 2 vs fresh processes 2 at a time")
def throughput(b: Bench) -> None:
    entry = _entrypoint(b)
    total = 200 if b.quick else 1000
    cold_total = 10 if b.quick else 30
    for name, executable in _runtimes():

        def warm(name: str = name) -> float:
            async def main() -> float:
                async with open_tool_pool(size=2, runtime=name) as pool:
                    await pool.warm(entry)
                    remaining = total

                    async def caller() -> None:
                        nonlocal remaining
                        while remaining > 0:
                            remaining -= 1
                            await pool.call(entry, "echo", INPUT)

                    start = time.perf_counter()
                    async with trio.open_nursery() as nursery:
                        for _ in range(4):
                            nursery.start_soon(caller)
                    return total / (time.perf_counter() - start)

            return trio.run(main)

        def cold(executable: str = executable) -> float:
            start = time.perf_counter()
            running: list[subprocess.Popen[bytes]] = []
            for _ in range(cold_total):
                if len(running) == 2:
                    running.pop(0).wait()
                running.append(
                    subprocess.Popen(
                        [executable, "-e", COLD, "{}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                    )
                )
            for proc in running:
                proc.wait()
            return cold_total / (time.perf_counter() - start)

        b.compare(
            f"{name} calls/s, pool of 2",
            "calls/s",
            subject=warm,
            baseline=(f"fresh `{name} -e` per call, 2 at a time", cold),
            better="higher",
            note=f"{total} calls from 4 callers",
        )


@workload(
    "tools.oneshot", help="a one-shot tool call (fresh worker per call) vs a bare fresh bun -e / node -e"
)
def oneshot(b: Bench) -> None:
    entry = _entrypoint(b)
    calls = 5 if b.quick else 20
    sandbox = _node_sandbox(b)

    def one_shots(name: str, **options: Any) -> list[float]:
        async def main() -> list[float]:
            async with open_tool_pool(size=1, runtime=name, one_shot=True, **options) as pool:
                samples = []
                for _ in range(calls):
                    start = time.perf_counter()
                    await pool.call(entry, "echo", INPUT)
                    samples.append((time.perf_counter() - start) * 1000)
                return samples

        return trio.run(main)

    for name, executable in _runtimes():

        def subject(name: str = name) -> list[float]:
            return one_shots(name)

        def cold(executable: str = executable) -> list[float]:
            return [_cold_latency(executable) * 1000 for _ in range(calls)]

        b.compare_percentiles(
            f"{name} one-shot call {{p}}",
            "ms",
            samples=calls,
            subject=subject,
            baseline=(f"fresh `{name} -e`, {{p}} of {calls}", cold),
            percentiles=(50,),
            better="lower",
            note="isolation costs a process start per call; the harness and entrypoint load on top",
        )
        if sandbox is None:
            continue

        def sandboxed(name: str = name) -> list[float]:
            return one_shots(name, sandbox=sandbox.around)

        b.compare_percentiles(
            f"{name} one-shot call {{p}}, in the node's sandbox",
            "ms",
            samples=calls,
            subject=sandboxed,
            baseline=(f"the same without a sandbox, {{p}} of {calls}", subject),
            percentiles=(50,),
            better="lower",
            note="what a node's tool workers pay to start (bwrap, a PID namespace); warm calls pay nothing",
        )


def _node_sandbox(b: Bench) -> Sandbox | None:
    """The sandbox a node on this machine gives its tool workers (None, said, without bwrap)."""

    async def main() -> Sandbox:
        data = b.tmpdir / "tools-data"
        data.mkdir(exist_ok=True)
        return await probe("auto", protect=[data], scratch=b.tmpdir)

    sandbox = trio.run(main)
    if not sandbox.isolated:
        print(f"tools.oneshot: skipping the sandboxed figure: {sandbox.detail}")
        return None
    return sandbox
