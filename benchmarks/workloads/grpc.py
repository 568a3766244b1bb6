"""The gRPC door (``--grpc``, REAPI v2) beside BuildGrid, one grpcio client for both, in one run.

BuildGrid (a Python REAPI server on grpcio) is the peer: ``pip install buildgrid`` in a venv
of its own (BuildGrid 0.4.4 on Python 3.11) and name its ``bgd`` in ``TRIODE_BUILDGRID``
(for example ``TRIODE_BUILDGRID=/tmp/buildgrid-venv/bin/bgd``). It runs with a disk CAS and
an in-memory action cache, no database (its execution service would need PostgreSQL and
workers). Without it, or without grpcio (a test dependency), each workload prints why it
is skipped. Both servers are processes of their own on loopback; the client (grpcio, sync
API) runs in this process, the same code for both.

* ``grpc.bytestream``: a 256 MiB ByteStream Write (1 MiB messages) and Read. Target: at
  least BuildGrid's speed.
* ``grpc.small_blobs``: 1,000 blobs of 1 KiB, one ByteStream Write each, then one Read
  each, 8 calls in flight (Bazel's pattern: one call per blob, several at once). Target:
  at least 2x BuildGrid.
* ``grpc.batches``: the same 1,000 blobs in one BatchUpdateBlobs, then one BatchReadBlobs.
  Target: at least BuildGrid's speed.
* ``grpc.bazel``: a Bazel build after ``bazel clean``, every action a remote cache hit
  (``--remote_cache=grpc://``), from the node and from BuildGrid (no target: Bazel's own
  work is most of it). Skipped without bazel.

Every written blob is new to both servers (fresh random bytes per repetition): a blob
already stored would be answered without being written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from triode.proto import bytestream_pb2 as bs
from triode.proto import remote_execution_pb2 as pb

from ..harness import Bench, at_least, workload
from .bazel_build import clean_build, free_port, workspace

try:
    import grpc
except ImportError:  # a test dependency: the workloads say so and skip
    grpc = None

MiB = 1024 * 1024
#: Where the BuildGrid to compare with is named: the path of its ``bgd``.
BUILDGRID_ENV = "TRIODE_BUILDGRID"
#: Calls in flight for the per-blob figures.
IN_FLIGHT = 8
CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
OPTIONS = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]

BUILDGRID_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true
authorization:
  method: none
storages:
  - !disk-storage &main-storage
    path: {path}
caches:
  - !lru-action-cache &main-action
    storage: *main-storage
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: true
instances:
  - name: ""
    services:
      - !action-cache
        cache: *main-action
      - !cas
        storage: *main-storage
      - !bytestream
        storage: *main-storage
thread-pool-size: 20
"""


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


def _digest(data: bytes) -> pb.Digest:
    return pb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class Client:
    """One grpcio channel and the methods the workloads call."""

    def __init__(self, address: str) -> None:
        assert grpc is not None
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.write = self.channel.stream_unary("/google.bytestream.ByteStream/Write",
                                               request_serializer=_serialize,
                                               response_deserializer=bs.WriteResponse.FromString)
        self.read = self.channel.unary_stream("/google.bytestream.ByteStream/Read",
                                              request_serializer=_serialize,
                                              response_deserializer=bs.ReadResponse.FromString)
        self.batch_update = self.channel.unary_unary(
            CAS + "BatchUpdateBlobs", request_serializer=_serialize,
            response_deserializer=pb.BatchUpdateBlobsResponse.FromString)
        self.batch_read = self.channel.unary_unary(
            CAS + "BatchReadBlobs", request_serializer=_serialize,
            response_deserializer=pb.BatchReadBlobsResponse.FromString)
        self.capabilities = self.channel.unary_unary(
            "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities", request_serializer=_serialize,
            response_deserializer=pb.ServerCapabilities.FromString)

    def close(self) -> None:
        self.channel.close()

    def write_requests(self, data: bytes, d: pb.Digest, chunk: int) -> Iterator[bs.WriteRequest]:
        resource = f"uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size_bytes}"
        for offset in range(0, max(len(data), 1), chunk):
            yield bs.WriteRequest(resource_name=resource if not offset else "", write_offset=offset,
                                  data=data[offset : offset + chunk],
                                  finish_write=offset + chunk >= len(data))

    def read_blob(self, d: pb.Digest) -> Any:
        """A Read of the whole blob (a call to iterate)."""
        return self.read(bs.ReadRequest(resource_name=f"blobs/{d.hash}/{d.size_bytes}"))


def _in_flight(start: Callable[[Any], Any], finish: Callable[[Any], Any], items: Iterable[Any]) -> None:
    """Start a call per item, keeping IN_FLIGHT of them running."""
    running: deque[Any] = deque()
    for item in items:
        running.append(start(item))
        if len(running) >= IN_FLIGHT:
            finish(running.popleft())
    while running:
        finish(running.popleft())


