"""``execute`` over the wire: a client, a node on TCP, and cancellation crossing between them."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

import triode
from triode.errors import InvalidArgument, InvalidPath, MissingInputs
from triode.model.action import Action
from triode.model.digest import Digest
from triode.model.result import ExecuteOutcome

from .conftest import eventually
from .test_runner import _procs_with, _unique_sleep


async def test_execute_uploaded_inputs_and_hit(
    client: triode.Client, node: triode.Node, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "a.txt").write_text("alpha\n")
    (src / "run.sh").write_text("#!/bin/sh\ncat lib/a.txt lib/a.txt > out.txt\n")
    (src / "run.sh").chmod(0o755)
    (src / "empty").mkdir()
    local = await client.upload_inputs(src, ["lib", "run.sh", "empty"])
    assert set(local.inputs) == {"lib/a.txt", "run.sh"} and local.inputs["run.sh"].executable
    assert local.directories == ["empty"]
    action = Action(("./run.sh",), inputs=local.inputs, directories=tuple(local.directories),
                    outputs=("out.txt",))
    first = await client.execute(action)
    assert first.exit_code == 0 and not first.cached
    [out] = first.result.output_files
    assert out.path == "out.txt" and not out.executable
    assert await client.cas.get(out.digest) == b"alpha\nalpha\n"
    second = await client.execute(action)
    assert second.cached and second.result == first.result
    assert node.parts["engine"].info()["executed"] == 1


async def test_bad_requests_get_typed_errors(client: triode.Client) -> None:
    with pytest.raises(InvalidArgument):
        await client.connection.call("execute", {"action": {"argv": []}})
    with pytest.raises(InvalidPath):
        await client.connection.call("execute", {"action": {"argv": ["true"], "outputs": ["../x"]}})
    with pytest.raises(InvalidArgument):
        await client.connection.call("execute", {"action": {"argv": ["true"]}, "skip_cache": "yes"})
    with pytest.raises(InvalidArgument, match="unknown arguments: priority"):  # unqueued: no priority
        await client.connection.call("engine.execute", {"action": {"argv": ["true"]}, "priority": 1})
    with pytest.raises(InvalidArgument, match="unknown arguments: origin"):  # sched.forward's alone
        await client.connection.call("execute", {"action": {"argv": ["true"]}, "origin": "n"})
    with pytest.raises(MissingInputs):
        await client.execute(Action(("true",), inputs={"x": Digest.of(b"nowhere")}))
    assert await client.ping() >= 0  # and the node goes on serving


async def test_every_execute_method_answers_one_outcome(client: triode.Client, node: triode.Node) -> None:
    args = {"action": Action(("true",), env={"T": "aliases"}).to_wire()}
    unqueued = await client.connection.call("engine.execute", args)
    assert set(unqueued) == {"action_digest", "cached", "result"} and not unqueued["cached"]
    first = ExecuteOutcome.from_wire(unqueued)
    for method in ("execute", "sched.execute"):  # one handler: admission, then the same executor
        reply = await client.connection.call(method, args)
        assert set(reply) == {"action_digest", "cached", "result", "operation"}
        assert reply["cached"] and reply["operation"].startswith(f"{node.id}/")
        expected = ExecuteOutcome(first.action_digest, True, first.result, operation=reply["operation"])
        assert ExecuteOutcome.from_wire(reply) == expected
    assert node.parts["engine"].info()["executed"] == 1


async def test_cancelling_the_caller_kills_the_process_on_the_node(client: triode.Client) -> None:
    marker = _unique_sleep()  # in the sleeper's own command line
    action = Action(("/bin/sh", "-c", f"trap '' TERM; sleep {marker}"), do_not_cache=True)
    with trio.move_on_after(0.5):
        await client.execute(action)
    # The node's grace is the default 5 s (SIGTERM is ignored), then SIGKILL.
    assert await eventually(lambda: not _procs_with(marker), 15)


async def test_engine_info_is_in_node_info(client: triode.Client) -> None:
    info = await client.info()
    assert info["engine"]["work_dirs"] == 0 and "executed" in info["engine"]


async def test_cache_writes_behind_the_answer_go_in_batches(tmp_path: Path) -> None:
    # Results that wait for the writer are written together: one update_many, one thread hop.
    actions = [Action(("true",), env={"I": str(i)}) for i in range(8)]
    async with triode.open_node(listen=None, data=tmp_path / "d") as node:
        engine = node.parts["engine"]
        ac = node.parts["storage"].ac
        batches: list[int] = []
        release = trio.Event()
        update_many = ac.update_many

        async def held_first(entries, **options):  # type: ignore[no-untyped-def]
            batches.append(len(entries))
            if len(batches) == 1:
                await release.wait()  # the writer is busy: the others queue behind it
            return await update_many(entries, **options)

        ac.update_many = held_first
        async with trio.open_nursery() as nursery:
            for action in actions:
                nursery.start_soon(engine.executor.lookup_or_run, action)
        # Every caller has its answer already; the results wait in memory.
        assert engine.info()["cache_writes_pending"] == len(actions)
        assert all([(await engine.executor.lookup_or_run(a)).cached for a in actions])
        release.set()
        assert await eventually(lambda: engine.info()["cache_writes_pending"] == 0, 10)
        assert sum(batches) == len(actions) and len(batches) <= 2
        assert engine.info()["cache_writes"] == len(actions)


async def test_cache_writes_behind_the_answer_are_drained_on_close(tmp_path: Path) -> None:
    actions = [Action(("true",), env={"I": str(i)}) for i in range(20)]
    async with triode.open_node(listen=None, data=tmp_path / "d") as node:
        engine = node.parts["engine"]
        for action in actions:
            assert not (await engine.executor.lookup_or_run(action)).cached
        # Served from memory or from the cache, whichever the write has reached.
        assert all([(await engine.executor.lookup_or_run(a)).cached for a in actions])
    async with triode.open_node(listen=None, data=tmp_path / "d") as node:
        ac = node.parts["storage"].ac
        assert all([await ac.get(a.digest()) is not None for a in actions])
        assert node.parts["engine"].info()["cache_writes_pending"] == 0
