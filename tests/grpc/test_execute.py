"""grpcio drives the Execution service: results, caching, de-duplication, errors, cancellation,
deadlines, WaitExecution (on the node that owns the operation and on another one)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import trio

import triode
from triode.proto import bytestream_pb2 as bs
from triode.proto import error_details_pb2, operations_pb2
from triode.proto import remote_execution_pb2 as pb
from triode.testing import child_processes, no_leaks
from triode.wire.grpc import encode_message

from ..sched.nodes import wait_for_peers
from .actions import EXECUTE, WAIT, ActionBuilder, digest_of, execute, response_of, stage_of
from .conftest import BYTESTREAM, REAPI, Rpc, status_of

OK = 0


async def read_blob(rpc: Rpc, d: pb.Digest) -> bytes:
    parts = await rpc.stream(
        BYTESTREAM + "Read", bs.ReadRequest(resource_name=f"blobs/{d.hash}/{d.size_bytes}"), bs.ReadResponse
    )
    return b"".join(p.data for p in parts)


async def test_execute_runs_the_action_and_returns_reapi_outputs(rnode: triode.Node, rpc: Rpc) -> None:
    b = ActionBuilder()
    script = (
        b"set -e\n"
        b"test -x in/run.sh && test -L in/link && test -d empty && test ! -x in/a\n"
        b"mkdir -p out/d/e\n"
        b"cat in/link > out/x\n"
        b"echo nested > out/d/f\n"
        b"ln -s x out/l\n"
        b"echo on stdout; echo on stderr >&2\n"
    )
    action = b.action(
        ["sh", "in/run.sh"],
        files={"in/run.sh": (script, True), "in/a": (b"input a\n", False)},
        dirs=("empty",),
        symlinks={"in/link": "a"},
        output_files=("out/x", "out/l"),
        output_directories=("out/d",),
    )
    await b.upload(rpc)
    ops, response = await execute(rpc, action)
    assert [stage_of(op) for op in ops][-1] == pb.ExecutionStage.COMPLETED
    assert pb.ExecutionStage.EXECUTING in [stage_of(op) for op in ops[:-1]]
    assert ops[0].name == ops[-1].name and ops[0].name.startswith(f"{rnode.id}/")
    assert response.status.code == OK and not response.cached_result
    result = response.result
    assert result.exit_code == 0
    assert [(f.path, f.digest.hash) for f in result.output_files] == [("out/x", digest_of(b"input a\n").hash)]
    assert [(s.path, s.target) for s in result.output_file_symlinks] == [("out/l", "x")]
    assert await read_blob(rpc, result.stdout_digest) == b"on stdout\n"
    assert await read_blob(rpc, result.stderr_digest) == b"on stderr\n"
    (out_dir,) = result.output_directories
    tree = pb.Tree.FromString(await read_blob(rpc, out_dir.tree_digest))
    assert [f.name for f in tree.root.files] == ["f"] and [d.name for d in tree.root.directories] == ["e"]
    assert [len(c.files) for c in tree.children] == [0]  # the empty directory "e" comes back
    assert await read_blob(rpc, tree.root.files[0].digest) == b"nested\n"
    assert result.execution_metadata.worker == rnode.id
    meta = result.execution_metadata
    assert (
        meta.worker_start_timestamp.ToNanoseconds()
        <= meta.execution_start_timestamp.ToNanoseconds()
        <= meta.execution_completed_timestamp.ToNanoseconds()
        <= meta.worker_completed_timestamp.ToNanoseconds()
    )
    # Cached now, under the REAPI action digest: the same Execute answers from the cache, and
    # GetActionResult (shared with the HTTP door's /ac/) has it.
    ops, again = await execute(rpc, action)
    assert len(ops) == 1 and again.cached_result and again.result == result
    got = await rpc.unary(
        REAPI + "ActionCache/GetActionResult",
        pb.GetActionResultRequest(action_digest=action),
        pb.ActionResult,
    )
    assert got == result
    # skip_cache_lookup runs it again.
    ops, fresh = await execute(rpc, action, skip_cache=True)
    assert not fresh.cached_result and fresh.result.output_files == result.output_files


async def test_working_directory_and_environment(rpc: Rpc) -> None:
    b = ActionBuilder()
    action = b.action(
        ["sh", "-c", "pwd > made/here; echo $GREETING >> made/here"],
        dirs=("sub",),
        cwd="sub",
        env={"PATH": "/usr/bin:/bin", "GREETING": "hello"},
        output_files=("made/here",),
    )
    await b.upload(rpc)
    _, response = await execute(rpc, action)
    assert response.status.code == OK, response.status
    (out,) = response.result.output_files
    assert out.path == "made/here"  # relative to the working directory, as the command named it
    text = (await read_blob(rpc, out.digest)).decode()
    assert text.splitlines()[0].endswith("/sub") and text.splitlines()[1] == "hello"


async def test_missing_inputs_are_listed(rpc: Rpc) -> None:
    b = ActionBuilder()
    action = b.action(["cat", "in/a", "in/b"], files={"in/a": (b"aaa", False), "in/b": (b"bbb", False)})
    await b.upload(rpc, skip={digest_of(b"aaa").hash, digest_of(b"bbb").hash})
    with pytest.raises(grpc.RpcError) as info:
        await execute(rpc, action)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    failure = error_details_pb2.PreconditionFailure()
    assert status_of(info.value).details[0].Unpack(failure)
    assert sorted(v.subject for v in failure.violations) == sorted(
        f"blobs/{digest_of(x).hash}/3" for x in (b"aaa", b"bbb")
    )
    assert {v.type for v in failure.violations} == {"MISSING"}
    absent = digest_of(b"no such action")
    with pytest.raises(grpc.RpcError) as info:
        await execute(rpc, absent)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_bad_actions_are_invalid_argument(rpc: Rpc) -> None:
    b = ActionBuilder()
    escaping = b.action(["true"], symlinks={"link": "../../etc/passwd"})
    absolute = b.action(["true"], symlinks={"link": "/etc/passwd"})
    empty = b.action([])
    await b.upload(rpc)
    for action in (escaping, absolute, empty):
        with pytest.raises(grpc.RpcError) as info:
            await execute(rpc, action)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()


async def test_failures_and_timeouts_are_not_cached(rpc: Rpc) -> None:
    b = ActionBuilder()
    failing = b.action(["sh", "-c", "echo no; exit 3"])
    slow = b.action(["sleep", "30"], timeout=0.5)
    await b.upload(rpc)
    _, response = await execute(rpc, failing)
    assert response.status.code == OK and response.result.exit_code == 3
    _, response = await execute(rpc, failing)
    assert not response.cached_result
    with trio.fail_after(20):
        _, response = await execute(rpc, slow)
    assert response.status.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert response.result.exit_code != 0
    await_miss = rpc.unary(
        REAPI + "ActionCache/GetActionResult", pb.GetActionResultRequest(action_digest=slow), pb.ActionResult
    )
    with pytest.raises(grpc.RpcError) as info:
        await await_miss
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_identical_executions_share_one_run(rnode: triode.Node, rpc: Rpc) -> None:
    b = ActionBuilder()
    action = b.action(["sh", "-c", "sleep 1; echo once"], output_files=())
    await b.upload(rpc)
    responses: list[pb.ExecuteResponse] = []

    async def one() -> None:
        responses.append((await execute(rpc, action))[1])

    scheduler = rnode.parts["sched"].scheduler  # type: ignore[attr-defined]
    before = scheduler.info()["counters"]
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
    after = scheduler.info()["counters"]
    assert [r.result.exit_code for r in responses] == [0, 0, 0]
    assert after["executed"] - before["executed"] == 1
    assert after["deduplicated"] - before["deduplicated"] == 2
    assert rnode.info()["grpc"]["execution"]["executed"] == 3  # the door's own figures


def _sleeping(tag: str) -> list[int]:
    """Our descendants running ``sleep`` with this tag."""
    found = []
    for pid in child_processes():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tag.encode() in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


async def _wait_until(predicate: Any, within: float = 15.0) -> None:
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - another thread's and the kernel's state
            await trio.sleep(0.05)


async def test_client_cancel_kills_the_run(rnode: triode.Node, rpc: Rpc) -> None:
    b = ActionBuilder()
    action = b.action(["sleep", "300.25"])
    await b.upload(rpc)
    call = rpc.stream_call(EXECUTE, pb.ExecuteRequest(action_digest=action), operations_pb2.Operation)
    got: list[Any] = []

    def consume() -> None:
        try:
            for op in call:
                got.append(op)
        except grpc.RpcError as exc:
            got.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, consume)
        await _wait_until(lambda: _sleeping("300.25"))
        call.cancel()
    assert isinstance(got[-1], grpc.RpcError) and got[-1].code() == grpc.StatusCode.CANCELLED
    await _wait_until(lambda: not _sleeping("300.25"))
    scheduler = rnode.parts["sched"].scheduler  # type: ignore[attr-defined]
    await _wait_until(lambda: scheduler.info()["counters"]["cancelled"] >= 1)


async def test_deadline_cancels_the_run(rnode: triode.Node, rpc: Rpc) -> None:
    b = ActionBuilder()
    action = b.action(["sleep", "300.5"])
    await b.upload(rpc)
    with pytest.raises(grpc.RpcError) as info:
        await rpc.stream(
            EXECUTE, pb.ExecuteRequest(action_digest=action), operations_pb2.Operation, deadline=1.5
        )
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await _wait_until(lambda: not _sleeping("300.5"))


async def test_wait_execution(rnode: triode.Node, rpc: Rpc) -> None:
    b = ActionBuilder()
    action = b.action(["sh", "-c", "sleep 1; echo waited"])
    await b.upload(rpc)
    call = rpc.stream_call(EXECUTE, pb.ExecuteRequest(action_digest=action), operations_pb2.Operation)
    first = await trio.to_thread.run_sync(lambda: next(call))
    assert not first.done
    ops = await rpc.stream(WAIT, pb.WaitExecutionRequest(name=first.name), operations_pb2.Operation)
    response = response_of(ops[-1])
    assert ops[-1].name == first.name and response.result.exit_code == 0
    assert await read_blob(rpc, response.result.stdout_digest) == b"waited\n"
    rest = await trio.to_thread.run_sync(lambda: list(call))
    assert response_of(rest[-1]).result == response.result
    # A name this cluster never gave, or one for a node that is gone (of an action not cached):
    # NOT_FOUND, on which a client executes again.
    never = digest_of(b"never executed")
    for name in ("nonsense", f"node-gone/00000001/{never.hash}-{never.size_bytes}"):
        with pytest.raises(grpc.RpcError) as info:
            await rpc.stream(WAIT, pb.WaitExecutionRequest(name=name), operations_pb2.Operation)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # An operation this node forgot, for an action whose result is cached: answered from the cache.
    forgotten = f"{rnode.id}/99999999/{action.hash}-{action.size_bytes}"
    ops = await rpc.stream(WAIT, pb.WaitExecutionRequest(name=forgotten), operations_pb2.Operation)
    assert response_of(ops[-1]).cached_result


@asynccontextmanager
async def _proxy(target: str) -> AsyncIterator[tuple[str, trio.CancelScope]]:
    """A TCP proxy to ``target``; cancelling the scope it gives drops every connection at once."""
    host, _, port = target.rpartition(":")
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    scope = trio.CancelScope()

    async def pipe(a: trio.SocketStream, b: trio.SocketStream) -> None:
        try:
            while data := await a.receive_some(65536):
                await b.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def handle(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(host, int(port)) as server:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, client, server)
                nursery.start_soon(pipe, server, client)

    async with trio.open_nursery() as nursery:
        with scope:
            nursery.start_soon(trio.serve_listeners, handle, listeners)
            yield f"127.0.0.1:{listeners[0].socket.getsockname()[1]}", scope
        nursery.cancel_scope.cancel()


async def test_a_lost_connection_keeps_the_run_for_wait_execution(rnode: triode.Node, rpc: Rpc) -> None:
    b = ActionBuilder()
    action = b.action(["sh", "-c", "sleep 1.5; echo survived"])
    await b.upload(rpc)
    assert rnode.grpc_address is not None
    names: list[str] = []
    async with _proxy(rnode.grpc_address) as (address, cut):
        through = Rpc(address)
        try:
            call = through.stream_call(
                EXECUTE, pb.ExecuteRequest(action_digest=action), operations_pb2.Operation
            )
            first = await trio.to_thread.run_sync(lambda: next(call))
            names.append(first.name)
            cut.cancel()  # the connection drops: no RST_STREAM, no GOAWAY
            with pytest.raises(grpc.RpcError):
                await trio.to_thread.run_sync(lambda: list(call))
        finally:
            through.close()
    ops = await rpc.stream(WAIT, pb.WaitExecutionRequest(name=names[0]), operations_pb2.Operation)
    response = response_of(ops[-1])
    assert response.result.exit_code == 0 and not response.cached_result
    assert await read_blob(rpc, response.result.stdout_digest) == b"survived\n"


async def test_wait_execution_on_another_node_of_the_cluster(tmp_path: Any) -> None:
    options: dict[str, Any] = {"listen": "127.0.0.1:0", "grpc": "127.0.0.1:0", "max_concurrency": 1}
    async with no_leaks(grace=5), triode.open_node(data=tmp_path / "a", **options) as a:
        async with triode.open_node(data=tmp_path / "b", peers=(a.address,), **options) as b:
            await wait_for_peers([a.address, b.address], 1)  # type: ignore[list-item]
            assert a.grpc_address and b.grpc_address
            on_a, on_b = Rpc(a.grpc_address), Rpc(b.grpc_address)
            try:
                builder = ActionBuilder()
                action = builder.action(["sh", "-c", "sleep 1; echo from a"])
                await builder.upload(on_a)
                call = on_a.stream_call(
                    EXECUTE, pb.ExecuteRequest(action_digest=action), operations_pb2.Operation
                )
                first = await trio.to_thread.run_sync(lambda: next(call))
                assert first.name.startswith(f"{a.id}/")
                ops = await on_b.stream(
                    WAIT, pb.WaitExecutionRequest(name=first.name), operations_pb2.Operation
                )
                response = response_of(ops[-1])
                assert response.result.exit_code == 0
                # The answer is whole on the node that gave it: its blobs are readable there.
                assert await read_blob(on_b, response.result.stdout_digest) == b"from a\n"
                await trio.to_thread.run_sync(lambda: list(call))
            finally:
                on_a.close()
                on_b.close()


async def test_a_stopping_node_refuses_new_calls_and_ends_running_ones(tmp_path: Any) -> None:
    async with no_leaks(grace=5):
        async with triode.open_node(
            listen=None, grpc="127.0.0.1:0", data=tmp_path / "d", shutdown_grace=0.5
        ) as node:
            assert node.grpc_address is not None
            rpc = Rpc(node.grpc_address)
            try:
                b = ActionBuilder()
                action = b.action(["sleep", "300.75"])
                await b.upload(rpc)
                call = rpc.stream_call(
                    EXECUTE, pb.ExecuteRequest(action_digest=action), operations_pb2.Operation
                )
                await _wait_until(lambda: _sleeping("300.75"))
                door = node.parts["grpc"]
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(door.drain, 0.5)  # type: ignore[attr-defined]
                    await trio.sleep(0.05)
                    with pytest.raises(grpc.RpcError) as info:
                        await rpc.unary(
                            REAPI + "Capabilities/GetCapabilities",
                            pb.GetCapabilitiesRequest(),
                            pb.ServerCapabilities,
                        )
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert _sleeping("300.75")  # the drain's grace passed; the call still runs
            except BaseException:
                rpc.close()
                raise
        # Left the block: the node stopped the call, and the run with it.
        try:
            with pytest.raises(grpc.RpcError):
                await trio.to_thread.run_sync(lambda: list(call))
        finally:
            rpc.close()
        assert not _sleeping("300.75")


async def test_the_servers_deadline_answers_deadline_exceeded(rnode: triode.Node, rpc: Rpc) -> None:
    """With a raw h2 client (no client-side deadline of its own): the node's answer when the
    call's grpc-timeout passes, and the run it stops."""
    b = ActionBuilder()
    action = b.action(["sleep", "300.875"])
    await b.upload(rpc)
    assert rnode.grpc_address is not None
    host, _, port = rnode.grpc_address.rpartition(":")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", EXECUTE.encode()),
        (b":authority", b"node"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"grpc-timeout", b"700m"),
    ]
    conn.send_headers(stream_id, headers)
    conn.send_data(
        stream_id,
        encode_message(pb.ExecuteRequest(action_digest=action).SerializeToString()),
        end_stream=True,
    )
    trailers: dict[bytes, bytes] = {}
    async with await trio.open_tcp_stream(host, int(port)) as sock:
        await sock.send_all(conn.data_to_send())
        with trio.fail_after(20):
            while not trailers:
                data = await sock.receive_some(65536)
                assert data, "the node closed the connection"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.TrailersReceived):
                        trailers = dict(event.headers)  # type: ignore[arg-type]
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                await sock.send_all(conn.data_to_send())
    assert trailers[b"grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0]).encode()
    await _wait_until(lambda: not _sleeping("300.875"))
