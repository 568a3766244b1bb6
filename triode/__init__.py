"""Triode: a structured-concurrency execution engine for Trio.

``async with triode.open_node(...) as node`` runs a node inside your Trio program;
``async with triode.connect("host:port") as client`` talks to one over TCP. Nothing
either starts outlives its ``async with`` block.

The names below are loaded on first use (PEP 562), so importing one layer, for example
the sans-I/O codec ``triode.wire.codec``, does not load the node and the client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .version import __version__

#: Public name -> the module that defines it.
_LAZY = {
    "Client": "triode.client",
    "connect": "triode.client",
    "Node": "triode.node",
    "NodeConfig": "triode.node",
    "open_node": "triode.node",
    "Digest": "triode.model.digest",
    "Action": "triode.model.action",
    "Input": "triode.model.action",
    "ActionResult": "triode.model.result",
    "CapturedStream": "triode.model.result",
    "OutputFile": "triode.model.result",
    "OutputDirectory": "triode.model.result",
    "OutputSymlink": "triode.model.result",
    "Timings": "triode.model.result",
    "ExecuteOutcome": "triode.model.result",
    "ExecuteRequest": "triode.model.result",
}

__all__ = ["__version__", *_LAZY, *_errors_all]

if TYPE_CHECKING:
    from .client import Client, connect  # noqa: F401
    from .model.action import Action, Input  # noqa: F401
    from .model.digest import Digest  # noqa: F401
    from .model.result import (  # noqa: F401
        ActionResult,
        CapturedStream,
        ExecuteOutcome,
        ExecuteRequest,
        OutputDirectory,
        OutputFile,
        OutputSymlink,
        Timings,
    )
    from .node import Node, NodeConfig, open_node  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'triode' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
