"""The Triode wire protocol: a sans-I/O codec and call state machine, and connections over
trio streams.

The names below load on first use (PEP 562), so importing the sans-I/O layers
(``triode.wire.codec``, ``triode.wire.protocol``) does not load trio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Public name -> the module that defines it.
_LAZY = {
    "PROTOCOL_VERSION": "triode.wire.connection",
    "Connection": "triode.wire.connection",
    "ConnectionConfig": "triode.wire.connection",
    "IncomingCall": "triode.wire.connection",
    "OutgoingCall": "triode.wire.connection",
    "PeerHello": "triode.wire.connection",
    "open_connection": "triode.wire.connection",
    "Decoder": "triode.wire.codec",
    "encode": "triode.wire.codec",
    "Protocol": "triode.wire.protocol",
    "Router": "triode.wire.router",
}

__all__ = [
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionConfig",
    "Decoder",
    "IncomingCall",
    "OutgoingCall",
    "PeerHello",
    "Protocol",
    "Router",
    "encode",
    "open_connection",
]

if TYPE_CHECKING:
    from .codec import Decoder, encode  # noqa: F401
    from .connection import (  # noqa: F401
        PROTOCOL_VERSION,
        Connection,
        ConnectionConfig,
        IncomingCall,
        OutgoingCall,
        PeerHello,
        open_connection,
    )
    from .protocol import Protocol  # noqa: F401
    from .router import Router  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'triode.wire' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
