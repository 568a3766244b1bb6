"""Membership and placement without sockets: heartbeats, discovery, power of two choices."""

from __future__ import annotations

import random
from collections import Counter

from triode.sched.peers import Membership, PeerState


def gossip(node, address, executing=0, capacity=2, queued=0, peers=()):
    return {
        "node": node,
        "address": address,
        "load": {"executing": executing, "capacity": capacity, "queued": queued, "queue_limit": 10},
        "peers": [{"node": n, "address": a, "state": s} for n, a, s in peers],
    }


def test_seed_becomes_alive_then_suspect_then_dead_then_is_kept():
    m = Membership(me="me", my_address="h:1", seeds=("h:2",), interval=0.5)
    (peer,) = list(m)
    assert peer.state is PeerState.SUSPECT and peer.seed
    m.tick(now=5.0)  # never heard from: aged from here, not from the epoch
    assert peer.state is PeerState.SUSPECT
    m.tick(now=9.1)
    assert peer.state is PeerState.DEAD
    m.heard("h:2", gossip("b", "h:2"), now=10.0)
    assert peer.state is PeerState.ALIVE and peer.node == "b"
    m.tick(now=11.0)
    assert peer.state is PeerState.ALIVE
    m.tick(now=11.6)
    assert peer.state is PeerState.SUSPECT
    m.tick(now=14.1)
    assert peer.state is PeerState.DEAD
    m.tick(now=1000)
    assert list(m) == [peer]  # seeds are never forgotten
    m.heard("h:2", gossip("b", "h:2"), now=1001)
    assert peer.state is PeerState.ALIVE


def test_learns_peers_of_peers_but_not_their_verdicts():
    m = Membership(me="me", my_address="h:1", seeds=("h:2",))
    new = m.heard("h:2", gossip("b", "h:2", peers=[("c", "h:3", "alive"), ("me", "h:1", "alive"),
                                                   ("d", "h:4", "dead")]), now=1)
    assert [p.address for p in new] == ["h:3"]
    m.heard("h:3", gossip("c", "h:3"), now=1)
    # b says c is dead: we only believe our own heartbeats.
    m.heard("h:2", gossip("b", "h:2", peers=[("c", "h:3", "dead")]), now=1.1)
    assert m.by_node("c").state is PeerState.ALIVE


def test_unseeded_dead_peers_are_forgotten():
    m = Membership(me="me", my_address="h:1", forget_after=5)
    m.heard("h:3", gossip("c", "h:3"), now=0)
    assert m.tick(now=4.5) == []
    assert [p.address for p in m.tick(now=10)] == ["h:3"]
    assert list(m) == []


def test_our_own_address_under_another_name_is_dropped():
    m = Membership(me="me", my_address="127.0.0.1:1", seeds=("localhost:1",))
    m.heard("localhost:1", gossip("me", "127.0.0.1:1"), now=0)
    assert list(m) == []
    assert m.discover("localhost:1", now=1) is None


def test_lost_connection_is_suspect_at_once_and_never_picked():
    m = Membership(me="me", my_address="h:1", seeds=("h:2",))
    m.heard("h:2", gossip("b", "h:2"), now=0)
    m.peers["h:2"].connected = True
    assert m.pick() is not None
    m.ended(m.peers["h:2"], was_accepted=False)
    m.lost("h:2", now=0.1)
    assert m.peers["h:2"].state is PeerState.SUSPECT
    assert m.pick() is None


def _cluster(loads, seed=0):
    m = Membership(me="me", my_address="h:0", rng=random.Random(seed))
    for i, (executing, capacity) in enumerate(loads, start=1):
        m.heard(f"h:{i}", gossip(f"n{i}", f"h:{i}", executing=executing, capacity=capacity), now=0)
        m.peers[f"h:{i}"].connected = True
    return m


def test_pick_reserves_slots_and_stops_when_all_are_spoken_for():
    m = _cluster([(0, 2), (1, 2)])
    picks = [m.pick() for _ in range(4)]
    assert [p.address for p in picks if p] .count("h:1") == 2
    assert [p.address for p in picks if p].count("h:2") == 1
    assert picks[-1] is None
    # Accepted then finished: its slot is free again without waiting for gossip.
    peer = picks[0]
    m.accepted(peer)
    m.ended(peer, was_accepted=True)
    assert m.pick() is peer


def test_refusal_marks_full_until_the_next_report():
    m = _cluster([(0, 4)])
    peer = m.pick()
    m.ended(peer, was_accepted=False, refused=True)
    assert m.pick() is None
    m.heard("h:1", gossip("n1", "h:1", executing=1, capacity=4), now=1)
    assert m.pick() is peer


def test_power_of_two_choices_prefers_the_less_loaded():
    chosen = Counter()
    for seed in range(300):
        m = _cluster([(0, 10), (5, 10), (9, 10)], seed=seed)
        chosen[m.pick().node] += 1
    assert chosen["n1"] > chosen["n2"] > chosen["n3"]
    assert chosen["n3"] == 0  # the most loaded of any pair never wins


def test_a_peer_listening_on_a_wildcard_is_reached_where_it_called_from():
    from triode.sched.cluster import _reachable

    assert _reachable("0.0.0.0:7420", "10.1.2.3") == "10.1.2.3:7420"
    assert _reachable("[::]:7420", "fe80::1") == "[fe80::1]:7420"
    assert _reachable("10.9.9.9:7420", "10.1.2.3") == "10.9.9.9:7420"
