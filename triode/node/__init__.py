"""The node layer: composes the core parts, serves them on the wire.

Each part has one module here holding its glue and its wire handlers (``storage``,
``engine``, ``tools``, ``sched``); ``node`` holds the :class:`Node` itself and
``compose`` opens the parts in order. Imports point down only: to the core parts, the
wire, the shared model, and the client (to reach peers and backing nodes).
"""

from .compose import PARTS, open_node
from .node import Node, NodeConfig, Part, PartFactory

__all__ = ["Node", "NodeConfig", "PARTS", "Part", "PartFactory", "open_node"]
