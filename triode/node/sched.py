"""The sched part of a node: its wire methods, its tasks, and its figures.

Methods (docs/protocol.md, "Methods: sched"): ``execute`` (admission control in
front of the engine; ``sched.execute`` is the same handler), ``sched.submit``,
``sched.get``, ``sched.wait``, ``sched.watch``, ``sched.cancel``, ``sched.list``,
``sched.status``, and between peers ``sched.gossip`` and ``sched.forward``. An
operation's name is ``NODE/NUMBER``; a node asked about another node's operation asks
that node.

The path of an execute: :meth:`SchedPart.h_execute` parses the call once
(:meth:`ExecuteRequest.from_wire <triode.model.result.ExecuteRequest.from_wire>`), then
:meth:`Scheduler.admit_and_wait <triode.sched.scheduler.Scheduler.admit_and_wait>`; the
scheduler calls :class:`EngineExecutor`, which is the engine's ``Executor.lookup`` and
``Executor.run_action``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import msgpack

from ..client import connect
from ..client.cas import RemoteCAS
from ..concurrency import open_service_nursery
from ..errors import BlobNotFound, FailedPrecondition, InvalidArgument, TriodeError
from ..model.digest import Digest
from ..model.result import ExecuteOutcome, ExecuteRequest
from ..model.store import BlobStore
from ..sched.cluster import Cluster
from ..sched.job import Job
from ..sched.metrics import Registry, numeric_leaves
from ..sched.operations import Operation, State
from ..sched.scheduler import Scheduler, outcome_or_raise
from ..wire.connection import Connection, IncomingCall
from .http import serve_metrics

if TYPE_CHECKING:
    from ..engine.executor import Executor
    from .node import Node

__all__ = ["SchedPart", "open_sched", "EngineExecutor"]

log = logging.getLogger("triode.sched")

MAX_LIST = 10_000
#: Bytes of a proxied watch held while one snapshot arrives (a snapshot is far smaller).
WATCH_BUFFER = 8 * 1024 * 1024


class EngineExecutor:
    """The scheduler's executor: this node's engine (``node.parts["engine"].executor``)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def _executor(self) -> Executor:
        engine = self.node.parts.get("engine")
        if engine is None:
            raise FailedPrecondition(f"node {self.node.id} has no engine part: it cannot execute actions")
        return engine.executor  # type: ignore[attr-defined]

    async def lookup(self, job: Job) -> ExecuteOutcome | None:
        # The engine's own answer: it sees results still being written behind, too.
        return await self._executor().lookup(job.action)

    async def run(self, job: Job, *, queued: float = 0.0) -> ExecuteOutcome:
        # The scheduler looked the action cache up at admission (unless told to skip it).
        return await self._executor().run_action(job.action, queued=queued)


#: Inputs at most this big are sent in batches; larger ones are streamed one by one.
SMALL_INPUT = 64 * 1024
#: Bytes of small inputs held in memory at once while pushing.
PUSH_BATCH = 4 * 1024 * 1024


async def push_inputs_from(node: Node, conn: Connection, job: Job) -> None:
    """Before forwarding: upload the inputs the peer lacks from our CAS. A peer that shares
    our backing node finds them there, so it lacks nothing and nothing is sent."""
    storage = node.parts.get("storage")
    local = getattr(storage, "cas", None)
    if local is None:
        return
    remote = RemoteCAS(conn)
    missing = await remote.find_missing(list(job.input_digests()))
    small = [d for d in missing if d.size <= SMALL_INPUT]
    batch: list[tuple[Digest, bytes]] = []
    held = 0
    for digest in small:
        try:
            data = await local.get(digest, limit=SMALL_INPUT)
        except BlobNotFound:
            continue  # the peer reports the input missing, naming it
        batch.append((digest, data))
        held += len(data)
        if held >= PUSH_BATCH:
            await remote.batch_update(batch)
            batch, held = [], 0
    if batch:
        await remote.batch_update(batch)
    for digest in missing:
        if digest.size > SMALL_INPUT:
            try:
                async with local.open_read(digest) as chunks:
                    await remote.put_stream(chunks, digest)
            except BlobNotFound:
                continue


