"""The HTTP cache door (``--http``) beside Triode's own protocol, and a Bazel build from it.

The node is a ``triode node --http`` process (``b.spawn_node``); the clients run in this
process. The HTTP client here is as lean as one gets in Python (requests written by
hand, responses parsed by ``find``), so the figures are the door's cost, not a client
library's.

* ``http.small_gets``: 1 KiB ``GET /cas/HASH`` per second over 64 kept-alive connections,
  one request in flight on each (as Bazel and ccache do), against Triode's own
  ``client.cas.get`` with 64 calls in flight on one connection. Target: at least 0.2x.
  HTTP/1.1 answers one request per connection at a time, so each GET costs a read and a
  write on both sides, where Triode's protocol batches many calls per system call; and
  h11 alone takes about 45 us per request and answer on the benchmark machine.
* ``http.blobs``: a 256 MiB ``PUT /cas/HASH`` then ``GET`` (the download hashed as it
  arrives, as a client checks it), against Triode's own put+get of the same bytes.
  Target: at least 0.5x.
* ``http.bazel``: a Bazel build of a small C workspace after ``bazel clean``, every action
  a remote cache hit from the node, against the same build with no remote cache (every
  action run locally). Skipped, with a line saying so, where bazel is not installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import trio

import triode
from triode.model.digest import Digest

from ..harness import Bench, at_least, at_most, run_concurrently, workload
from .bazel_build import clean_build, free_port, workspace

MiB = 1024 * 1024
#: Connections (each with one request in flight) of ``http.small_gets``.
CONNECTIONS = 64


class _Client:
    """One kept-alive HTTP/1.1 connection, requests written by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def open(cls, address: str) -> _Client:
        host, port = address.rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)))

    async def _head(self) -> tuple[int, int]:
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError("the node closed the connection")
            self.buf += data
        head = bytes(self.buf[:end]).lower()
        del self.buf[: end + 4]
        status = int(head[9:12])
        at = head.find(b"content-length:")
        length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
        return status, length

    async def get_small(self, path: bytes) -> bytes:
        await self.stream.send_all(b"GET " + path + b" HTTP/1.1\r\nHost: bench\r\n\r\n")
        status, length = await self._head()
        while len(self.buf) < length:
            self.buf += await self.stream.receive_some(1 << 16)
        body = bytes(self.buf[:length])
        del self.buf[:length]
        assert status == 200, status
        return body

    async def put(self, path: str, data: bytes) -> None:
        head = f"PUT {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(data)}\r\n\r\n"
        await self.stream.send_all(head.encode())
        view = memoryview(data)
        for i in range(0, len(view), MiB):
            await self.stream.send_all(view[i : i + MiB])
        status, length = await self._head()
        del self.buf[:length]
        assert status == 200, status

    async def get_large(self, path: str) -> str:
        """The body's SHA-256, hashed as it arrives (never held whole)."""
        await self.stream.send_all(f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        status, length = await self._head()
        assert status == 200, status
        hasher = hashlib.sha256()
        got = len(self.buf)
        hasher.update(self.buf)
        self.buf.clear()
        while got < length:
            data = await self.stream.receive_some(4 * MiB)
            if not data:
                raise EOFError("the node closed the connection mid-body")
            hasher.update(data)
            got += len(data)
        return hasher.hexdigest()

    async def aclose(self) -> None:
        await self.stream.aclose()


def _http_small_gets(http: str, paths: list[bytes]) -> float:
    async def main() -> float:
        clients = [await _Client.open(http) for _ in range(CONNECTIONS)]
        todo = iter(paths)

        async def worker(client: _Client) -> None:
            for path in todo:
                assert len(await client.get_small(path)) == 1024

        try:
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(worker, client)
            return len(paths) / (time.perf_counter() - start)
        finally:
            for client in clients:
                await client.aclose()

    return trio.run(main)


def _triode_small_gets(address: str, digests: list[Digest]) -> float:
    async def main() -> float:
        async with triode.connect(address) as client:
            return len(digests) / await run_concurrently(digests, CONNECTIONS, client.cas.get)

    return trio.run(main)


@workload("http.small_gets", help="1 KiB GETs/s over 64 HTTP connections vs Triode's own small gets")
def small_gets(b: Bench) -> None:
    count = 5_000 if b.quick else 20_000
    blobs = [os.urandom(1024) for _ in range(2_000)]
    digests = [Digest.of(x) for x in blobs]
    http = f"127.0.0.1:{free_port()}"

    async def upload(address: str) -> None:
        async with triode.connect(address) as client:
            await client.cas.batch_update(list(zip(digests, blobs, strict=True)))

    with b.spawn_node("--http", http) as address:
        trio.run(upload, address)
        order = [digests[i % len(digests)] for i in range(count)]
        paths = [f"/cas/{d.hash}".encode() for d in order]
        b.compare("1 KiB GETs, 64 connections", "gets/s",
                  subject=lambda: _http_small_gets(http, paths),
                  baseline=("triode client.cas.get, 64 in flight",
                            lambda: _triode_small_gets(address, order)),
                  target=at_least(0.2))


def _http_put_get(http: str, data: bytes) -> float:
    data = data[:-8] + os.urandom(8)  # a fresh blob each time
    h = hashlib.sha256(data).hexdigest()

    async def main() -> float:
        client = await _Client.open(http)
        try:
            start = time.perf_counter()
            await client.put(f"/cas/{h}", data)
            assert await client.get_large(f"/cas/{h}") == h
            return 2 * len(data) / (time.perf_counter() - start) / 1e6
        finally:
            await client.aclose()

    return trio.run(main)


def _triode_put_get(address: str, data: bytes) -> float:
    data = data[:-8] + os.urandom(8)
    digest = Digest.of(data)

    async def main() -> float:
        async with triode.connect(address) as client:
            start = time.perf_counter()
            await client.cas.put(data, digest)
            got = await client.cas.get(digest)
            elapsed = time.perf_counter() - start
            assert len(got) == len(data)
            return 2 * len(data) / elapsed / 1e6

    return trio.run(main)


@workload("http.blobs", help="a large PUT+GET over HTTP vs Triode's own put+get")
def blobs(b: Bench) -> None:
    size = (32 if b.quick else 256) * MiB
    data = os.urandom(size)
    http = f"127.0.0.1:{free_port()}"
    with b.spawn_node("--http", http) as address:
        b.compare(f"{size // MiB} MiB PUT+GET", "MB/s",
                  subject=lambda: _http_put_get(http, data),
                  baseline=("triode client put+get", lambda: _triode_put_get(address, data)),
                  target=at_least(0.5))


# -- Bazel -------------------------------------------------------------------------------------





@workload("http.bazel", help="a Bazel clean rebuild from the HTTP cache vs the same build, no remote cache")
def bazel_build(b: Bench) -> None:
    bazel = shutil.which("bazel")
    if bazel is None:
        b.progress("  http.bazel: skipped: bazel is not installed (apt-get install bazel-bootstrap)")
        return
    root = b.tmpdir / "http-bazel"
    ws = workspace(root, 8 if b.quick else 24)
    (root / "home").mkdir()
    http = f"127.0.0.1:{free_port()}"
    try:
        with b.spawn_node("--http", http):
            cache = f"--remote_cache=http://{http}"
            clean_build(bazel, ws, cache, expect="processwrapper-sandbox")  # fills the cache
            b.compare("clean build, every action a remote cache hit", "s",
                      subject=lambda: clean_build(bazel, ws, cache, expect="remote cache hit"),
                      baseline=("the same build, no remote cache",
                                lambda: clean_build(bazel, ws, expect="processwrapper-sandbox")),
                      better="lower", target=at_most(1.0),
                      note="bazel 4 (Debian's bazel-bootstrap), one C library per unit, a warm Bazel server")
    finally:
        subprocess.run([bazel, "--nohome_rc", "shutdown"], cwd=ws, capture_output=True, timeout=120,
                       env={**os.environ, "HOME": str(root / "home")})
