"""Tools over the wire: a node serves tools.call from its pools; client.tools and the CLI use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

import triode
from triode.errors import DeadlineExceeded, InvalidArgument, InvalidPath, ToolError, ToolNotFound
from triode.procgroup import group_alive

FIXTURES = Path(__file__).with_name("fixtures")
JS = FIXTURES / "tools.mjs"
TS = FIXTURES / "tools.ts"


async def test_client_calls_tools_on_the_node(client: triode.Client, runtime: str) -> None:
    assert await client.tools.call(JS, "echo", {"x": [1, 2]}, runtime=runtime) == {"x": [1, 2]}
    assert await client.tools.call(str(TS), "add", {"a": 40, "b": 2}, runtime=runtime) == 42
    assert "echo" in await client.tools.list(JS, runtime=runtime)


async def test_typed_errors_cross_the_wire(client: triode.Client, runtime: str) -> None:
    with pytest.raises(ToolError) as info:
        await client.tools.call(JS, "boom", {"why": "wire"}, runtime=runtime)
    assert info.value.details["name"] == "TypeError"
    assert info.value.details["error_message"] == "bad input: wire"
    assert "tools.mjs" in info.value.details["stack"]
    with pytest.raises(ToolNotFound) as missing:
        await client.tools.call(JS, "nope", runtime=runtime)
    assert "echo" in missing.value.details["available"]
    with pytest.raises(DeadlineExceeded):
        await client.tools.call(JS, "hang", runtime=runtime, timeout=0.5)
    with pytest.raises(InvalidArgument, match="not allowed"):
        await client.tools.call(JS, "env", {"name": "X"}, runtime=runtime, env={"NODE_OPTIONS": "--x"})
    with pytest.raises(InvalidPath, match="absolute"):
        await client.tools.call("relative/tools.mjs", "echo", runtime=runtime)
    assert (
        await client.tools.call(JS, "echo", "the node still serves", runtime=runtime)
        == "the node still serves"
    )


async def test_cancelled_caller_kills_the_worker_on_the_node(
    node: triode.Node, client: triode.Client, runtime: str
) -> None:
    env = {"CANCEL_TEST": "1"}  # a pool of its own, so its one worker is the one we cancel
    pool = node.parts["tools"].pool  # type: ignore[attr-defined]

    async def hang() -> None:
        await client.tools.call(JS, "hang", runtime=runtime, env=env)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang)
        with trio.fail_after(20):
            while not any(w.busy for w in pool.workers()):  # noqa: ASYNC110 - polling, bounded
                await trio.sleep(0.01)
        (worker,) = pool.workers()
        nursery.cancel_scope.cancel()
    with trio.fail_after(10):  # the CANCEL travels to the node, which kills the group
        await worker.stopped.wait()
    assert not group_alive(worker.pid)
    assert await client.tools.call(JS, "echo", 1, runtime=runtime, env=env) == 1
    info = (await client.info())["tools"]
    assert info["workers_replaced"] >= 1
    assert any(p["env"] == ["CANCEL_TEST"] for p in info["pools"])


def _cli(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRIODE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "triode", "tool", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_cli_embedded(tmp_path: Path) -> None:
    done = _cli("call", str(TS), "add", "--input", '{"a": 1, "b": 2}', "--runtime", "node", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == 3
    failed = _cli("call", str(JS), "boom", "--input", '{"why": "cli"}', "--runtime", "node", home=tmp_path)
    assert failed.returncode == 1
    assert "TypeError: bad input: cli" in failed.stderr
    slow = _cli("call", str(JS), "hang", "--timeout", "0.5", "--runtime", "node", home=tmp_path)
    assert slow.returncode == 124, slow.stderr


async def test_cli_remote(node: triode.Node, runtime: str, tmp_path: Path) -> None:
    assert node.address is not None
    done = await trio.run_process(
        [
            sys.executable,
            "-m",
            "triode",
            "tool",
            "call",
            str(JS),
            "echo",
            "--input",
            '{"via": "remote"}',
            "--runtime",
            runtime,
            "--remote",
            node.address,
            "--compact",
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**os.environ, "TRIODE_HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"via": "remote"}


async def test_bad_arguments_are_refused_and_the_node_serves_on(client: triode.Client) -> None:
    with pytest.raises(InvalidArgument, match="map of arguments"):
        await client.connection.call("tools.call", [1, 2])
    with pytest.raises(InvalidArgument, match="does not take bogus"):
        await client.connection.call("tools.call", {"entrypoint": str(JS), "tool": "echo", "bogus": 1})
    with pytest.raises(InvalidArgument, match="needs an entrypoint"):
        await client.connection.call("tools.call", {"tool": "echo"})
    with pytest.raises(InvalidArgument, match="JSON"):
        await client.tools.call(JS, "echo", b"bytes are not JSON")
    with pytest.raises(InvalidArgument, match="runtime"):
        await client.tools.call(JS, "echo", runtime="deno")
    with pytest.raises(InvalidArgument, match="one_shot"):
        await client.connection.call("tools.call", {"entrypoint": str(JS), "tool": "echo", "one_shot": "yes"})
    assert await client.ping() >= 0


async def test_numbers_come_back_as_javascript_sees_them(client: triode.Client, runtime: str) -> None:
    # 2**64-1 fits msgpack but not a double: JavaScript rounds it up, past what msgpack can
    # carry as an integer, so it comes back as a float rather than failing the reply.
    back = await client.tools.call(JS, "echo", [2**64 - 1, 2**53, 1.5], runtime=runtime)
    assert back == [2.0**64, 2**53, 1.5]
