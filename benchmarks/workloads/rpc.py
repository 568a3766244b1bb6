"""The wire protocol: unary calls per second and stream throughput, against a raw trio socket.

Client (this process) and node (a child process) are separate, as they are in use. The
baselines do the same work over a bare trio TCP socket with a server process just as
minimal: an echo of 32-byte requests (one outstanding, or 64 pipelined on one socket) and
a copy of 256 MiB. The node runs ``triode node`` with one extra part serving
``bench.download`` / ``bench.upload`` (streams of zero bytes), so only the protocol is
measured, not storage.

Both sides time the same phases: the connection is made and greeted before the clock
starts (Triode: connect, hello and one ``node.ping``; raw: connect and the server's one-byte
greeting, so its handler is running), and the clock covers the request and the transfer.

Targets: 64 concurrent calls at least 15,000 calls/s (absolute); streams at least 0.5x.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import trio

import triode

from ..harness import Bench, at_least, workload

#: ``triode node`` plus a part streaming zeros, so stream figures measure the wire alone.
NODE_SCRIPT = """
import sys
from contextlib import asynccontextmanager
import triode.node.compose

CHUNK = memoryview(bytes(1 << 20))

class Part:
    name = "bench"
    def info(self):
        return {}

@asynccontextmanager
async def bench_part(node):
    async def download(call):
        left = call.args
        while left:
            n = min(left, len(CHUNK))
            await call.send(CHUNK[:n])
            left -= n
        return call.args

    async def upload(call):
        total = 0
        async for chunk in call:
            total += len(chunk)
        return total

    node.router.add("bench.download", download)
    node.router.add("bench.upload", upload, upload=True)
    yield Part()

triode.node.compose.PARTS = (*triode.node.compose.PARTS, bench_part)
from triode.cli import main
sys.exit(main(["node", "--listen", "127.0.0.1:0", "--data", sys.argv[1]]))
"""

#: The baseline server: a bare trio socket, no framing beyond what the work needs.
RAW_SCRIPT = """
import trio

async def exactly(stream, n):
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            raise EOFError
        buf += data
    return bytes(buf)

async def handle(stream):
    await stream.send_all(b"h")  # the greeting: the client starts its clock after it
    mode = await exactly(stream, 1)
    if mode == b"e":  # echo everything back
        while data := await stream.receive_some(1 << 18):
            await stream.send_all(data)
    elif mode == b"d":  # send N zero bytes
        left = int.from_bytes(await exactly(stream, 8), "big")
        chunk = memoryview(bytes(1 << 20))
        while left:
            n = min(left, len(chunk))
            await stream.send_all(chunk[:n])
            left -= n
    elif mode == b"u":  # read N bytes, then answer one byte
        left = int.from_bytes(await exactly(stream, 8), "big")
        while left:
            left -= len(await stream.receive_some(1 << 18))
        await stream.send_all(b"k")

async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)

trio.run(main)
"""

REQUEST = 32  # bytes per raw echo request: about a CALL of node.ping


@contextlib.contextmanager
def _process(argv: list[str], ready: Callable[[str], str | None], timeout: float = 30) -> Iterator[str]:
    """Run ``argv``; yield what ``ready`` extracts from its output; stop it at the end."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while True:
                log.seek(0)
                found = ready(log.read().decode(errors="replace"))
                if found is not None:
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{argv[:3]} did not start: {log.read().decode()[-2000:]}")
                time.sleep(0.02)
            yield found
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _node_ready(output: str) -> str | None:
    for line in output.splitlines():
        if line.startswith("listening on "):
            return line.split()[-1]
    return None


def _raw_ready(output: str) -> str | None:
    line = output.strip().split("\n")[0]
    return f"127.0.0.1:{line}" if line.isdigit() else None


@contextlib.contextmanager
def servers(b: Bench) -> Iterator[tuple[str, str]]:
    """A bench node and a raw server, each in its own process: (node address, raw address)."""
    data = Path(tempfile.mkdtemp(prefix="rpc-", dir=b.tmpdir))
    with _process([sys.executable, "-c", NODE_SCRIPT, str(data)], _node_ready) as node, \
            _process([sys.executable, "-c", RAW_SCRIPT], _raw_ready) as raw:
        yield node, raw


async def _raw_connect(address: str) -> trio.SocketStream:
    """A connection to the raw server, once it has greeted: the counterpart of connect and hello."""
    host, port = address.rsplit(":", 1)
    stream = await trio.open_tcp_stream(host, int(port))
    assert await stream.receive_some(1) == b"h"
    return stream


def _raw_request(mode: bytes, size: int) -> bytes:
    return mode + size.to_bytes(8, "big")


# -- unary -----------------------------------------------------------------------------


