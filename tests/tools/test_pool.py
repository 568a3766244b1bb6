"""Tools in warm workers, on bun and on node: every way a tool can behave or misbehave."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from triode.errors import (
    DeadlineExceeded,
    InvalidArgument,
    OutputTooLarge,
    ProcessExit,
    ProtocolError,
    ResourceExhausted,
    RuntimeMissing,
    ToolError,
    ToolNotFound,
)
from triode.procgroup import group_alive
from triode.testing import child_processes, no_leaks
from triode.tools import Runtime, ToolPool, find_runtime, open_tool_pool
from triode.tools.pool import worker_env
from triode.tools.worker import Worker, WorkerSpec, run_worker

from .conftest import in_ci

FIXTURES = Path(__file__).with_name("fixtures")
JS = FIXTURES / "tools.mjs"
TS = FIXTURES / "tools.ts"


async def busy_worker(pool: ToolPool) -> Worker:
    """The worker serving a call, once one is (bounded: a slow machine gets time, not a failure)."""
    with trio.fail_after(20):
        while True:  # noqa: ASYNC110 - polling the pool's workers
            for worker in pool.workers():
                if worker.busy:
                    return worker
            await trio.sleep(0.01)


async def test_javascript_and_typescript_tools(pool: ToolPool) -> None:
    assert await pool.call(JS, "echo", {"a": [1, "two", None], "é": True}) == {
        "a": [1, "two", None],
        "é": True,
    }
    assert await pool.call(JS, "echo") is None
    assert await pool.call(TS, "add", {"a": 2, "b": 3}) == 5
    # types, an enum and an import of ./helper.js that is really helper.ts
    assert await pool.call(TS, "addLater", {"a": 1, "b": 2, "ms": 5}) == {"sum": 3, "mode": "plain"}


async def test_async_tools_and_warm_reuse(pool: ToolPool) -> None:
    assert await pool.call(JS, "sleepy", {"ms": 20}) == {"slept": 20}
    first = await pool.call(JS, "pid")
    assert await pool.call(JS, "pid") == first  # the same warm process serves the next call
    assert pool.info()["workers_started"] == 1


async def test_default_export_object(pool: ToolPool) -> None:
    entry = FIXTURES / "default_object.mjs"
    assert await pool.list_tools(entry) == ["greet", "shout"]
    assert await pool.call(entry, "shout", {"name": "ada"}) == "HELLO, ADA"


@pytest.mark.parametrize(("entry", "tool", "name"), [(JS, "boom", "TypeError"), (TS, "fail", "Error")])
async def test_a_tool_that_throws(pool: ToolPool, entry: Path, tool: str, name: str) -> None:
    before = await pool.call(entry, "pid")
    with pytest.raises(ToolError) as info:
        await pool.call(entry, tool, {"why": "testing", "message": "bad input: testing"})
    err = info.value
    assert err.details["name"] == name
    assert err.details["error_message"] == "bad input: testing"
    assert err.details["tool"] == tool
    assert entry.name in err.details["stack"]
    assert await pool.call(entry, "pid") == before  # a throw is an answer: the worker stays


async def test_thrown_non_errors(pool: ToolPool) -> None:
    with pytest.raises(ToolError, match="just a string"):
        await pool.call(JS, "throwsString")
    with pytest.raises(ToolError, match="ValidationError: field x is required") as info:
        await pool.call(JS, "throwsObject")
    assert info.value.details["name"] == "ValidationError"


async def test_unknown_tool_lists_what_exists(pool: ToolPool) -> None:
    with pytest.raises(ToolNotFound) as info:
        await pool.call(JS, "nope")
    assert "echo" in info.value.details["available"]
    assert "notATool" not in info.value.details["available"]  # not a function, not a tool


@pytest.mark.parametrize("entry", [JS, TS])
async def test_a_tool_that_never_answers(pool: ToolPool, entry: Path) -> None:
    stuck = await pool.call(entry, "pid")
    with pytest.raises(DeadlineExceeded, match="was killed"):
        await pool.call(entry, "hang", timeout=0.5)
    assert not group_alive(stuck)  # the whole group is gone, not just asked to go
    fresh = await pool.call(entry, "pid")
    assert fresh != stuck
    assert await pool.call(entry, "echo" if entry == JS else "add", {"a": 1, "b": 1}) in ({"a": 1, "b": 1}, 2)


@pytest.mark.parametrize("entry", [JS, TS])
async def test_garbage_on_stdout_never_reaches_the_channel(pool: ToolPool, entry: Path) -> None:
    first = await pool.call(entry, "pid")
    assert await pool.call(entry, "garbage") == "clean answer"
    assert await pool.call(entry, "pid") == first  # the same worker, still healthy
    (worker,) = pool.workers()
    assert "garbage" in worker.stderr_tail()  # it went to the log instead


async def test_garbage_written_into_the_channel_replaces_the_worker(pool: ToolPool) -> None:
    first = await pool.call(JS, "pid")
    with pytest.raises(ProtocolError):
        await pool.call(JS, "corrupt")
    assert not group_alive(first)
    assert await pool.call(JS, "pid") != first
    assert await pool.call(JS, "echo", 1) == 1


@pytest.mark.parametrize("entry", [JS, TS])
async def test_process_exit(pool: ToolPool, entry: Path) -> None:
    with pytest.raises(ProcessExit) as info:
        await pool.call(entry, "exit3")
    assert info.value.details["exit_code"] == 3
    assert info.value.details["signal"] is None
    if entry == JS:
        assert "about to exit with 3" in info.value.details["stderr_tail"]
    assert await pool.call(entry, "pid") > 0  # replaced


async def test_timer_and_socket_left_open_after_answering(pool: ToolPool) -> None:
    answer = await pool.call(JS, "lingering")
    assert answer["port"] > 0
    assert await pool.call(JS, "echo", "still serving") == "still serving"
    # the pool fixture checks that closing the pool still stops this worker


async def test_a_worker_that_dies_between_calls_is_reaped_and_replaced(pool: ToolPool) -> None:
    first = await pool.call(JS, "pid")
    (worker,) = pool.workers()  # the warm worker the next call will use
    assert await pool.call(JS, "exitLater") == "answered"
    with trio.fail_after(10):
        await worker.stopped.wait()  # reaped by its owner without waiting for the next call
    assert not group_alive(first)
    assert await pool.call(JS, "pid") != first


async def test_one_shot_with_leftovers_is_reaped(pool: ToolPool) -> None:
    async with no_leaks():
        assert (await pool.call(JS, "lingering", one_shot=True))["port"] > 0
        assert not pool.workers()


async def test_a_lot_of_stderr(pool: ToolPool) -> None:
    assert await pool.call(JS, "chatty", {"lines": 50_000}) == 50_000  # 5 MB through a 64 KiB pipe
    (worker,) = pool.workers()
    with trio.fail_after(10):  # the log is drained by its own task; it catches up
        while worker.log_bytes < 5_000_000:  # noqa: ASYNC110 - polling a counter, bounded
            await trio.sleep(0.01)
    assert len(worker.stderr_tail()) <= pool.config.stderr_tail


async def test_concurrent_calls_beyond_the_pool_size(pool: ToolPool) -> None:
    results: list[int] = []
    most = 0

    async def one(i: int) -> None:
        nonlocal most
        answer = await pool.call(JS, "sleepy", {"ms": 50 + i})
        results.append(answer["slept"])
        most = max(most, len(pool.workers()))

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert sorted(results) == [50 + i for i in range(8)]
    assert most <= pool.config.size
    assert pool.info()["workers_started"] <= pool.config.size


async def test_cancelling_the_caller_kills_the_worker(pool: ToolPool) -> None:
    stuck = await pool.call(JS, "pid")
    async with trio.open_nursery() as nursery:

        async def caller() -> None:
            await pool.call(JS, "hang", timeout=30)

        nursery.start_soon(caller)
        assert (await busy_worker(pool)).pid == stuck
        nursery.cancel_scope.cancel()
    assert not group_alive(stuck)
    assert await pool.call(JS, "pid") != stuck


async def test_output_cap(runtime: str) -> None:
    async with no_leaks(), open_tool_pool(size=1, runtime=runtime, max_output=10_000) as pool:
        assert len(await pool.call(JS, "big", {"size": 5_000})) == 5_000
        first = await pool.call(JS, "pid")
        with pytest.raises(OutputTooLarge):
            await pool.call(JS, "big", {"size": 100_000})
        assert not group_alive(first)
        assert await pool.call(JS, "pid") != first


async def test_input_cap_and_bad_input(pool: ToolPool) -> None:
    with pytest.raises(InvalidArgument):
        await pool.call(JS, "echo", b"bytes are not JSON")
    with pytest.raises(InvalidArgument, match="tool id"):
        await pool.call(JS, "no such; tool")
    assert not pool.workers()  # refused before anything started


async def test_recycle_after_n_calls(runtime: str) -> None:
    async with no_leaks(), open_tool_pool(size=1, runtime=runtime, max_calls=2) as pool:
        pids = [await pool.call(JS, "pid") for _ in range(4)]
    assert pids[0] == pids[1] != pids[2] == pids[3]


async def test_recycle_past_memory_limit(runtime: str) -> None:
    async with no_leaks(), open_tool_pool(size=1, runtime=runtime, max_rss=256 * 1024 * 1024) as pool:
        first = await pool.call(JS, "pid")
        assert await pool.call(JS, "pid") == first
        await pool.call(JS, "grow", {"mb": 300})
        assert await pool.call(JS, "pid") != first
        assert pool.info()["workers_recycled"] == 1


async def test_uncaught_error_fails_the_call_and_recycles(pool: ToolPool) -> None:
    first = await pool.call(JS, "pid")
    with pytest.raises(ToolError, match="thrown from a timer"):
        await pool.call(JS, "strayError")
    assert await pool.call(JS, "pid") != first


async def test_env_reaches_the_tool_and_is_isolated(pool: ToolPool) -> None:
    assert await pool.call(JS, "env", {"name": "GREETING"}, env={"GREETING": "hi"}) == "hi"
    assert await pool.call(JS, "env", {"name": "GREETING"}) is None  # other workers, other env
    os.environ["TRIODE_TEST_SECRET"] = "x"
    try:
        assert await pool.call(JS, "env", {"name": "TRIODE_TEST_SECRET"}) is None  # clean env
    finally:
        del os.environ["TRIODE_TEST_SECRET"]
    with pytest.raises(InvalidArgument, match="not allowed"):
        await pool.call(JS, "env", {"name": "X"}, env={"LD_PRELOAD": "/tmp/evil.so"})


async def test_entrypoints_that_fail_to_load(pool: ToolPool) -> None:
    with pytest.raises(ToolError, match="failed to load"):
        await pool.call(FIXTURES / "throws_on_load.mjs", "x")
    with pytest.raises(ToolError, match="syntax_error.mjs failed to load"):
        await pool.call(FIXTURES / "syntax_error.mjs", "x")
    assert not pool.workers()


async def test_changed_entrypoint_gets_fresh_workers(pool: ToolPool, tmp_path: Path) -> None:
    entry = tmp_path / "changing.mjs"
    entry.write_text("export const version = () => 1;\n")
    assert await pool.call(entry, "version") == 1
    entry.write_text("export const version = () => 2; // now longer\n")
    assert await pool.call(entry, "version") == 2


async def test_no_worker_left_after_the_pool_closes(runtime: str) -> None:
    before = set(child_processes())
    async with no_leaks():
        async with open_tool_pool(size=2, runtime=runtime) as pool:
            await pool.warm(JS)
            await pool.call(JS, "lingering")
            pids = [w.pid for w in pool.workers()]
            assert len(pids) == 2
            async with trio.open_nursery() as nursery:  # a call in flight when the pool closes
                nursery.start_soon(pool.call, JS, "hang")
                await busy_worker(pool)
                nursery.cancel_scope.cancel()
        assert not any(group_alive(pid) for pid in pids)
    assert set(child_processes()) <= before


async def test_one_shot_uses_a_fresh_process_per_call(pool: ToolPool) -> None:
    pids = {await pool.call(JS, "pid", one_shot=True) for _ in range(3)}
    assert len(pids) == 3
    assert not pool.workers()
    assert not any(group_alive(pid) for pid in pids)


async def test_large_input_and_output_round_trip(pool: ToolPool) -> None:
    blob = {"text": "é" * 1_000_000, "list": list(range(50_000))}
    assert await pool.call(JS, "echo", blob) == blob


async def test_timeout_covers_waiting_for_a_worker(runtime: str) -> None:
    async with no_leaks(), open_tool_pool(size=1, runtime=runtime) as pool:
        busy = await pool.call(JS, "pid")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.call, JS, "hang")
            await busy_worker(pool)
            with pytest.raises(DeadlineExceeded, match="no worker .* was free"):
                await pool.call(JS, "echo", 1, timeout=0.3)
            assert group_alive(busy)  # waiting too long kills nobody
            nursery.cancel_scope.cancel()


async def test_too_many_waiting_callers_are_refused(runtime: str) -> None:
    async with no_leaks(), open_tool_pool(size=1, runtime=runtime, max_waiting=1) as pool:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pool.call, JS, "hang")  # holds the only worker
            await busy_worker(pool)
            nursery.start_soon(pool.call, JS, "echo")  # waits
            await trio.testing.wait_all_tasks_blocked()
            assert pool.info()["pools"][0]["waiting"] == 1
            with pytest.raises(ResourceExhausted) as info:
                await pool.call(JS, "echo")
            assert info.value.retry_after is not None
            nursery.cancel_scope.cancel()


async def test_idle_pools_are_closed_past_max_pools(runtime: str) -> None:
    async with no_leaks(), open_tool_pool(size=1, runtime=runtime, max_pools=2) as pool:
        first = await pool.call(JS, "pid", env={"N": "1"})
        await pool.call(JS, "pid", env={"N": "2"})
        await pool.call(JS, "pid", env={"N": "3"})  # the least recently used pool (N=1) goes
        assert [p["env"] for p in pool.info()["pools"]] == [["N"], ["N"]]
        with trio.fail_after(10):
            while group_alive(first):  # noqa: ASYNC110 - its owner stops it in the background
                await trio.sleep(0.01)


async def test_typescript_on_a_node_without_a_type_stripper(tmp_path: Path) -> None:
    try:
        node = find_runtime("node")
    except RuntimeMissing as exc:
        if in_ci():
            pytest.fail(f"node is not installed under CI: {exc}", pytrace=False)
        pytest.skip(str(exc))
    spec = WorkerSpec(runtime=Runtime("node", node.executable, amaro=None), entrypoint=TS, env=worker_env({}))
    async with no_leaks():
        async with trio.open_nursery() as nursery:
            with pytest.raises(RuntimeMissing, match="setup-js"):
                await nursery.start(run_worker, spec)


async def test_a_runtime_that_cannot_start(tmp_path: Path) -> None:
    fake = tmp_path / "bun"
    fake.write_text("not an executable format")
    fake.chmod(0o755)
    spec = WorkerSpec(runtime=Runtime("bun", str(fake)), entrypoint=JS, env=worker_env({}))
    async with no_leaks():
        async with trio.open_nursery() as nursery:
            with pytest.raises(RuntimeMissing, match="cannot start bun"):
                await nursery.start(run_worker, spec)


async def test_idle_workers_are_stopped(runtime: str) -> None:
    async with no_leaks(), open_tool_pool(size=1, runtime=runtime, idle_timeout=0.2) as pool:
        first = await pool.call(JS, "pid")
        (worker,) = pool.workers()
        with trio.fail_after(10):
            await worker.stopped.wait()
        assert not group_alive(first)
        assert await pool.call(JS, "pid") != first


async def test_commonjs_entrypoints(pool: ToolPool) -> None:
    assert await pool.call(FIXTURES / "commonjs.cjs", "hi", 1) == {"hi": 1}
    assert await pool.list_tools(FIXTURES / "commonjs.cjs") == ["hi"]
    assert await pool.call(FIXTURES / "commonjs.cts", "double", 4) == 8
