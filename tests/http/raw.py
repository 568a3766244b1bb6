"""A raw HTTP/1.1 client on a trio socket, for tests that send what a real client would not."""

from __future__ import annotations

from dataclasses import dataclass

import trio


@dataclass
class Response:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def put_head(path: str, length: int) -> bytes:
    """The head of a PUT of ``length`` bytes, for a test to send the body (or not) itself."""
    return f"PUT {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {length}\r\n\r\n".encode()


class Raw:
    """One connection: send bytes as they are, read responses one by one."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, address: str) -> Raw:
        host, port = address.rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> Raw:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
        *, head_only: bool = False,
    ) -> Response:
        fields = {"Host": "test", **(headers or {})}
        if body or method == "PUT":
            fields.setdefault("Content-Length", str(len(body)))
        head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items()) + "\r\n"
        await self.send(head.encode() + body)
        return await self.response(head_only=head_only or method == "HEAD")

    async def _fill(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    async def response(self, *, head_only: bool = False, within: float = 10) -> Response:
        with trio.fail_after(within):
            while b"\r\n\r\n" not in self.buf:
                if not await self._fill():
                    raise EOFError(f"connection closed before a response: {bytes(self.buf)!r}")
            head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers: dict[str, list[str]] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
            no_body = head_only or status in (100, 204, 304)
            length = 0 if no_body else int(headers.get("content-length", ["0"])[0])
            self.buf = bytearray(rest)
            while len(self.buf) < length:
                if not await self._fill():
                    raise EOFError("connection closed in a response body")
            body, self.buf = bytes(self.buf[:length]), self.buf[length:]
            if status == 100:
                return await self.response(head_only=head_only, within=within)
            return Response(status, headers, body)

    async def closed(self, within: float = 10) -> bool:
        """Whether the server closes the connection (EOF) within ``within`` seconds."""
        with trio.move_on_after(within):
            try:
                while await self._fill():
                    pass
            except trio.BrokenResourceError:
                pass
            return True
        return False
