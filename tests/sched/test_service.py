"""The sched part inside nodes of one process: wire methods, forwarding with inputs, metrics, status."""

from __future__ import annotations

import os
import sys
from contextlib import asynccontextmanager

import pytest
import trio

import triode
from triode.cli.status import render
from triode.errors import InvalidArgument, NotFound
from triode.model.action import Action, Input
from triode.procgroup import open_process_group
from triode.testing import no_leaks

from .nodes import sleep_action, wait_for


@asynccontextmanager
async def two_nodes(tmp_path, **options):
    options.setdefault("max_concurrency", 1)
    async with no_leaks(grace=5), triode.open_node(data=tmp_path / "a", **options) as a:
        async with triode.open_node(data=tmp_path / "b", peers=(a.address,), **options) as b:
            async with a.connect() as ca, b.connect() as cb:
                await wait_for(lambda: _sees(ca, 1), within=20, every=0.05)
                await wait_for(lambda: _sees(cb, 1), within=20, every=0.05)
                yield (a, ca), (b, cb)


async def _sees(client, n):
    peers = (await client.status())["sched"]["peers"]
    return sum(1 for p in peers if p["state"] == "alive" and p["load"]) >= n


async def test_forwarded_action_gets_its_inputs_through_the_forwarding_node(tmp_path):
    async with two_nodes(tmp_path) as ((a, ca), (b, cb)):
        busy = await ca.operations.submit(sleep_action(30, "hold a's slot"))
        await wait_for(lambda: _state(ca, busy["name"], "executing"), within=20, every=0.02)
        data = b"only node a has this\n"
        big = bytes(range(256)) * 1024  # streamed, not batched
        digest, big_digest = await ca.cas.put(data), await ca.cas.put(big)
        assert await cb.cas.find_missing([digest, big_digest]) == [digest, big_digest]
        action = Action(argv=("cat", "in.txt"), inputs={"in.txt": Input(digest), "big": Input(big_digest)},
                        timeout=30)
        with trio.fail_after(30):
            outcome = await ca.operations.execute(action)
        result = outcome.result
        assert result.exit_code == 0 and result.node == b.id
        assert await cb.cas.get(result.stdout.digest) == data
        assert await cb.cas.find_missing([digest, big_digest]) == []
        info = (await ca.status())["sched"]
        assert info["counters"]["forwarded"] == 1
        assert (await cb.status())["sched"]["counters"]["executed_for_peers"] == 1
        # status shows the peer with its load, as a table
        text = render(await ca.status())
        assert b.address in text and "alive" in text
        assert await ca.operations.cancel(busy["name"])


async def _state(client, name, state):
    return (await client.operations.get(name))["state"] == state


async def test_cancelling_the_caller_of_a_forwarded_action_kills_it_on_the_peer(tmp_path):
    marker = tmp_path / "started"
    async with two_nodes(tmp_path) as ((a, ca), (b, cb)):
        busy = await ca.operations.submit(sleep_action(30, "hold"))
        await wait_for(lambda: _state(ca, busy["name"], "executing"), within=20, every=0.02)
        action = Action(argv=("sh", "-c", f"touch {marker}; exec sleep 30"), timeout=60)
        with trio.move_on_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ca.operations.execute, action)
                await wait_for(lambda: trio.Path(marker).exists(), within=20, every=0.02)
                nursery.cancel_scope.cancel()
        await wait_for(lambda: _idle(cb), within=20, every=0.05)
        info = (await cb.status())["sched"]["counters"]
        assert info["cancelled"] == 1
        await ca.operations.cancel(busy["name"])


async def _idle(client):
    s = (await client.status())["sched"]
    return s["executing"] == 0 and s["queued"] == 0


async def test_bad_requests_get_typed_errors_and_the_node_keeps_serving(node, client):
    with pytest.raises(InvalidArgument):
        await client.operations.wait("no-slash")
    with pytest.raises(NotFound, match="not a peer"):
        await client.operations.get("node-elsewhere/00000001")
    with pytest.raises(NotFound, match="no operation"):
        await client.operations.get(f"{node.id}/99999999")
    with pytest.raises(InvalidArgument):
        await client.operations.list("sleeping")
    with pytest.raises(InvalidArgument, match="priority"):
        await client.operations.execute(sleep_action(0, "p"), priority=10**6)
    with pytest.raises(InvalidArgument):
        await client.connection.call("execute", {"action": {"argv": []}, "bogus": 1})
    outcome = await client.operations.execute(Action(argv=("true",)), priority=5)
    assert outcome.exit_code == 0
    listed = await client.operations.list("completed")
    assert [op["name"] for op in listed] == [outcome.operation]


async def test_execute_goes_through_admission_and_cache_hits_take_no_slot(node, client):
    action = Action(argv=("sh", "-c", "echo cached"))
    first = await client.connection.call("execute", {"action": action.to_wire()})
    assert first["cached"] is False and first["operation"].startswith(node.id)
    again = await client.connection.call("execute", {"action": action.to_wire()})
    assert again["cached"] is True
    counters = (await client.status())["sched"]["counters"]
    assert counters["cached"] == 1 and counters["executed"] == 1


async def test_metrics_over_http(tmp_path):
    async with no_leaks(), triode.open_node(metrics="127.0.0.1:0") as node, node.connect() as client:
        await client.operations.execute(Action(argv=("true",)))
        address = node.parts["sched"].metrics_address
        host, port = address.rsplit(":", 1)
        status, body = await _http_get(host, int(port), "/metrics")
        assert status.startswith("HTTP/1.1 200")
        assert "triode_sched_submitted_total 1" in body
        assert "triode_sched_executed_total{origin=\"local\"} 1" in body
        assert 'triode_sched_latency_seconds_bucket{le="+Inf"} 1' in body
        assert "triode_sched_capacity" in body and "triode_engine_executed 1" in body
        status, _ = await _http_get(host, int(port), "/nope")
        assert status.startswith("HTTP/1.1 404")


async def _http_get(host, port, path):
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode().splitlines()[0], body.decode()


async def test_status_command_against_a_node(node):
    argv = [sys.executable, "-m", "triode", "status", "--remote", node.address]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    async with open_process_group(argv, env=env, stderr=None) as proc:
        out = b""
        while chunk := await proc.stdout.receive_some(65536):
            out += chunk
        assert await proc.wait() == 0
    text = out.decode()
    assert node.id in text and "executing" in text and "peers" in text


async def test_an_unreachable_seed_is_suspect_then_dead_and_the_node_still_closes_cleanly():
    async with no_leaks(), triode.open_node(peers=("127.0.0.1:1",)) as node, node.connect() as client:
        async def dead():
            peers = (await client.status())["sched"]["peers"]
            return peers and peers[0]["state"] == "dead"

        await wait_for(dead, within=20, every=0.1)
        outcome = await client.operations.execute(Action(argv=("true",)))  # runs locally meanwhile
        assert outcome.exit_code == 0
