"""Addresses, TCP and TLS: how a byte stream to a node is made."""

from __future__ import annotations

import ssl

import trio

from ..errors import InvalidArgument, Unavailable

__all__ = ["parse_address", "format_address", "open_stream"]


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) to a (host, port) pair."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(f"expected an address as HOST:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def open_stream(address: str, *, ssl_context: ssl.SSLContext | None = None) -> trio.abc.Stream:
    """Connect to a node; an unreachable node is :class:`Unavailable` naming the address."""
    host, port = parse_address(address)
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise Unavailable(f"cannot reach node at {address}: {exc.strerror or exc}", node=address) from None
    if ssl_context is not None:
        tls = trio.SSLStream(stream, ssl_context, server_hostname=host)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, ssl.SSLError) as exc:
            await trio.aclose_forcefully(tls)
            raise Unavailable(f"TLS handshake with {address} failed: {exc}", node=address) from None
        except BaseException:  # cancelled or timed out mid-handshake: the socket is ours to close
            await trio.aclose_forcefully(tls)
            raise
        stream = tls
    return stream
