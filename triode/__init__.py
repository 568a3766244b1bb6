"""Triode: a structured-concurrency execution engine for Trio.

``async with triode.open_node(...) as node`` runs a node inside your Trio program;
``async with triode.connect("host:port") as client`` talks to one over TCP. Nothing
either starts outlives its ``async with`` block.
"""

__version__ = "0.1.0"

from .client import Client, connect  # noqa: E402
from .errors import *  # noqa: E402,F403
from .errors import __all__ as _errors_all  # noqa: E402
from .node import Node, NodeConfig, open_node  # noqa: E402
from .storage.digest import Digest  # noqa: E402

__all__ = ["__version__", "Client", "Digest", "Node", "NodeConfig", "connect", "open_node", *_errors_all]
