"""A tiny HTTP/1.1 server for ``--metrics``: GET /metrics answers the Prometheus text format.

One request per connection (``Connection: close``), request head capped at 8 KiB and
read within a few seconds, so a slow or hostile scraper costs one bounded task.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from ..errors import InvalidArgument
from ..wire.transport import format_address, parse_address

__all__ = ["serve_metrics", "MAX_HEAD", "CONTENT_TYPE"]

log = logging.getLogger("triode.node.http")

MAX_HEAD = 8 * 1024
HEAD_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_CLIENTS = 16


async def serve_metrics(
    address: str,
    render: Callable[[], str],
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``render()`` at ``http://ADDRESS/metrics`` until cancelled; reports the bound address."""
    host, port = parse_address(address)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise InvalidArgument(f"cannot serve metrics on {address}: {exc.strerror or exc}") from None
    sockname = listeners[0].socket.getsockname()
    limit = trio.CapacityLimiter(MAX_CLIENTS)

    async def handle(stream: trio.SocketStream) -> None:
        async with limit:
            await _handle(stream, render)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept, listener, handle, nursery)
        task_status.started(format_address(sockname[0], sockname[1]))


async def _accept(
    listener: trio.SocketListener,
    handle: Callable[[trio.SocketStream], Awaitable[None]],
    nursery: trio.Nursery,
) -> None:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                log.warning("metrics accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(handle, stream)


async def _handle(stream: trio.SocketStream, render: Callable[[], str]) -> None:
    async with stream:
        try:
            head = b""
            with trio.move_on_after(HEAD_TIMEOUT):
                while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) <= MAX_HEAD:
                    data = await stream.receive_some(4096)
                    if not data:
                        break
                    head += data
            line = head.split(b"\n", 1)[0].decode("latin-1").strip()
            parts = line.split()
            if len(head) > MAX_HEAD:
                status, body = "431 Request Header Fields Too Large", "request head too large\n"
            elif len(parts) != 3 or not parts[2].startswith("HTTP/"):
                status, body = "400 Bad Request", "expected: GET /metrics HTTP/1.1\n"
            elif parts[0] not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", "only GET and HEAD\n"
            elif parts[1].split("?", 1)[0] not in ("/metrics", "/"):
                status, body = "404 Not Found", "metrics are at /metrics\n"
            else:
                status, body = "200 OK", render()
            payload = body.encode()
            response = (
                f"HTTP/1.1 {status}\r\nContent-Type: {CONTENT_TYPE}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            ).encode()
            if not (len(parts) == 3 and parts[0] == "HEAD"):
                response += payload
            with trio.move_on_after(HEAD_TIMEOUT):
                await stream.send_all(response)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("metrics client went away: %s", exc)