async def pull_outputs_from(node: Node, conn: Connection, outcome: ExecuteOutcome) -> None:
    """Bring the blobs ``outcome`` refers to that our store lacks from the peer at the other
    end of ``conn``: small ones in batch reads of bounded size, large ones streamed into the
    store (never whole in memory), each verified against its digest as it is stored. A peer
    that shares our backing node has written them through, so nothing is fetched.

    Raises BlobNotFound when the peer lacks one, and ConnectionClosed when it goes away.
    """
    storage = node.parts.get("storage")
    local: BlobStore | None = getattr(storage, "cas", None)
    if local is None:
        return
    missing = await local.find_missing(outcome.result.blobs())
    if not missing:
        return
    remote = RemoteCAS(conn)
    small = [d for d in missing if d.size <= SMALL_INPUT]
    start = 0
    while start < len(small):
        batch: list[Digest] = []
        held = 0
        while start < len(small) and (not batch or held + small[start].size <= PUSH_BATCH):
            batch.append(small[start])
            held += small[start].size
            start += 1
        found = await remote.batch_read(batch)
        blobs = []
        for digest in batch:
            data = found.get(digest)
            if data is None:
                raise BlobNotFound(f"blob {digest} of the result is not stored on node {conn.peer.node}",
                                   digest=str(digest))
            blobs.append((digest, data))
        for error in (await local.batch_update(blobs)).values():
            if error is not None:
                raise error
    for digest in missing:
        if digest.size > SMALL_INPUT:
            async with remote.open_read(digest) as chunks:
                await local.put_stream(chunks, digest)


async def adopt_forwarded(node: Node, conn: Connection, job: Job, outcome: ExecuteOutcome) -> None:
    """Make a peer's outcome ours: its blobs in our store, and (when it is worth reusing) its
    result in our action cache, so that the same action asked of this node again is a hit."""
    await pull_outputs_from(node, conn, outcome)
    result = outcome.result
    action = job.action
    if result.exit_code != 0 or result.timed_out or getattr(action, "do_not_cache", True):
        return
    ac = getattr(node.parts.get("storage"), "ac", None)
    if ac is None:
        return
    try:
        await ac.update(outcome.action_digest, result)
    except (TriodeError, OSError) as exc:  # the answer stands; it is just not cached here
        log.warning("could not cache the forwarded result of %s: %s", outcome.action_digest, exc)


