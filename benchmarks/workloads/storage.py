"""Storage: blob throughput, small gets, find_missing — beside raw baselines of the same run.

The node is a ``triode node`` process with a data dir (``b.spawn_node``); the client is
this process, so client and node run on separate cores as they would in use. Baselines:
single-core SHA-256 and zstd-1 compression speed (each in this process, on the same data),
and a bare trio socket copying the same bytes to a server process as minimal as it gets.
Uploads pass the digest (a build client knows it before it uploads); every byte is still
hashed by the node before it is stored, and every download is hashed by the client.

Targets: raw put+get at least 1/3 of single-core sha256 (random and compressible data);
zstd-1 put+get of compressible data at least 0.7x of zstd-1 compression alone; 1 KiB gets
at least 10,000/s at 64 concurrent; ``find_missing`` at least 200,000 digests/s; a node over
100,000 blobs serving within 5 s of its start (absolute figures, on the medians).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import trio
import zstandard

import triode
from triode.model.digest import Digest

from ..harness import Bench, at_least, at_most, run_concurrently, workload

MiB = 1024 * 1024

_RAW_SERVER = """
import sys, trio

PRESENT = set()  # find_missing's keys (32-byte hash + 8-byte size) the server "stores"

async def exactly(stream, n):
    buf = bytearray()
    while len(buf) < n:
        data = await stream.receive_some(n - len(buf))
        if not data:
            return None
        buf += data
    return bytes(buf)

async def handle(stream):
    head = b""
    while len(head) < 9:
        head += await stream.receive_some(9 - len(head))
    mode, n = head[:1], int.from_bytes(head[1:], "big")
    if mode == b"u":  # swallow n bytes, answer one
        while n:
            n -= len(await stream.receive_some(1 << 20))
        await stream.send_all(b"k")
    elif mode == b"d":  # send n bytes
        chunk = memoryview(bytes(1 << 20))
        while n:
            k = min(n, len(chunk))
            await stream.send_all(chunk[:k])
            n -= k
    elif mode == b"e":  # echo records of n bytes until EOF
        buf = bytearray()
        while data := await stream.receive_some(1 << 18):
            buf += data
            k = len(buf) - len(buf) % n
            if k:
                await stream.send_all(bytes(buf[:k]))
                del buf[:k]
    elif mode == b"p":  # keep n keys as present, answer one byte
        keys = await exactly(stream, n * 40)
        PRESENT.update(keys[i : i + 40] for i in range(0, len(keys), 40))
        await stream.send_all(b"k")
    elif mode == b"f":  # "r" (ready), then find_missing of n keys per request until EOF: count, missing keys
        await stream.send_all(b"r")
        while (keys := await exactly(stream, n * 40)) is not None:
            missing = [k for k in (keys[i : i + 40] for i in range(0, len(keys), 40)) if k not in PRESENT]
            await stream.send_all(len(missing).to_bytes(8, "big") + b"".join(missing))

async def main():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(handle, listeners)

