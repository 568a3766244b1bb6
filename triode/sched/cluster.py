"""The cluster as one node sees it: links to peers, gossip of membership and load, forwarding.

One link task per known peer keeps a connection to it and exchanges ``sched.gossip``
every ``interval`` seconds and soon after our load changes; the reply is the peer's
own view, so each exchange is a heartbeat both ways. Peers named in a reply are
dialled too. Forwarding uses the same connection: ``sched.forward`` streams one
"accepted" chunk once the peer has taken the job, which is how a failure before
acceptance (place it again) is told from a failure during execution (retry
elsewhere, up to a limit). Every task lives in the nursery of :meth:`Cluster.run`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgpack
import trio

from ..errors import (
    BlobNotFound,
    ConnectionClosed,
    NotFound,
    ResourceExhausted,
    TriodeError,
    Unavailable,
    Unimplemented,
)
from ..model.result import ExecuteOutcome
from ..wire.connection import Connection
from ..wire.transport import format_address, parse_address
from .job import Job, NotAccepted, PeerLost
from .peers import Membership, Peer, PeerState

__all__ = ["Cluster"]

log = logging.getLogger("triode.sched.cluster")

PushInputs = Callable[[Connection, Job], Awaitable[None]]
#: Brings what a peer's outcome refers to (stdout, stderr, outputs) into this node's store
#: over the peer's connection, so that the answer this node gives refers only to blobs it
#: can serve itself (docs/design.md, "A forwarded result is whole where it was asked").
PullOutputs = Callable[[Connection, Job, ExecuteOutcome], Awaitable[None]]
#: Opens a connection to the peer at ADDRESS, with liveness timers scaled to the gossip
#: interval (the second argument). The node supplies it: the cluster knows no client.
Dial = Callable[[str, float], AbstractAsyncContextManager[Connection]]


def _reachable(address: str, observed_host: str) -> str:
    try:
        host, port = parse_address(address)
    except TriodeError:
        return address
    if host in ("0.0.0.0", "::", ""):
        return format_address(observed_host, port)
    return address


class Cluster:
    """Peers, their load, and forwarding to them. Implements the scheduler's Placement."""

    def __init__(
        self,
        *,
        node: str,
        address: Callable[[], str | None],
        seeds: tuple[str, ...] = (),
        dial: Dial,
        interval: float = 0.5,
        push_inputs: PushInputs | None = None,
        pull_outputs: PullOutputs | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.interval = interval
        #: Our own address, read when needed: a node listens only once its parts are up.
        self.address = address
        self.membership = Membership(me=node, my_address=address(), seeds=seeds, interval=interval, rng=rng)
        self.dial = dial
        self.push_inputs = push_inputs
        self.pull_outputs = pull_outputs
        self.load: Callable[[], dict[str, int]] = dict
        self.poke: Callable[[], None] = lambda: None
        self.load_changed: Callable[[], Awaitable[None]] | None = None
        self._conns: dict[str, Connection] = {}
        self._kicks: dict[str, trio.Event] = {}
        self._nursery: trio.Nursery | None = None

    def attach(self, scheduler: Any) -> None:
        """Read load from, and report peer changes to, this node's scheduler."""
        self.load = scheduler.load
        self.poke = scheduler.poke
        self.load_changed = scheduler.load_changed

    def info(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        return [peer.view(now) for peer in self.membership]

    # -- running -----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for peer in self.membership:
                self._start_link(peer)
            nursery.start_soon(self._age)
            if self.load_changed is not None:
                nursery.start_soon(self._gossip_on_change)
            task_status.started()
            await trio.sleep_forever()

    def _start_link(self, peer: Peer) -> None:
        if self._nursery is not None and peer.address not in self._kicks:
            self._kicks[peer.address] = trio.Event()
            self._nursery.start_soon(self._link, peer, name=f"triode.sched.link {peer.address}")

    def _known(self, peer: Peer) -> bool:
        return self.membership.peers.get(peer.address) is peer

    async def _link(self, peer: Peer) -> None:
        address = peer.address
        try:
            while self._known(peer):
                try:
                    async with self.dial(address, self.interval) as conn:
                        self._conns[address] = conn
                        peer.connected = True
                        await self._gossip(peer, conn)
                except (TriodeError, OSError, trio.BrokenResourceError) as exc:
                    log.debug("link to %s: %s", address, exc)
                finally:
                    self._conns.pop(address, None)
                    self.membership.lost(address, trio.current_time())
                    self.poke()
                # Dial again soon while it may come back, rarely once it is dead.
                await trio.sleep(self.interval if peer.state is not PeerState.DEAD else 4 * self.interval)
        finally:
            self._kicks.pop(address, None)

    async def _gossip(self, peer: Peer, conn: Connection) -> None:
        while self._known(peer) and not conn.closed:
            kick = self._kicks[peer.address] = trio.Event()
            with trio.move_on_after(max(3 * self.interval, 1.0)):
                reply = await conn.call("sched.gossip", self._message())
                self._heard(peer.address, reply)
            with trio.move_on_after(self.interval):
                await kick.wait()

    def _heard(self, address: str, message: Any) -> None:
        if not isinstance(message, dict):
            return
        for new in self.membership.heard(address, message, trio.current_time()):
            self._start_link(new)
        self.poke()

    async def _gossip_on_change(self) -> None:
        assert self.load_changed is not None
        while True:
            await self.load_changed()
            await trio.sleep(min(0.05, self.interval))  # coalesce a burst of changes into one message
            for kick in list(self._kicks.values()):
                kick.set()

    async def _age(self) -> None:
        while True:
            await trio.sleep(self.interval / 2)
            before = {p.address: p.state for p in self.membership}
            self.membership.tick(trio.current_time())
            if before != {p.address: p.state for p in self.membership}:
                self.poke()

    # -- serving -----------------------------------------------------------------------

    def on_gossip(self, message: Any, *, observed_host: str | None = None) -> dict[str, Any]:
        """A peer's gossip call: learn from it, answer with our own view.

        A peer listening on a wildcard address (0.0.0.0, ::) is reached at the host its
        call came from.
        """
        if isinstance(message, dict):
            address = message.get("address")
            if isinstance(address, str) and observed_host:
                address = message["address"] = _reachable(address, observed_host)
            if isinstance(address, str) and message.get("node") != self.node:
                self.membership.discover(address, trio.current_time())
                peer = self.membership.peers.get(address)
                if peer is not None:
                    self._heard(address, message)
                    self._start_link(peer)
        return self._message()

    def _message(self) -> dict[str, Any]:
        self.membership.my_address = self.address()
        return self.membership.message(self.load())

    def connection_to(self, node: str) -> Connection:
        """Our connection to the peer with this node id (to ask it about its operations)."""
        peer = self.membership.by_node(node)
        if peer is None:
            raise NotFound(f"node {node} is not a peer of node {self.node}", node=node)
        conn = self._conns.get(peer.address)
        if conn is None or conn.closed:
            raise Unavailable(
                f"node {node} ({peer.address}) cannot be reached from node {self.node} right now", node=node
            )
        return conn

    # -- placement ---------------------------------------------------------------------

    def pick(self, job: Job) -> str | None:
        peer = self.membership.pick()
        return peer.address if peer is not None else None

    def spare(self) -> int:
        return sum(peer.free for peer in self.membership.candidates())

    async def forward(self, address: str, job: Job, accepted: Callable[[str], None]) -> ExecuteOutcome:
        conn, outcome = await self._run_on(address, job, accepted)
        if self.pull_outputs is not None:
            # After the peer's slot is released: it is free for others while we copy.
            try:
                await self.pull_outputs(conn, job, outcome)
            except (BlobNotFound, ConnectionClosed, Unavailable) as exc:
                # The peer answered but cannot hand over what it made (gone, evicted, its
                # store failed): the result is of no use here; run the action elsewhere.
                if isinstance(exc, ConnectionClosed):
                    self.membership.lost(address, trio.current_time())
                raise PeerLost(address, f"its outputs cannot be read: {exc}") from None
        return outcome

    async def _run_on(
        self, address: str, job: Job, accepted: Callable[[str], None]
    ) -> tuple[Connection, ExecuteOutcome]:
        peer = self.membership.peers.get(address)
        was_accepted = refused = False
        try:
            conn = self._conns.get(address)
            if peer is None or conn is None or conn.closed:
                refused = True
                raise NotAccepted(address, "no connection to it")
            try:
                if self.push_inputs is not None and job.input_digests():
                    try:
                        await self.push_inputs(conn, job)
                    except TriodeError as exc:  # full disk, size limit there: run it elsewhere
                        refused = True
                        raise NotAccepted(address, f"could not send it the inputs: {exc}") from None
                args = {"action": job.wire, "skip_cache": job.skip_cache, "origin": self.node}
                async with conn.open_call("sched.forward", args) as call:
                    first = await call.receive()
                    if first is not None:
                        was_accepted = True
                        self.membership.accepted(peer)
                        message = msgpack.unpackb(first)
                        accepted(str(message.get("operation", "")) if isinstance(message, dict) else "")
                    return conn, ExecuteOutcome.from_wire(await call.result())
            except ResourceExhausted as exc:
                if was_accepted:
                    raise
                refused = True
                raise NotAccepted(address, str(exc)) from None
            except (ConnectionClosed, Unavailable, Unimplemented) as exc:
                if was_accepted:
                    if isinstance(exc, ConnectionClosed):
                        self.membership.lost(address, trio.current_time())
                        raise PeerLost(address, str(exc)) from None
                    raise
                refused = True
                raise NotAccepted(address, str(exc)) from None
        finally:
            # A peer that did not take the job counts as full until it next reports, so a
            # failing peer is never retried in a tight loop.
            if peer is not None:
                self.membership.ended(peer, was_accepted=was_accepted, refused=refused)
            self.poke()
