"""The Triode wire protocol: a sans-I/O frame codec and connections over trio streams."""

from .codec import Decoder, encode
from .connection import (
    PROTOCOL_VERSION,
    Connection,
    ConnectionConfig,
    IncomingCall,
    OutgoingCall,
    PeerHello,
    open_connection,
)
from .router import Router

__all__ = [
    "PROTOCOL_VERSION",
    "Connection",
    "ConnectionConfig",
    "Decoder",
    "IncomingCall",
    "OutgoingCall",
    "PeerHello",
    "Router",
    "encode",
    "open_connection",
]