trio.run(main)
"""


@contextlib.contextmanager
def _raw_server() -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", _RAW_SERVER], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)


async def _raw_stream(port: int, mode: bytes, n: int) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(mode + n.to_bytes(8, "big"))
    return stream


def _raw_upload(port: int, data: bytes) -> float:
    async def main() -> float:
        stream = await _raw_stream(port, b"u", len(data))
        start = time.perf_counter()
        view = memoryview(data)
        for i in range(0, len(view), MiB):
            await stream.send_all(view[i : i + MiB])
        await stream.receive_some(1)
        elapsed = time.perf_counter() - start
        await stream.aclose()
        return len(data) / elapsed / 1e6

    return trio.run(main)


def _raw_download(port: int, size: int) -> float:
    async def main() -> float:
        stream = await _raw_stream(port, b"d", size)
        start = time.perf_counter()
        buf = bytearray()
        while len(buf) < size:
            buf += await stream.receive_some(1 << 20)
        elapsed = time.perf_counter() - start
        await stream.aclose()
        return size / elapsed / 1e6

    return trio.run(main)


def _sha256_speed(data: bytes) -> float:
    start = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / (time.perf_counter() - start) / 1e6


def _zstd_speed(data: bytes) -> float:
    cctx = zstandard.ZstdCompressor(level=1)
    view = memoryview(data)
    start = time.perf_counter()
    for i in range(0, len(view), 256 * 1024):
        cctx.compress(view[i : i + 256 * 1024])
    return len(data) / (time.perf_counter() - start) / 1e6


def _transfer(address: str, data: bytes, encoding: str, *, part: str = "both") -> float:
    """One put (fresh blob: a new salt in the last 8 bytes) then one get; MB/s over both."""
    data = data[:-8] + os.urandom(8)
    digest = Digest.of(data)

    async def main() -> float:
        async with triode.connect(address) as client:
            client.cas.compression = encoding
            start = time.perf_counter()
            await client.cas.put(data, digest)
            put_done = time.perf_counter()
            got = await client.cas.get(digest)
            end = time.perf_counter()
            assert len(got) == len(data)
        if part == "put":
            return len(data) / (put_done - start) / 1e6
        if part == "get":
            return len(data) / (end - put_done) / 1e6
        return 2 * len(data) / (end - start) / 1e6

    return trio.run(main)


def _compressible(size: int) -> bytes:
    """Text-like data zstd-1 shrinks about 4x (source code repeated with variations)."""
    words = [b"def", b"return", b"self", b"import", b"trio", b"async", b"await", b"digest", b"=", b"(",
             b")", b":", b"\n    ", b"blob", b"node", b"for", b"in", b"if", b"None"]
    rng = __import__("random").Random(7)
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(words) for _ in range(64)) + b"%d\n" % rng.randrange(10**6)
    return bytes(out[:size])


@workload("storage.blobs", help="put+get of a large blob: raw and zstd-1, random and compressible")
def blobs(b: Bench) -> None:
    size = (32 if b.quick else 256) * MiB
    random_data = os.urandom(size)
    text = _compressible(size)
    with b.spawn_node() as address, _raw_server() as port:
        b.compare(f"{size // MiB} MiB put+get, raw, random", "MB/s",
                  subject=lambda: _transfer(address, random_data, "identity"),
                  baseline=("sha256, one core", lambda: _sha256_speed(random_data)), target=at_least(1 / 3))
        b.compare(f"{size // MiB} MiB put+get, raw, compressible", "MB/s",
                  subject=lambda: _transfer(address, text, "identity"),
                  baseline=("sha256, one core", lambda: _sha256_speed(text)), target=at_least(1 / 3))
        b.compare(f"{size // MiB} MiB put, raw", "MB/s",
                  subject=lambda: _transfer(address, random_data, "identity", part="put"),
                  baseline=("raw trio socket upload", lambda: _raw_upload(port, random_data)))
        b.compare(f"{size // MiB} MiB get, raw", "MB/s",
                  subject=lambda: _transfer(address, random_data, "identity", part="get"),
                  baseline=("raw trio socket download", lambda: _raw_download(port, size)))
        b.compare(f"{size // MiB} MiB put+get, zstd-1, compressible", "MB/s",
                  subject=lambda: _transfer(address, text, "zstd"),
                  baseline=("zstd-1 compression alone", lambda: _zstd_speed(text)), target=at_least(0.7))
        b.compare(f"{size // MiB} MiB put+get, zstd-1, random", "MB/s",
                  subject=lambda: _transfer(address, random_data, "zstd"),
                  baseline=("zstd-1 compression alone", lambda: _zstd_speed(random_data)))


def _small_gets(address: str, digests: list[Digest], concurrency: int) -> float:
    async def main() -> float:
        async with triode.connect(address) as client:
            return len(digests) / await run_concurrently(digests, concurrency, client.cas.get)

    return trio.run(main)


def _raw_echo(port: int, size: int, count: int, concurrency: int) -> float:
    """``count`` request/response pairs of ``size`` bytes, ``concurrency`` in flight."""
    async def main() -> float:
        stream = await _raw_stream(port, b"e", size)
        request = bytes(size)
        start = time.perf_counter()
        got = 0
        sent = min(concurrency, count)
        await stream.send_all(request * sent)
        while got < count * size:
            data = await stream.receive_some(1 << 18)
            before = got // size
            got += len(data)
            more = min(got // size - before, count - sent)
            if more > 0:
                await stream.send_all(request * more)
                sent += more
        elapsed = time.perf_counter() - start
        await stream.aclose()
        return count / elapsed

    return trio.run(main)


@workload("storage.small_gets", help="1 KiB gets per second, 64 concurrent, on one connection")
def small_gets(b: Bench) -> None:
    count = 5_000 if b.quick else 20_000
    blobs = [os.urandom(1024) for _ in range(2_000)]
    digests = [Digest.of(x) for x in blobs]

    async def upload(address: str) -> None:
        async with triode.connect(address) as client:
            await client.cas.batch_update(list(zip(digests, blobs, strict=True)))

    with b.spawn_node() as address, _raw_server() as port:
        trio.run(upload, address)
        order = [digests[i % len(digests)] for i in range(count)]
        b.compare("1 KiB gets, 64 concurrent", "gets/s",
                  subject=lambda: _small_gets(address, order, 64),
                  baseline=("raw socket 1 KiB echo, 64 in flight", lambda: _raw_echo(port, 1024, count, 64)),
                  target=at_least(10_000, "gets/s"))


def _find_missing(address: str, digests: list[Digest], rounds: int) -> float:
    """Digests/s of ``rounds`` find_missing calls of all ``digests`` on one connection."""

    async def main() -> float:
        async with triode.connect(address) as client:
            await client.ping()
            start = time.perf_counter()
            for _ in range(rounds):
                missing = await client.cas.find_missing(digests)
                assert len(missing) == len(digests) // 2
            return len(digests) * rounds / (time.perf_counter() - start)

    return trio.run(main)


def _key(digest: Digest) -> bytes:
    """A digest as the raw find_missing server takes it: 32 bytes of hash, 8 of size."""
    return bytes.fromhex(digest.hash) + digest.size.to_bytes(8, "big")


def _raw_keep(port: int, digests: list[Digest]) -> None:
    async def main() -> None:
        stream = await _raw_stream(port, b"p", len(digests))
        await stream.send_all(b"".join(_key(d) for d in digests))
        assert await stream.receive_some(1) == b"k"
        await stream.aclose()

    trio.run(main)


def _raw_find_missing(port: int, digests: list[Digest], rounds: int) -> float:
    """The same requests to a bare socket server checking each key against a set: digests/s."""
    request = b"".join(_key(d) for d in digests)

    async def main() -> float:
        stream = await _raw_stream(port, b"f", len(digests))
        assert await stream.receive_some(1) == b"r"  # its handler runs, as the node's does after a ping
        start = time.perf_counter()
        for _ in range(rounds):
            await stream.send_all(request)
            head = b""
            while len(head) < 8:
                head += await stream.receive_some(8 - len(head))
            left = int.from_bytes(head, "big") * 40
            assert left == len(digests) // 2 * 40
            while left:
                left -= len(await stream.receive_some(left))
        elapsed = time.perf_counter() - start
        await stream.aclose()
        return len(digests) * rounds / elapsed

    return trio.run(main)


@workload("storage.find_missing", help="find_missing of 10,000 digests (half present) in one call")
def find_missing(b: Bench) -> None:
    n = 10_000
    rounds = 2 if b.quick else 5
    present = [os.urandom(64) for _ in range(n // 2)]
    digests = [Digest.of(x) for x in present] + [Digest.of(os.urandom(64)) for _ in range(n // 2)]

    async def upload(address: str) -> None:
        async with triode.connect(address) as client:
            await client.cas.batch_update(list(zip(digests, present, strict=False)))

    with b.spawn_node() as address, _raw_server() as port:
        trio.run(upload, address)
        _raw_keep(port, digests[: n // 2])
        b.compare("find_missing, 10,000 digests in one call", "digests/s",
                  subject=lambda: _find_missing(address, digests, rounds),
                  baseline=("raw socket, each digest looked up in a set",
                            lambda: _raw_find_missing(port, digests, rounds)),
                  target=at_least(200_000, "digests/s"),
                  note=f"{rounds} calls per repetition on one open connection, on both sides; "
                       "the raw server takes 40-byte keys and answers the missing ones")


# -- Storage II: the backing tier, eviction, restart --------------------------------------


def _fresh_blobs(address: str, count: int, size: int) -> list[Digest]:
    """Store ``count`` new random blobs on the node at ``address`` (not timed)."""
    blobs = [os.urandom(size) for _ in range(count)]

    async def main() -> list[Digest]:
        async with triode.connect(address) as client:
            if size <= 64 * 1024:
                await client.cas.batch_update([(Digest.of(x), x) for x in blobs])
            else:
                for x in blobs:
                    await client.cas.put(x)
        return [Digest.of(x) for x in blobs]

    return trio.run(main)


def _read_all(address: str, digests: list[Digest], concurrency: int = 64) -> float:
    """Get every digest (``concurrency`` at once); bytes/s for one blob, blobs/s for many."""
    async def main() -> float:
        async with triode.connect(address) as client:
            elapsed = await run_concurrently(digests, min(concurrency, len(digests)), client.cas.get)
        if len(digests) == 1:
            return digests[0].size / elapsed / 1e6
        return len(digests) / elapsed

    return trio.run(main)


@workload("storage.read_through", help="reads through a front node from its backing node, beside direct")
def read_through(b: Bench) -> None:
    small = 200 if b.quick else 1000
    big = (32 if b.quick else 256) * MiB
    with b.spawn_node() as back, b.spawn_node("--backing", back) as front:
        b.compare(f"{small} small blobs (1 KiB), read through", "blobs/s",
                  subject=lambda: _read_all(front, _fresh_blobs(back, small, 1024)),
                  baseline=("read directly from the backing node",
                            lambda: _read_all(back, _fresh_blobs(back, small, 1024))))
        b.compare(f"one {big // MiB} MiB blob, read through", "MB/s",
                  subject=lambda: _read_all(front, _fresh_blobs(back, 1, big)),
                  baseline=("read directly from the backing node",
                            lambda: _read_all(back, _fresh_blobs(back, 1, big))))


def _churn(address: str, count: int, size: int) -> tuple[float, int]:
    """Put ``count`` new blobs of ``size``; blobs/s, and evictions the node made meanwhile."""
    blobs = [os.urandom(size) for _ in range(count)]

    async def main() -> tuple[float, int]:
        async with triode.connect(address) as client:
            before = (await client.info())["storage"]["cas"].get("evictions", 0)
            todo = iter(blobs)

            async def worker() -> None:
                for x in todo:
                    await client.cas.put(x)

            start = time.perf_counter()
            async with trio.open_nursery() as n:
                for _ in range(8):
                    n.start_soon(worker)
            elapsed = time.perf_counter() - start
            after = (await client.info())["storage"]["cas"].get("evictions", 0)
        return count / elapsed, after - before

    return trio.run(main)


@workload("storage.eviction", help="puts under churn past --cache-size (evicting) vs an unlimited node")
def eviction(b: Bench) -> None:
    count = 500 if b.quick else 2000
    size = 64 * 1024
    cache = 16 * MiB  # a fraction of what each repetition writes, so most puts evict
    evictions: list[int] = []

    def churned() -> float:
        rate, evicted = _churn(limited, count, size)
        evictions.append(evicted)
        return rate

    with b.spawn_node("--cache-size", str(cache)) as limited, b.spawn_node() as unlimited:
        fig = b.compare(f"{count} puts of 64 KiB past a 16 MiB cache", "blobs/s",
                        subject=churned,
                        baseline=("the same puts, no cache limit", lambda: _churn(unlimited, count, size)[0]))
        fig.note = f"evictions per repetition: {sorted(evictions)}"


def _populate(data_dir: str, count: int) -> None:
    """Lay out ``count`` small blobs as a node stores them (without going through a node)."""
    root = os.path.join(data_dir, "cas")
    for i in range(count):
        blob = i.to_bytes(8, "big") * 16
        h = hashlib.sha256(blob).hexdigest()
        shard = os.path.join(root, h[:2], h[2:4])
        os.makedirs(shard, exist_ok=True)
        with open(os.path.join(shard, h), "wb") as f:
            f.write(blob)


def _restart(b: Bench, data_dir: str, probe: Digest, scans: list[float] | None = None) -> float:
    """Seconds from starting ``triode node`` over ``data_dir`` to its first answer.

    The background index scan's own duration (the node's ``scan_seconds``) goes to ``scans``.
    """
    start = time.perf_counter()
    with b.spawn_node("--data", data_dir) as address:
        async def main() -> float:
            async with triode.connect(address) as client:
                assert await client.cas.find_missing([probe]) == []
                answered = time.perf_counter() - start
                if scans is not None:
                    with trio.fail_after(60):
                        while not (info := (await client.info())["storage"]["cas"])["scanned"]:  # noqa: ASYNC110 - polling a remote node
                            await trio.sleep(0.05)
                    scans.append(info["scan_seconds"])
                return answered

        return trio.run(main)


@workload("storage.restart", help="start-up time of a node over a data dir of 100,000 blobs")
def restart(b: Bench) -> None:
    count = 20_000 if b.quick else 100_000
    full = str(b.tmpdir / "full-data")
    small = str(b.tmpdir / "small-data")
    _populate(full, count)
    _populate(small, 1)
    # Both probe a stored blob (the empty digest would be answered without a lookup).
    probe = Digest.of((count - 1).to_bytes(8, "big") * 16)
    small_probe = Digest.of((0).to_bytes(8, "big") * 16)
    scans: list[float] = []
    fig = b.compare(f"start and answer, {count:,} blobs", "s",
                    subject=lambda: _restart(b, full, probe, scans),
                    baseline=("start and answer, a data dir of 1 blob",
                              lambda: _restart(b, small, small_probe)),
                    better="lower", target=at_most(5, "s"))
    fig.note = f"background index scan took {min(scans):.2f}-{max(scans):.2f} s"
