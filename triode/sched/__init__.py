"""Admission, de-duplication, operations, and placement across a cluster of peers.

* :mod:`.operations` — the one table that is both the bounded priority queue and the
  operations map (sans-I/O).
* :mod:`.scheduler` — local slots, waiters, cancellation, the dispatcher (trio).
* :mod:`.peers` — membership, heartbeats and power-of-two-choices placement (sans-I/O).
* :mod:`.cluster` — links to peers, gossip, forwarding (trio, over the wire protocol).
* :mod:`.service` — the node part: wire methods, ``execute`` through admission control.
* :mod:`.metrics`, :mod:`.http` — Prometheus counters and histograms, ``--metrics``.
* :mod:`.client` — ``client.operations``.
"""