class SchedPart:
    """What ``node.parts["sched"]`` holds."""

    name = "sched"

    def __init__(self, node: Node, scheduler: Scheduler, cluster: Cluster, registry: Registry) -> None:
        self.node = node
        self.scheduler = scheduler
        self.cluster = cluster
        self.registry = registry
        self.metrics_address: str | None = None

    def info(self) -> dict[str, Any]:
        info = self.scheduler.info()
        info["peers"] = self.cluster.info()
        info["metrics"] = self.metrics_address
        return info

    def render_metrics(self) -> str:
        """Our metrics, plus every number the other parts report, as gauges."""
        text = self.registry.render()
        lines = []
        for name, part in self.node.parts.items():
            if name == "sched":
                continue
            try:
                leaves = list(numeric_leaves(part.info()))
            except Exception:  # a part's figures must never break the scrape
                log.exception("info() of part %s failed", name)
                continue
            for key, value in leaves:
                metric = f"triode_{name}_{key}"
                lines.append(f"# TYPE {metric} gauge\n{metric} {value:g}")
        uptime = time.time() - self.node.started
        lines.append(f"# TYPE triode_uptime_seconds gauge\ntriode_uptime_seconds {uptime:.3f}")
        return text + "\n".join(lines) + "\n"

    # -- finding an operation ------------------------------------------------------------

    def _owner(self, args: Any) -> tuple[str, str]:
        if not isinstance(args, dict) or not isinstance(args.get("name"), str):
            raise InvalidArgument("expected {name: 'NODE/NUMBER'}: the operation's name")
        name = args["name"]
        owner, sep, _ = name.rpartition("/")
        if not sep or not owner:
            raise InvalidArgument(f"an operation name is NODE/NUMBER, got {name!r}")
        return name, owner

    def _local(self, name: str) -> Operation:
        return self.scheduler.table.get(name)

    # -- handlers ----------------------------------------------------------------------

    async def h_execute(self, call: IncomingCall) -> dict[str, Any]:
        """``execute`` and ``sched.execute``: admit, wait for the outcome, answer it."""
        request = ExecuteRequest.from_wire(call.args, method=call.method)
        op = await self.scheduler.admit_and_wait(Job.of(request), priority=request.priority)
        return replace(outcome_or_raise(op), operation=op.name).to_wire()

    async def h_forward(self, call: IncomingCall) -> dict[str, Any]:
        """``sched.forward``: a peer's job, taken only into a free slot, never forwarded again."""
        request = ExecuteRequest.from_wire(call.args, method=call.method)
        job = Job.of(request, forwarded_from=request.origin or call.peer.node)
        op = await self.scheduler.admit(job, slot_only=True)
        try:
            await call.send(msgpack.packb({"operation": op.name}))
            await self.scheduler.wait(op)
        finally:
            await self.scheduler.leave_and_settle(op)
        return outcome_or_raise(op).to_wire()

    async def h_submit(self, call: IncomingCall) -> dict[str, Any]:
        """``sched.submit``: admit detached, answer the operation map at once."""
        request = ExecuteRequest.from_wire(call.args, method=call.method)
        op = await self.scheduler.admit(Job.of(request), priority=request.priority, detached=True)
        return op.to_wire()

    async def _whole(self, conn: Connection, op: dict[str, Any]) -> dict[str, Any]:
        """An operation map from its owner, once every blob its outcome refers to can be read
        here too: whichever node a client asks, the answer is whole there."""
        wire = op.get("outcome") if isinstance(op, dict) else None
        if wire is not None:
            await pull_outputs_from(self.node, conn, ExecuteOutcome.from_wire(wire))
        return op

    async def h_get(self, call: IncomingCall) -> dict[str, Any]:
        name, owner = self._owner(call.args)
        if owner != self.node.id:
            conn = self.cluster.connection_to(owner)
            return await self._whole(conn, await conn.call("sched.get", {"name": name}))
        return self._local(name).to_wire()

    async def h_wait(self, call: IncomingCall) -> dict[str, Any]:
        name, owner = self._owner(call.args)
        if owner != self.node.id:
            conn = self.cluster.connection_to(owner)
            return await self._whole(conn, await conn.call("sched.wait", {"name": name}))
        op = await self.scheduler.wait(self._local(name))
        return op.to_wire()

    async def h_cancel(self, call: IncomingCall) -> bool:
        name, owner = self._owner(call.args)
        if owner != self.node.id:
            return await self.cluster.connection_to(owner).call("sched.cancel", {"name": name})
        return self.scheduler.cancel(self._local(name), reason=f"{name} was cancelled by {call.peer.node}")

    async def h_watch(self, call: IncomingCall) -> dict[str, Any]:
        name, owner = self._owner(call.args)
        if owner != self.node.id:
            conn = self.cluster.connection_to(owner)
            async with conn.open_call("sched.watch", {"name": name}) as remote:
                unpacker = msgpack.Unpacker(raw=False, max_buffer_size=WATCH_BUFFER)
                async for chunk in remote:
                    unpacker.feed(chunk)
                    for snapshot in unpacker:
                        await call.send(msgpack.packb(await self._whole(conn, snapshot)))
                return await self._whole(conn, await remote.result())
        op = self._local(name)
        async for snapshot in self.scheduler.watch(op):
            await call.send(msgpack.packb(snapshot.to_wire()))
        return op.to_wire()

    async def h_list(self, call: IncomingCall) -> list[dict[str, Any]]:
        args = call.args if isinstance(call.args, dict) else {}
        state = args.get("state")
        limit = args.get("limit", 1000)
        states = {s.value: s for s in State}
        if state is not None and state not in states:
            raise InvalidArgument(f"state must be one of {', '.join(states)}, got {state!r}")
        if type(limit) is not int or not 0 <= limit <= MAX_LIST:
            raise InvalidArgument(f"limit must be an integer from 0 to {MAX_LIST}, got {limit!r}")
        ops = [op for op in self.scheduler.table if state is None or op.state is states[state]]
        return [op.to_wire() for op in ops[:limit]]

    async def h_status(self, call: IncomingCall) -> dict[str, Any]:
        return self.info()

    async def h_gossip(self, call: IncomingCall) -> dict[str, Any]:
        return self.cluster.on_gossip(call.args, observed_host=_remote_host(call.connection))


