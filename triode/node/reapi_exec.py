"""REAPI's Execution service over the scheduler, and the gRPC door that serves all of REAPI.

**Execute.** A hit in the REAPI action cache (unless ``skip_cache_lookup``) answers at once,
done. Otherwise the action becomes a Triode action (``reapi_action.prepare``: its
Command and input tree read from the CAS) admitted to the scheduler as a job keyed by the
Triode action's digest, exactly as the msgpack door's ``execute``: identical actions in
flight share one execution, the cluster's placement applies, Triode's own action cache
answers without running. The stream says ``QUEUED`` or ``EXECUTING`` at once, ``EXECUTING``
when the run starts, then the done Operation with its ``ExecuteResponse``; a timed-out run
has status ``DEADLINE_EXCEEDED`` (its result attached), other failures of the execution
their mapped status. The REAPI result of a cacheable success (exit 0, not
``do_not_cache``) is written to the REAPI action cache under the REAPI action digest.

**Operation names** are ``NODE/NUMBER/HASH-SIZE``: the scheduler's operation name and the
REAPI action digest; a cache hit is ``cached/HASH-SIZE``. **WaitExecution** works on any
node: a name owned by another node of the cluster is watched there (and the result's blobs
are brought here before the answer). A name no longer known (completed too long ago, or
its node restarted) is answered from the REAPI action cache when the action's result is
there, else ``NOT_FOUND``, on which clients (Bazel) execute again.

**Cancellation.** The caller is a waiter of the operation; a client that cancels its call
(RST_STREAM) or whose deadline passes leaves, and the last waiter leaving cancels the run
and kills its processes. A call whose *connection* was lost keeps its place for
:data:`LINGER` seconds, in the door's nursery, so a client can come back with
WaitExecution; then it leaves too.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, cast

import msgpack
import trio
from google.protobuf import any_pb2  # type: ignore[import-untyped]

from ..client.cas import RemoteCAS
from ..errors import InvalidArgument, NotFound, TriodeError, from_wire
from ..model.digest import Digest
from ..model.result import ExecuteOutcome
from ..proto import operations_pb2
from ..proto import remote_execution_pb2 as pb
from ..sched.job import Job
from ..sched.operations import Operation, State
from ..sched.scheduler import Scheduler
from ..wire.grpc import Code, make_status, status_of
from .grpc import GrpcCall, GrpcServer, Method, serve_grpc
from .reapi import _PREFIX, Reapi, from_digest, reapi_services, to_digest
from .reapi_action import DirectoryCache, Prepared, prepare, to_reapi_result
from .sched import pull_outputs_from

if TYPE_CHECKING:
    from .node import Node

__all__ = ["start_grpc_door", "Execution", "LINGER", "operation_name", "parse_operation_name"]

log = logging.getLogger("triode.grpc")

#: Seconds an Execute whose connection was lost keeps its operation for a WaitExecution.
LINGER = 20.0
#: Bytes of one operation snapshot taken from a peer's sched.watch.
WATCH_BUFFER = 8 * 1024 * 1024
_CACHED = "cached"
_QUEUED = pb.ExecutionStage.QUEUED
_EXECUTING = pb.ExecutionStage.EXECUTING
_COMPLETED = pb.ExecutionStage.COMPLETED


def operation_name(triode_name: str, digest: Digest) -> str:
    return f"{triode_name}/{digest.hash}-{digest.size}"


def parse_operation_name(name: str) -> tuple[str | None, Digest]:
    """(the scheduler's operation name, or None for a cache hit; the REAPI action digest)."""
    head, sep, tail = name.rpartition("/")
    hash_, dash, size = tail.partition("-")
    if not sep or not dash or not size.isdigit() or (head != _CACHED and "/" not in head):
        raise NotFound(f"{name[:200]!r} is not an operation name of this cluster (NODE/NUMBER/HASH-SIZE)",
                       name=name[:200])
    try:
        digest = Digest(hash_, int(size))
    except InvalidArgument:
        raise NotFound(f"{name[:200]!r} is not an operation name of this cluster", name=name[:200]) from None
    return (None if head == _CACHED else head), digest


def _operation(name: str, digest: Digest, stage: Any, response: pb.ExecuteResponse | None = None
               ) -> operations_pb2.Operation:
    metadata = any_pb2.Any()
    metadata.Pack(pb.ExecuteOperationMetadata(stage=stage, action_digest=from_digest(digest)))
    op = operations_pb2.Operation(name=name, metadata=metadata, done=response is not None)
    if response is not None:
        op.response.Pack(response)
    return op


def _priority(request: pb.ExecuteRequest) -> int:
    """REAPI: a lower priority runs sooner; Triode: a higher one does."""
    return max(-1000, min(1000, -request.execution_policy.priority))


class Execution:
    """The Execution service of one node."""

    def __init__(self, node: Node, reapi: Reapi) -> None:
        self.node = node
        self.reapi = reapi
        self.cas = reapi.cas
        sched: Any = node.parts["sched"]
        self.sched = sched
        self.scheduler: Scheduler = sched.scheduler
        self.directories = DirectoryCache()
        self.counters = {"executed": 0, "cache_hits": 0, "lingered": 0, "waits": 0}

    async def _cached(self, digest: Digest) -> pb.ActionResult | None:
        ac = self.reapi.reapi_ac
        if ac is None:
            return None
        raw = await ac.get(digest.hash)
        return None if raw is None else pb.ActionResult.FromString(raw)

    async def _answer_cached(self, digest: Digest, call: GrpcCall) -> bool:
        hit = await self._cached(digest)
        if hit is None:
            return False
        self.counters["cache_hits"] += 1
        response = pb.ExecuteResponse(result=hit, cached_result=True, status=make_status(Code.OK))
        await call.send(_operation(operation_name(_CACHED, digest), digest, _COMPLETED, response))
        return True

    # -- Execute -------------------------------------------------------------------

    async def execute(self, request: pb.ExecuteRequest, call: GrpcCall) -> None:
        digest = to_digest(request.action_digest, "action_digest")
        if not request.skip_cache_lookup and await self._answer_cached(digest, call):
            return
        prepared = await prepare(self.cas, digest, self.directories)
        action = prepared.action
        job = Job(key=str(action.digest()), action=action, wire=action.to_wire(),
                  skip_cache=request.skip_cache_lookup, dedup=not action.do_not_cache)
        op = await self.scheduler.admit(job, priority=_priority(request))
        self.counters["executed"] += 1
        name = operation_name(op.name, digest)
        try:
            await self._follow(op, name, digest, call)
            response = await self._response(op.outcome, op.error, prepared)
            await call.send(_operation(name, digest, _COMPLETED, response))
        finally:
            # Leave as a waiter (the last one out cancels the run), unless the connection was
            # lost: then a task of the door keeps our place a while, for a WaitExecution.
            if not (call.lost and not op.done and self._linger(op, call.server)):
                await self.scheduler.leave_and_settle(op)

    def _linger(self, op: Operation, server: GrpcServer) -> bool:
        """Hand our place as a waiter to a task of the door that leaves after LINGER seconds."""
        try:
            server.nursery.start_soon(self._keep, op, name=f"grpc linger {op.name}")
        except RuntimeError:  # the door is closing: leave now
            return False
        self.counters["lingered"] += 1
        return True

    async def _keep(self, op: Operation) -> None:
        try:
            with trio.move_on_after(LINGER):
                await self.scheduler.wait(op)
        finally:
            await self.scheduler.leave_and_settle(op)

    async def _follow(self, op: Operation, name: str, digest: Digest, call: GrpcCall) -> None:
        """Tell the client each stage the operation goes through, until it completes."""
        stage = None
        while not op.done:
            now = _QUEUED if op.state is State.QUEUED else _EXECUTING
            if now != stage:
                stage = now
                await call.send(_operation(name, digest, now))
            if op.state is State.QUEUED:
                watch = cast(AsyncGenerator[Operation, None], self.scheduler.watch(op))
                async with aclosing(watch) as changes:
                    async for snapshot in changes:
                        if snapshot.state is not State.QUEUED:
                            break
            else:
                await self.scheduler.wait(op)

    async def _response(
        self, outcome: ExecuteOutcome | None, error: TriodeError | None, prepared: Prepared
    ) -> pb.ExecuteResponse:
        if error is not None or outcome is None:
            return pb.ExecuteResponse(status=status_of(error or TriodeError("the operation has no outcome")))
        result = outcome.result
        reapi_result = await to_reapi_result(self.cas, prepared, result)
        status = make_status(Code.OK)
        if result.timed_out:
            status = make_status(Code.DEADLINE_EXCEEDED, f"the action ran past its timeout of "
                                 f"{prepared.timeout or 0:g}s and was stopped")
        elif result.exit_code == 0 and not prepared.do_not_cache and self.reapi.reapi_ac is not None:
            raw = reapi_result.SerializeToString()
            try:
                await self.reapi.reapi_ac.update(prepared.action_digest.hash, raw)
            except (TriodeError, OSError) as exc:  # the answer stands; it is just not cached
                log.warning("could not cache the REAPI result of %s: %s", prepared.action_digest, exc)
        return pb.ExecuteResponse(result=reapi_result, cached_result=outcome.cached, status=status)

    # -- WaitExecution ---------------------------------------------------------------

    async def wait_execution(self, request: pb.WaitExecutionRequest, call: GrpcCall) -> None:
        self.counters["waits"] += 1
        triode_name, digest = parse_operation_name(request.name)
        if triode_name is None:
            if not await self._answer_cached(digest, call):
                raise NotFound(f"operation {request.name[:200]!r} is not known here", name=request.name[:200])
            return
        owner = triode_name.rpartition("/")[0]
        try:
            if owner == self.node.id:
                op = self.scheduler.table.get(triode_name)
            else:
                await self._wait_remote(owner, triode_name, request.name, digest, call)
                return
        except NotFound:
            if await self._answer_cached(digest, call):
                return
            raise NotFound(f"operation {request.name[:200]!r} is not known (it completed long ago, or its "
                           "node restarted): execute the action again", name=request.name[:200]) from None
        prepared = await prepare(self.cas, digest, self.directories, inputs=False)
        await self._follow(op, request.name, digest, call)
        await call.send(_operation(request.name, digest, _COMPLETED,
                                   await self._response(op.outcome, op.error, prepared)))

    async def _wait_remote(
        self, owner: str, triode_name: str, name: str, digest: Digest, call: GrpcCall
    ) -> None:
        conn = self.sched.cluster.connection_to(owner)
        # The Action and Command were uploaded to the owner: read them there if not here.
        prepared = await prepare(_Either(self.cas, RemoteCAS(conn)), digest, self.directories, inputs=False)
        stage = None
        async with conn.open_call("sched.watch", {"name": triode_name}) as remote:
            unpacker = msgpack.Unpacker(raw=False, max_buffer_size=WATCH_BUFFER)
            async for chunk in remote:
                unpacker.feed(chunk)
                for snapshot in unpacker:
                    state = snapshot.get("state") if isinstance(snapshot, dict) else None
                    now = _QUEUED if state == State.QUEUED.value else _EXECUTING
                    if state != State.COMPLETED.value and now != stage:
                        stage = now
                        await call.send(_operation(name, digest, now))
            final = await remote.result()
        if not isinstance(final, dict):
            raise InvalidArgument(f"node {owner} answered sched.watch with {type(final).__name__}")
        error = final.get("error")
        if isinstance(error, dict):
            details = error.get("details")
            peer_error = from_wire(str(error.get("code")), str(error.get("message", "")),
                                   details if isinstance(details, dict) else {})
            response = pb.ExecuteResponse(status=status_of(peer_error))
        else:
            outcome = ExecuteOutcome.from_wire(final.get("outcome"))
            await pull_outputs_from(self.node, conn, outcome)
            response = await self._response(outcome, None, prepared)
        await call.send(_operation(name, digest, _COMPLETED, response))


class _Either:
    """Reads from the local store, and what it lacks from a peer's."""

    def __init__(self, local: Any, remote: RemoteCAS) -> None:
        self.local = local
        self.remote = remote

    async def batch_read(self, digests: list[Digest]) -> dict[Digest, bytes | None]:
        found: dict[Digest, bytes | None] = await self.local.batch_read(digests)
        lacking = [d for d, data in found.items() if data is None]
        if lacking:
            found.update(await self.remote.batch_read(lacking))
        return found


async def start_grpc_door(node: Node, nursery: trio.Nursery) -> GrpcServer:
    """Serve REAPI on ``node.config.grpc`` in ``nursery`` (the node's serving nursery, closed
    before the parts). The door is ``node.parts["grpc"]`` for ``node.info()`` and the metrics."""
    executions: list[Execution] = []

    def execution(r: Reapi) -> dict[str, Method]:
        """Execute and WaitExecution, when the node can execute (an engine and a scheduler)."""
        if not r.exec_enabled:
            return {}
        e = Execution(node, r)
        executions.append(e)
        return {
            f"{_PREFIX}Execution/Execute": Method(pb.ExecuteRequest, e.execute),
            f"{_PREFIX}Execution/WaitExecution": Method(pb.WaitExecutionRequest, e.wait_execution),
        }

    services = reapi_services(node, execution)
    server: GrpcServer = await nursery.start(serve_grpc, node, services)
    for e in executions:
        server.counters.append(lambda e=e: {"execution": dict(e.counters)})  # type: ignore[misc]
    node.parts.setdefault(server.name, server)
    return server
