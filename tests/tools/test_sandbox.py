"""Tool workers in the node's sandbox (triode/node/tools.py): the store out of their reach,
nothing they start outliving them, and their own memory and exit seen through the wrapper."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import trio

import triode
from triode.engine.sandbox import find_bwrap, probe
from triode.errors import ProcessExit
from triode.testing import no_leaks, procs_with
from triode.tools import open_tool_pool

pytestmark = pytest.mark.skipif(find_bwrap() is None, reason="bubblewrap is not installed")

TOOLS = Path(__file__).with_name("fixtures") / "sandbox.mjs"


@pytest.mark.parametrize("isolation", ["auto", "none"])
async def test_a_tool_cannot_write_to_the_store(isolation: str, runtime: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with no_leaks(), triode.open_node(listen="127.0.0.1:0", data=data, isolation=isolation) as node:
        async with triode.connect(node.address) as client:
            blob = await client.cas.put(b"precious\n")
            info = (await client.info())["tools"]
            assert info["isolated"] is (isolation == "auto"), info["isolation_detail"]
            said = [await client.tools.call(TOOLS, "write", {"path": str(path)}, runtime=runtime)
                    for path in (data / "cas" / blob.hash[:2] / "planted", data / "planted")]
            if isolation == "auto":
                assert said == ["EROFS", "EROFS"]
                assert not (data / "planted").exists()
            else:  # the same tool, unsandboxed, writes where the node can: what the sandbox stops
                assert said == ["written", "written"]
            assert await client.cas.get(blob) == b"precious\n"


async def test_what_a_tool_starts_ends_with_its_worker(runtime: str, tmp_path: Path) -> None:
    seconds = f"1000.{secrets.randbelow(10**9):09d}"
    async with no_leaks():
        async with triode.open_node(listen="127.0.0.1:0", data=tmp_path / "data") as node:
            async with triode.connect(node.address) as client:
                assert await client.tools.call(TOOLS, "daemon", {"seconds": seconds}, runtime=runtime)
                with trio.fail_after(10):
                    while not procs_with(seconds):  # noqa: ASYNC110 - polling, bounded
                        await trio.sleep(0.02)
        # The node is closed: its workers stopped, and the namespace each ran in went with it,
        # the daemon (a session of its own, holding none of the worker's pipes) included.
        assert procs_with(seconds) == []


async def test_a_worker_killed_by_a_signal_says_so(runtime: str, tmp_path: Path) -> None:
    async with no_leaks(), triode.open_node(listen="127.0.0.1:0", data=tmp_path / "data") as node:
        async with triode.connect(node.address) as client:
            with pytest.raises(ProcessExit) as info:
                await client.tools.call(TOOLS, "killSelf", runtime=runtime)
            assert (info.value.details["signal"], info.value.details["exit_code"]) == (9, None)
            assert await client.tools.call(TOOLS, "pid", runtime=runtime) == 2  # a new worker, sandboxed


async def test_the_runtimes_own_memory_recycles_a_sandboxed_worker(runtime: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    sandbox = await probe("bwrap", protect=[data], scratch=tmp_path)
    async with no_leaks(), open_tool_pool(
        size=1, runtime=runtime, sandbox=sandbox.around, max_rss=200 * 1024 * 1024
    ) as pool:
        await pool.call(TOOLS, "pid")
        (worker,) = pool.workers()
        assert worker.runtime_pid != worker.pid  # the wrapper leads the group; the runtime is inside
        assert (worker.rss() or 0) > 10 * 1024 * 1024  # the runtime's memory, not bwrap's
        await pool.call(TOOLS, "grow", {"mb": 256})
        await pool.call(TOOLS, "pid")
        assert pool.info()["workers_recycled"] == 1