def _remote_host(conn: Connection) -> str | None:
    """The IP a connection comes from (to fill in a peer that listens on 0.0.0.0)."""
    stream = conn.stream
    while not hasattr(stream, "socket") and hasattr(stream, "transport_stream"):
        stream = stream.transport_stream  # TLS over TCP
    sock = getattr(stream, "socket", None)
    try:
        return str(sock.getpeername()[0]) if sock is not None else None
    except (OSError, IndexError, TypeError):
        return None


@asynccontextmanager
async def open_sched(node: Node) -> AsyncIterator[SchedPart]:
    """The sched part: registers its methods, runs the scheduler, the cluster and --metrics."""
    config = node.config
    registry = Registry()

    async def push(conn: Connection, job: Job) -> None:
        await push_inputs_from(node, conn, job)

    async def adopt(conn: Connection, job: Job, outcome: ExecuteOutcome) -> None:
        await adopt_forwarded(node, conn, job, outcome)

    ssl_context = node.client_ssl_context()

    @asynccontextmanager
    async def dial(address: str, interval: float) -> AsyncIterator[Connection]:
        async with connect(
            address, token=config.token, ssl_context=ssl_context,
            connect_timeout=max(2 * interval, 1.0),
            keepalive_interval=max(interval, 0.25), dead_after=max(6 * interval, 2.0),
            handshake_timeout=max(4 * interval, 2.0),
        ) as client:
            yield client.connection

    cluster = Cluster(
        node=node.id,
        address=lambda: node.address,
        seeds=tuple(config.peers),
        dial=dial,
        push_inputs=push if node.parts.get("storage") is not None else None,
        pull_outputs=adopt if node.parts.get("storage") is not None else None,
    )
    scheduler = Scheduler(
        node=node.id,
        executor=EngineExecutor(node),
        capacity=max(1, config.max_concurrency),
        max_queue=max(0, config.max_queue),
        placement=cluster,
        registry=registry,
    )
    cluster.attach(scheduler)
    part = SchedPart(node, scheduler, cluster, registry)
    routes = {
        "execute": part.h_execute,  # the same method as sched.execute (docs/protocol.md)
        "sched.execute": part.h_execute,
        "sched.forward": part.h_forward,
        "sched.submit": part.h_submit,
        "sched.get": part.h_get,
        "sched.wait": part.h_wait,
        "sched.watch": part.h_watch,
        "sched.cancel": part.h_cancel,
        "sched.list": part.h_list,
        "sched.status": part.h_status,
        "sched.gossip": part.h_gossip,
    }
    for name, handler in routes.items():
        node.router.add(name, handler)
    async with open_service_nursery() as nursery:
        await nursery.start(scheduler.run)
        await nursery.start(cluster.run)
        if config.metrics:
            part.metrics_address = await nursery.start(serve_metrics, config.metrics, part.render_metrics)
        try:
            yield part
        finally:
            nursery.cancel_scope.cancel()

