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
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from triode.proto import bytestream_pb2 as bs
from triode.proto import remote_execution_pb2 as pb

from ..harness import Bench, at_least, workload

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    port = _free_port()
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
    door = f"127.0.0.1:{_free_port()}"
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

_CC_RULES = ("cc_binary", "cc_library", "cc_test", "cc_import", "cc_proto_library", "cc_toolchain",
             "cc_toolchain_suite", "fdo_profile", "fdo_prefetch_hints", "objc_library", "objc_import")
_JAVA_RULES = ("java_binary", "java_import", "java_library", "java_plugin", "java_test", "java_runtime",
               "java_toolchain", "java_package_configuration", "java_proto_library",
               "java_lite_proto_library")
_SUMMARY = re.compile(r"INFO: \d+ process(?:es)?: (.*)\.")


def _stub(root: Path, name: str, sub: str, rules: tuple[str, ...]) -> Path:
    """A local @rules_cc / @rules_java re-exporting the native rules (Bazel 4 offline)."""
    repo = root / name
    (repo / sub).mkdir(parents=True)
    (repo / "BUILD").write_text("")
    (repo / "WORKSPACE").write_text(f'workspace(name = "{name}")\n')
    (repo / sub / "BUILD").write_text('exports_files(["defs.bzl"])\n')
    (repo / sub / "defs.bzl").write_text("".join(f"def {r}(**kw): native.{r}(**kw)\n" for r in rules))
    return repo


def _workspace(root: Path, units: int) -> Path:
    """``units`` C libraries, each with a generated header, linked into one binary."""
    ws = root / "ws"
    ws.mkdir(parents=True)
    cc = _stub(root / "stubs", "rules_cc", "cc", _CC_RULES)
    java = _stub(root / "stubs", "rules_java", "java", _JAVA_RULES)
    (ws / "WORKSPACE").write_text("")
    build = []
    for i in range(units):
        build.append(f'genrule(name = "gen{i}", outs = ["gen{i}.h"], '
                     f'cmd = "echo \'#define K{i} {i}\' > $@")\n'
                     f'cc_library(name = "u{i}", srcs = ["u{i}.c"], hdrs = ["gen{i}.h"])\n')
        body = "\n".join(f"static int f{i}_{j}(int x) {{ return x * {j} + K{i}; }}" for j in range(40))
        calls = " + ".join(f"f{i}_{j}(x)" for j in range(40))
        (ws / f"u{i}.c").write_text(f'#include "gen{i}.h"\n{body}\nint u{i}(int x) {{ return {calls}; }}\n')
    decls = "".join(f"int u{i}(int);\n" for i in range(units))
    total = " + ".join(f"u{i}(1)" for i in range(units))
    (ws / "main.c").write_text(f'#include <stdio.h>\n{decls}int main(void) {{ printf("%d\\n", {total}); }}\n')
    deps = ", ".join(f'":u{i}"' for i in range(units))
    build.append(f'cc_binary(name = "app", srcs = ["main.c"], deps = [{deps}])\n')
    (ws / "BUILD").write_text("".join(build))
    (ws / ".bazelrc").write_text(
        f"startup --output_user_root={root / 'bazel-root'}\nstartup --max_idle_secs=600\n"
        f"build --override_repository=rules_cc={cc}\nbuild --override_repository=rules_java={java}\n"
        "build --spawn_strategy=processwrapper-sandbox\nbuild --color=no --curses=no\n"
    )
    return ws


def _bazel(bazel: str, ws: Path, *args: str) -> str:
    done = subprocess.run([bazel, "--nohome_rc", *args], cwd=ws, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HOME": str(ws.parent / "home")})
    if done.returncode != 0:
        raise RuntimeError(f"bazel {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stderr


def _clean_build(bazel: str, ws: Path, cache: str, *, expect: str, forbid: str = "") -> float:
    """Seconds of ``bazel build`` after ``bazel clean``; checks where the actions ran."""
    _bazel(bazel, ws, "clean")
    start = time.perf_counter()
    out = _bazel(bazel, ws, "build", "//:app", f"--remote_cache=grpc://{cache}")
    elapsed = time.perf_counter() - start
    match = _SUMMARY.search(out)
    if match is None or expect not in match.group(1) or (forbid and forbid in match.group(1)):
        raise RuntimeError(f"expected {expect!r} (and no {forbid!r}) in Bazel's summary, got: "
                           f"{match and match.group(0)}")
    return elapsed


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
        ws = _workspace(root, 8 if b.quick else 24)
        (root / "home").mkdir()
        try:
            for cache in (door, buildgrid):  # fill each cache: every action runs once, locally
                _clean_build(bazel, ws, cache, expect="processwrapper-sandbox", forbid="remote cache hit")
            hits = {"expect": "remote cache hit", "forbid": "processwrapper-sandbox"}
            b.compare("clean build, every action a remote cache hit", "s",
                      subject=lambda: _clean_build(bazel, ws, door, **hits),
                      baseline=("BuildGrid 0.4.4", lambda: _clean_build(bazel, ws, buildgrid, **hits)),
                      better="lower",
                      note="bazel 4 (Debian's bazel-bootstrap), one C library per unit, a warm Bazel server")
        finally:
            subprocess.run([bazel, "--nohome_rc", "shutdown"], cwd=ws, capture_output=True, timeout=120,
                           env={**os.environ, "HOME": str(root / "home")})
