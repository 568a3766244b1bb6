"""The sched core: admission, de-duplication, operations, and placement across peers.

* :mod:`.operations` — the one table that is both the bounded priority queue and the
  operations map (sans-I/O).
* :mod:`.scheduler` — local slots, waiters, cancellation, the dispatcher (trio).
* :mod:`.peers` — membership, heartbeats and power-of-two-choices placement (sans-I/O).
* :mod:`.cluster` — links to peers, gossip, forwarding (trio, over connections the node dials).
* :mod:`.metrics` — Prometheus counters and histograms.

Its wire methods and ``--metrics`` endpoint are the node's (:mod:`triode.node.sched`,
:mod:`triode.node.http`); ``client.operations`` is :mod:`triode.client.operations`.
"""