@contextlib.contextmanager
def _buildgrid(b: Bench, bgd: str) -> Iterator[str]:
    """A BuildGrid server (disk CAS, in-memory action cache) on loopback; its address."""
    root = b.tmpdir / f"buildgrid-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    port = free_port()
    config = root / "buildgrid.yml"
    config.write_text(BUILDGRID_CONFIG.format(port=port, path=root / "cas"))
    log = open(root / "buildgrid.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([bgd, "server", "start", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    address = f"127.0.0.1:{port}"
    try:
        client = Client(address)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    client.capabilities(pb.GetCapabilitiesRequest(), timeout=2)
                    break
                except grpc.RpcError:  # type: ignore[union-attr]
                    if proc.poll() is not None or time.monotonic() > deadline:
                        text = (root / "buildgrid.log").read_text(errors="replace")[-2000:]
                        raise RuntimeError(f"BuildGrid did not start: {text}") from None
                    time.sleep(0.2)
        finally:
            client.close()
        yield address
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _servers(b: Bench) -> Iterator[tuple[str, str] | None]:
    """(the node's gRPC address, BuildGrid's), or None (with a line saying why) to skip."""
    bgd = os.environ.get(BUILDGRID_ENV)
    if grpc is None:
        b.progress(f"  {b.current}: skipped: grpcio is not installed (pip install -e '.[test]')")
        yield None
        return
    if not bgd or not os.access(bgd, os.X_OK):
        b.progress(f"  {b.current}: skipped: no BuildGrid to compare with: set {BUILDGRID_ENV} to its "
                   "bgd (python3.11 -m venv /tmp/buildgrid-venv && /tmp/buildgrid-venv/bin/pip install "
                   f"buildgrid; then {BUILDGRID_ENV}=/tmp/buildgrid-venv/bin/bgd)")
        yield None
        return
    door = f"127.0.0.1:{free_port()}"
    with b.spawn_node("--grpc", door), _buildgrid(b, bgd) as buildgrid:
        yield door, buildgrid


# -- the workloads ----------------------------------------------------------------------------


def _upload(address: str, data: bytes, d: pb.Digest) -> float:
    client = Client(address)
    try:
        start = time.perf_counter()
        response = client.write(client.write_requests(data, d, MiB))
        elapsed = time.perf_counter() - start
        assert response.committed_size == len(data), response
        return len(data) / elapsed / 1e6
    finally:
        client.close()


def _download(address: str, d: pb.Digest) -> float:
    client = Client(address)
    try:
        start = time.perf_counter()
        size = sum(len(r.data) for r in client.read_blob(d))
        elapsed = time.perf_counter() - start
        assert size == d.size_bytes
        return size / elapsed / 1e6
    finally:
        client.close()


class _Fresh:
    """A large blob made new for each upload (its first 16 bytes changed), and its digest."""

    def __init__(self, size: int) -> None:
        self.body = os.urandom(size - 16)

    def next(self) -> tuple[bytes, pb.Digest]:
        data = os.urandom(16) + self.body
        return data, _digest(data)


@workload("grpc.bytestream", help="a 256 MiB ByteStream Write and Read, the node vs BuildGrid")
def bytestream(b: Bench) -> None:
    size = (32 if b.quick else 256) * MiB
    with _servers(b) as servers:
        if servers is None:
            return
        door, buildgrid = servers
        fresh = _Fresh(size)
        written: dict[str, pb.Digest] = {}

        def upload(address: str) -> float:
            data, d = fresh.next()
            written[address] = d
            return _upload(address, data, d)

        b.compare(f"ByteStream upload {size // MiB} MiB", "MB/s",
                  subject=lambda: upload(door), baseline=("BuildGrid 0.4.4", lambda: upload(buildgrid)),
                  target=at_least(1.0), note="grpcio client, 1 MiB WriteRequests")
        b.compare(f"ByteStream download {size // MiB} MiB", "MB/s",
                  subject=lambda: _download(door, written[door]),
                  baseline=("BuildGrid 0.4.4", lambda: _download(buildgrid, written[buildgrid])),
                  target=at_least(1.0), note="grpcio client; each server's own ReadResponse sizes")


def _small(n: int) -> list[tuple[bytes, pb.Digest]]:
    blobs = [os.urandom(1024) for _ in range(n)]
    return [(data, _digest(data)) for data in blobs]


def _write_each(address: str, blobs: list[tuple[bytes, pb.Digest]]) -> float:
    client = Client(address)
    try:
        start = time.perf_counter()
        _in_flight(lambda blob: client.write.future(client.write_requests(blob[0], blob[1], 16 * 1024)),
                   lambda future: future.result(), blobs)
        return len(blobs) / (time.perf_counter() - start)
    finally:
        client.close()


def _read_each(address: str, blobs: list[tuple[bytes, pb.Digest]]) -> float:
    client = Client(address)
    try:
        start = time.perf_counter()

        _in_flight(lambda blob: client.read_blob(blob[1]), lambda call: b"".join(r.data for r in call), blobs)
        return len(blobs) / (time.perf_counter() - start)
    finally:
        client.close()


@workload("grpc.small_blobs", help="1,000 x 1 KiB, one ByteStream call each, the node vs BuildGrid")
def small_blobs(b: Bench) -> None:
    count = 1000
    with _servers(b) as servers:
        if servers is None:
            return
        door, buildgrid = servers
        last: dict[str, list[tuple[bytes, pb.Digest]]] = {}

        def write(address: str) -> float:
            last[address] = _small(count)
            return _write_each(address, last[address])

        note = f"grpcio client, {IN_FLIGHT} calls in flight, one blob per call"
        b.compare(f"ByteStream Write of {count:,} x 1 KiB, one call each", "blobs/s",
                  subject=lambda: write(door), baseline=("BuildGrid 0.4.4", lambda: write(buildgrid)),
                  target=at_least(2.0), note=note)
        b.compare(f"ByteStream Read of {count:,} x 1 KiB, one call each", "blobs/s",
                  subject=lambda: _read_each(door, last[door]),
                  baseline=("BuildGrid 0.4.4", lambda: _read_each(buildgrid, last[buildgrid])),
                  target=at_least(2.0), note=note)


def _batch_update(address: str, blobs: list[tuple[bytes, pb.Digest]]) -> float:
    client = Client(address)
    try:
        request = pb.BatchUpdateBlobsRequest(requests=[
            pb.BatchUpdateBlobsRequest.Request(digest=d, data=data) for data, d in blobs])
        start = time.perf_counter()
        response = client.batch_update(request)
        elapsed = time.perf_counter() - start
        assert all(r.status.code == 0 for r in response.responses)
        return len(blobs) / elapsed
    finally:
        client.close()


def _batch_read(address: str, blobs: list[tuple[bytes, pb.Digest]]) -> float:
    client = Client(address)
    try:
        request = pb.BatchReadBlobsRequest(digests=[d for _, d in blobs])
        start = time.perf_counter()
        response = client.batch_read(request)
        elapsed = time.perf_counter() - start
        assert [r.data for r in response.responses] == [data for data, _ in blobs]
        return len(blobs) / elapsed
    finally:
        client.close()


@workload("grpc.batches", help="BatchUpdateBlobs and BatchReadBlobs of 1,000 x 1 KiB, the node vs BuildGrid")
def batches(b: Bench) -> None:
    count = 1000
    with _servers(b) as servers:
        if servers is None:
            return
        door, buildgrid = servers
        last: dict[str, list[tuple[bytes, pb.Digest]]] = {}

        def update(address: str) -> float:
            last[address] = _small(count)
            return _batch_update(address, last[address])

        note = "grpcio client, one request of the whole batch"
        b.compare(f"BatchUpdateBlobs of {count:,} x 1 KiB", "blobs/s",
                  subject=lambda: update(door), baseline=("BuildGrid 0.4.4", lambda: update(buildgrid)),
                  target=at_least(1.0), note=note)
        b.compare(f"BatchReadBlobs of {count:,} x 1 KiB", "blobs/s",
                  subject=lambda: _batch_read(door, last[door]),
                  baseline=("BuildGrid 0.4.4", lambda: _batch_read(buildgrid, last[buildgrid])),
                  target=at_least(1.0), note=note)


# -- Bazel ------------------------------------------------------------------------------------



@workload("grpc.bazel", help="a Bazel clean rebuild from the gRPC remote cache, the node vs BuildGrid")
def bazel_build(b: Bench) -> None:
    bazel = shutil.which("bazel")
    if bazel is None:
        b.progress("  grpc.bazel: skipped: bazel is not installed (apt-get install bazel-bootstrap)")
        return
    with _servers(b) as servers:
        if servers is None:
            return
        door, buildgrid = servers
        root = b.tmpdir / "grpc-bazel"
        ws = workspace(root, 8 if b.quick else 24)
        (root / "home").mkdir()
        try:
            for cache in (door, buildgrid):  # fill each cache: every action runs once, locally
                clean_build(bazel, ws, f"--remote_cache=grpc://{cache}", expect="processwrapper-sandbox",
                             forbid="remote cache hit")
            hits = {"expect": "remote cache hit", "forbid": "processwrapper-sandbox"}

            def from_cache(address: str) -> float:
                return clean_build(bazel, ws, f"--remote_cache=grpc://{address}", **hits)

            b.compare("clean build, every action a remote cache hit", "s",
                      subject=lambda: from_cache(door),
                      baseline=("BuildGrid 0.4.4", lambda: from_cache(buildgrid)),
                      better="lower",
                      note="bazel 4 (Debian's bazel-bootstrap), one C library per unit, a warm Bazel server")
        finally:
            subprocess.run([bazel, "--nohome_rc", "shutdown"], cwd=ws, capture_output=True, timeout=120,
                           env={**os.environ, "HOME": str(root / "home")})
