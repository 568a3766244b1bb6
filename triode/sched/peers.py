"""Membership and load of the peers of one node, and power-of-two-choices placement (sans-I/O).

A peer is known by the address we dial; its node id is learned from its first
gossip. A peer is alive while we hear from it, suspect after ``suspect_after``
seconds of silence (or the moment its connection breaks), dead after
``dead_after``, and forgotten after ``forget_after`` unless it is a seed. Only
what we hear *directly* changes a peer's state; what other peers say about it is
used to discover it, never to declare it dead.

Free capacity is estimated from the last load the peer reported plus what we sent
it since that the report cannot know about; a peer that refused a forward counts as
full until it reports again. Estimates can be wrong for a moment: the peer refuses
what it has no slot for, and the job is placed again.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["PeerState", "Peer", "Membership"]


class PeerState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(eq=False)
class Peer:
    address: str
    seed: bool = False
    node: str | None = None
    state: PeerState = PeerState.SUSPECT  # until we hear from it
    last_heard: float = 0.0
    since: float | None = None  # when it entered its state (None: a seed not yet aged)
    #: Last load it reported: executing, capacity, queued, queue_limit.
    load: dict[str, int] = field(default_factory=dict)
    #: Forwards sent and not yet accepted (the last report cannot include them).
    in_transit: int = 0
    #: Forwards it accepted that are still running.
    running_for_us: int = 0
    #: It refused a forward; treat it as full until its next report.
    refused: bool = False
    #: Whether we hold a working connection to it.
    connected: bool = False

    @property
    def capacity(self) -> int:
        return int(self.load.get("capacity", 0))

    @property
    def busy(self) -> int:
        """Slots in use or spoken for, as far as we can tell."""
        return int(self.load.get("executing", 0)) + int(self.load.get("queued", 0)) + self.in_transit

    @property
    def free(self) -> int:
        if self.refused:
            return 0
        return self.capacity - self.busy

    def view(self, now: float) -> dict[str, Any]:
        return {
            "address": self.address,
            "node": self.node,
            "state": self.state.value,
            "heard": round(now - self.last_heard, 3) if self.last_heard else None,
            "load": dict(self.load),
            "running_for_us": self.running_for_us,
        }


class Membership:
    """The peers one node knows, keyed by address."""

    def __init__(
        self,
        *,
        me: str,
        my_address: str | None,
        seeds: tuple[str, ...] = (),
        interval: float = 0.5,
        suspect_after: float | None = None,
        dead_after: float | None = None,
        forget_after: float = 60.0,
        rng: random.Random | None = None,
    ) -> None:
        self.me = me
        self.my_address = my_address
        self.interval = interval
        self.suspect_after = suspect_after if suspect_after is not None else 3 * interval
        self.dead_after = dead_after if dead_after is not None else 8 * interval
        self.forget_after = forget_after
        self.rng = rng or random.Random()
        self.peers: dict[str, Peer] = {}
        self._not_me: set[str] = set()
        for address in seeds:
            if address != my_address:
                self.peers[address] = Peer(address, seed=True)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self.peers.values()))

    def by_node(self, node: str) -> Peer | None:
        for peer in self.peers.values():
            if peer.node == node:
                return peer
        return None

    def _set_state(self, peer: Peer, state: PeerState, now: float) -> bool:
        if peer.state is state:
            return False
        peer.state = state
        peer.since = now
        return True

    # -- what we hear ------------------------------------------------------------------

    def discover(self, address: str | None, now: float) -> Peer | None:
        """A peer named by someone; returns it if it is new to us."""
        if not address or address == self.my_address or address in self.peers or address in self._not_me:
            return None
        peer = Peer(address, since=now)
        self.peers[address] = peer
        return peer

    def heard(self, address: str, message: dict[str, Any], now: float) -> list[Peer]:
        """A gossip message from the peer at ``address`` (its reply, or its call to us).

        Updates its load and state; returns the peers it told us about that are new.
        """
        node = message.get("node")
        if node == self.me:  # an alias of our own address: never talk to ourselves
            self._not_me.add(address)
            self.peers.pop(address, None)
            return []
        peer = self.peers.get(address)
        if peer is None:
            peer = self.peers[address] = Peer(address, since=now)
        if isinstance(node, str):
            twin = self.by_node(node)
            if twin is not None and twin is not peer:  # the same node under two addresses: keep one
                if twin.connected or not peer.connected:
                    self.peers.pop(address, None)
                    self._not_me.add(address)
                    peer = twin
                else:
                    self.peers.pop(twin.address, None)
            peer.node = node
        load = message.get("load")
        if isinstance(load, dict):
            peer.load = {k: int(v) for k, v in load.items() if isinstance(v, int)}
            peer.refused = False
        peer.last_heard = now
        self._set_state(peer, PeerState.ALIVE, now)
        new = []
        for entry in message.get("peers", ()):
            if isinstance(entry, dict) and entry.get("node") != self.me and entry.get("state") != "dead":
                found = self.discover(entry.get("address"), now)
                if found is not None:
                    new.append(found)
        return new

    def lost(self, address: str, now: float) -> None:
        """Our connection to it broke: suspect at once; heartbeats decide the rest."""
        peer = self.peers.get(address)
        if peer is not None:
            peer.connected = False
            if peer.state is PeerState.ALIVE:
                self._set_state(peer, PeerState.SUSPECT, now)

    def tick(self, now: float) -> list[Peer]:
        """Age the peers by missed heartbeats; returns those forgotten."""
        gone = []
        for peer in list(self.peers.values()):
            if peer.since is None:  # a seed, aged from the first tick
                peer.since = now
            silent = now - (peer.last_heard if peer.last_heard else peer.since)
            if silent >= self.dead_after:
                self._set_state(peer, PeerState.DEAD, now)
            elif silent >= self.suspect_after and peer.state is PeerState.ALIVE:
                self._set_state(peer, PeerState.SUSPECT, now)
            if peer.state is PeerState.DEAD and not peer.seed and now - peer.since >= self.forget_after:
                del self.peers[peer.address]
                gone.append(peer)
        return gone

    def message(self, load: dict[str, int]) -> dict[str, Any]:
        """What we tell a peer: who we are, our load, the peers we can reach."""
        return {
            "node": self.me,
            "address": self.my_address,
            "load": load,
            "peers": [
                {"node": p.node, "address": p.address, "state": p.state.value}
                for p in self.peers.values()
                if p.node is not None and p.state is PeerState.ALIVE
            ],
        }

    # -- placement ---------------------------------------------------------------------

    def candidates(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.state is PeerState.ALIVE and p.connected and p.free > 0]

    def pick(self) -> Peer | None:
        """Power of two choices: sample two peers with free capacity, take the less loaded.

        Reserves a slot on it (``in_transit``) until :meth:`accepted` or :meth:`ended`.
        """
        candidates = self.candidates()
        if not candidates:
            return None
        if len(candidates) == 1:
            chosen = candidates[0]
        else:
            a, b = self.rng.sample(candidates, 2)
            chosen = a if _ratio(a) <= _ratio(b) else b
        chosen.in_transit += 1
        return chosen

    def accepted(self, peer: Peer) -> None:
        """It took a job we sent: now its own reports count it."""
        peer.in_transit = max(0, peer.in_transit - 1)
        peer.running_for_us += 1
        peer.load["executing"] = peer.load.get("executing", 0) + 1

    def ended(self, peer: Peer, *, was_accepted: bool, refused: bool = False) -> None:
        """A forward to it is over (done, failed or refused); its slot is free again."""
        if was_accepted:
            peer.running_for_us = max(0, peer.running_for_us - 1)
            peer.load["executing"] = max(0, peer.load.get("executing", 0) - 1)
        else:
            peer.in_transit = max(0, peer.in_transit - 1)
        if refused:
            peer.refused = True


def _ratio(peer: Peer) -> float:
    return peer.busy / peer.capacity if peer.capacity else float("inf")