def triode_calls(address: str, total: int, concurrency: int) -> float:
    """Calls per second of ``node.ping``, ``concurrency`` at a time on one connection."""

    async def run() -> float:
        async with triode.connect(address) as client:
            await client.ping()  # the connection is up before the clock starts
            per_task = total // concurrency

            async def worker() -> None:
                call = client.connection.call
                for _ in range(per_task):
                    await call("node.ping")

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(concurrency):
                    nursery.start_soon(worker)
            return per_task * concurrency / (time.perf_counter() - start)

    return trio.run(run)


def raw_calls(address: str, total: int, concurrency: int) -> float:
    """Round trips per second of 32-byte echoes, ``concurrency`` outstanding on one socket."""

    async def run() -> float:
        stream = await _raw_connect(address)
        async with stream:
            await stream.send_all(_raw_request(b"e", 0))
            # The echo server ignores the 8 size bytes' meaning: read them back first.
            await stream.send_all(b"\0" * (REQUEST - 8))
            got = 0
            while got < REQUEST:
                got += len(await stream.receive_some(REQUEST - got))
            request = b"r" * REQUEST
            start = time.perf_counter()
            await stream.send_all(request * concurrency)
            sent, received = concurrency, 0
            pending = 0
            while received < total:
                data = await stream.receive_some(1 << 16)
                pending += len(data)
                done, pending = divmod(pending, REQUEST)
                received += done
                more = min(done, total - sent)
                if more > 0:
                    await stream.send_all(request * more)
                    sent += more
            return total / (time.perf_counter() - start)

    return trio.run(run)


@workload("rpc.unary", help="unary calls/s on one connection, sequential and 64 concurrent")
def unary(b: Bench) -> None:
    sequential = 2_000 if b.quick else 10_000
    concurrent = 10_000 if b.quick else 64_000
    with servers(b) as (node, raw):
        b.compare(
            "sequential calls", "calls/s",
            subject=lambda: triode_calls(node, sequential, 1),
            baseline=("raw trio socket echo", lambda: raw_calls(raw, sequential, 1)),
        )
        b.compare(
            "64 concurrent calls, one connection", "calls/s",
            subject=lambda: triode_calls(node, concurrent, 64),
            baseline=("raw trio socket echo, 64 pipelined", lambda: raw_calls(raw, concurrent, 64)),
            target=at_least(15_000, "calls/s"),
        )


# -- streams ---------------------------------------------------------------------------


def triode_download(address: str, size: int) -> float:
    async def run() -> float:
        async with triode.connect(address) as client:
            await client.ping()
            start = time.perf_counter()
            got = 0
            async with client.connection.open_call("bench.download", size) as call:
                while (chunk := await call.receive()) is not None:
                    got += len(chunk)
                assert await call.result() == size
            assert got == size
            return size / (time.perf_counter() - start) / 2**20

    return trio.run(run)


def raw_download(address: str, size: int) -> float:
    async def run() -> float:
        stream = await _raw_connect(address)
        async with stream:
            start = time.perf_counter()
            await stream.send_all(_raw_request(b"d", size))
            got = 0
            while got < size:
                got += len(await stream.receive_some(1 << 18))
            return size / (time.perf_counter() - start) / 2**20

    return trio.run(run)


def triode_upload(address: str, size: int) -> float:
    chunk = memoryview(bytes(1 << 20))

    async def run() -> float:
        async with triode.connect(address) as client:
            await client.ping()
            start = time.perf_counter()
            async with client.connection.open_call("bench.upload", upload=True) as call:
                left = size
                while left:
                    n = min(left, len(chunk))
                    await call.send(chunk[:n])
                    left -= n
                assert await call.result() == size
            return size / (time.perf_counter() - start) / 2**20

    return trio.run(run)


def raw_upload(address: str, size: int) -> float:
    chunk = memoryview(bytes(1 << 20))

    async def run() -> float:
        stream = await _raw_connect(address)
        async with stream:
            start = time.perf_counter()
            await stream.send_all(_raw_request(b"u", size))
            left = size
            while left:
                n = min(left, len(chunk))
                await stream.send_all(chunk[:n])
                left -= n
            assert await stream.receive_some(1) == b"k"
            return size / (time.perf_counter() - start) / 2**20

    return trio.run(run)


@workload("rpc.stream", help="256 MiB streamed over one call, each direction")
def stream(b: Bench) -> None:
    size = (32 if b.quick else 256) * 2**20
    with servers(b) as (node, raw):
        b.compare(
            f"download {size >> 20} MiB", "MiB/s",
            subject=lambda: triode_download(node, size),
            baseline=("raw trio socket copy", lambda: raw_download(raw, size)),
            target=at_least(0.5),
        )
        b.compare(
            f"upload {size >> 20} MiB", "MiB/s",
            subject=lambda: triode_upload(node, size),
            baseline=("raw trio socket copy", lambda: raw_upload(raw, size)),
            target=at_least(0.5),
        )
