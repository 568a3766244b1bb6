"""The CAS over the wire: round trips, zstd, typed errors, cancellation from both ends, resumption."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
import trio
import zstandard

import triode
from triode.chunks import READ_CHUNK
from triode.errors import (
    BlobNotFound,
    ConnectionClosed,
    DigestMismatch,
    InvalidArgument,
    InvalidDigest,
    TooLarge,
)
from triode.model.digest import EMPTY, Digest
from triode.testing import no_leaks
from triode.wire.framing import RAW_CHUNK

MiB = 1024 * 1024


def _data(size: int, kind: str) -> bytes:
    if kind == "random":
        return os.urandom(size)
    return (b"compressible triode data " * (size // 25 + 1))[:size]


def _temp_files(node: triode.Node) -> list[str]:
    return os.listdir(Path(node.config.data) / "tmp")


async def _eventually(predicate) -> None:
    """Poll a condition on the node (there is no event for it), for at most 5 seconds."""
    with trio.fail_after(5):
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


class _Source:
    """Chunks of ``data``; blocks forever after ``hang_after`` chunks (an upload that stalls)."""

    def __init__(self, data: bytes, chunk: int = 256 * 1024, hang_after: int | None = None) -> None:
        self._data = memoryview(data)
        self._chunk = chunk
        self._hang_after = hang_after
        self.sent = 0
        self._pos = 0

    def __aiter__(self) -> _Source:
        return self

    async def __anext__(self) -> memoryview:
        if self._hang_after is not None and self.sent >= self._hang_after:
            await trio.sleep_forever()
        if self._pos >= len(self._data):
            raise StopAsyncIteration
        await trio.lowlevel.checkpoint()
        piece = self._data[self._pos : self._pos + self._chunk]
        self._pos += len(piece)
        self.sent += 1
        return piece


@pytest.mark.parametrize("encoding", ["identity", "zstd"])
@pytest.mark.parametrize("kind", ["random", "compressible"])
async def test_round_trips(client: triode.Client, node: triode.Node, encoding: str, kind: str) -> None:
    client.cas.compression = encoding
    sizes = [0, 1, 1000, RAW_CHUNK - 1, RAW_CHUNK + 1, READ_CHUNK - 1, READ_CHUNK + 1]
    for size in sizes:
        data = _data(size, kind)
        digest = await client.cas.put(data)
        assert digest == Digest.of(data)
        assert await client.cas.get(digest) == data
        async with client.cas.open_read(digest, offset=size // 2) as chunks:
            assert b"".join([c async for c in chunks]) == data[size // 2 :]
    assert _temp_files(node) == []


@pytest.mark.parametrize("encoding", ["identity", "zstd"])
async def test_64_mib(client: triode.Client, encoding: str, tmp_path) -> None:
    client.cas.compression = encoding
    data = _data(64 * MiB, "random" if encoding == "identity" else "compressible")
    digest = await client.cas.put(data)
    assert await client.cas.get(digest) == data
    await client.cas.write_to(digest, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data


async def test_find_missing_and_batches(client: triode.Client) -> None:
    present = [await client.cas.put(os.urandom(100)) for _ in range(3)]
    absent = [Digest.of(os.urandom(8)) for _ in range(3)]
    assert await client.cas.find_missing([*present, EMPTY, *absent, absent[0]]) == absent
    many = [(Digest.of(b), b) for b in (os.urandom(n) for n in range(1, 200))]
    result = await client.cas.batch_update(many)
    assert all(v is None for v in result.values())
    got = await client.cas.batch_read([d for d, _ in many] + absent)
    assert all(got[d] == b for d, b in many)
    assert all(got[d] is None for d in absent)


async def test_bad_input_is_typed_and_the_node_keeps_serving(
    client: triode.Client, node: triode.Node
) -> None:
    conn = client.connection
    data = os.urandom(3 * MiB)
    right = Digest.of(data)
    with pytest.raises(InvalidDigest):
        await conn.call("cas.find_missing", {"digests": [["zz", 3]]})
    with pytest.raises(InvalidDigest):
        await conn.call("cas.batch_read", {"digests": [[right.hash, -1]]})
    with pytest.raises(InvalidArgument):
        await conn.call("cas.find_missing", "not a map")
    with pytest.raises(InvalidArgument):
        await conn.call("cas.put", {"digest": right.to_wire(), "encoding": "brotli"})
    with pytest.raises(DigestMismatch):  # wrong hash
        await client.cas.put(data, Digest(Digest.of(b"x").hash, len(data)))
    with pytest.raises(DigestMismatch, match="longer"):  # wrong size
        await client.cas.put(data, Digest(right.hash, len(data) - 10))
    with pytest.raises(DigestMismatch, match="ended after"):  # truncated upload
        await client.cas.put_stream(_Source(data[: MiB]), right)
    with pytest.raises(DigestMismatch):  # small blobs go in batches; same errors
        await client.cas.put(b"abc", Digest.of(b"abd"))
    with pytest.raises(TooLarge):
        await client.cas.get(right, limit=10)
    assert await client.cas.find_missing([right]) == [right]
    assert _temp_files(node) == []
    assert await client.cas.put(data) == right


async def test_oversized_blob_is_refused(tmp_path) -> None:
    async with no_leaks(), triode.open_node(listen=None, cache_size=MiB) as node, node.connect() as client:
        with pytest.raises(TooLarge):
            await client.cas.put(os.urandom(MiB + 1))
        assert await client.cas.get(await client.cas.put(b"fine")) == b"fine"


async def test_zstd_bomb_is_refused(client: triode.Client, node: triode.Node) -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (4 * MiB))
    claimed = Digest.of(b"\0" * 1000)
    with pytest.raises(DigestMismatch, match="expands past"):
        async with client.connection.open_call(
            "cas.put", {"digest": claimed.to_wire(), "encoding": "zstd"}, upload=True
        ) as call:
            await call.send(struct.pack(">BI", 1, len(bomb)) + bomb)
            await call.result()
    assert await client.cas.find_missing([claimed]) == [claimed]
    assert _temp_files(node) == []
    assert await client.ping() >= 0


async def test_existing_blob_stops_the_upload_early(client: triode.Client) -> None:
    data = os.urandom(16 * MiB)
    digest = await client.cas.put(data)
    source = _Source(data, chunk=64 * 1024)
    assert await client.cas.put_stream(source, digest) == digest
    assert source.sent * 64 * 1024 < 4 * MiB  # stopped once the node answered


@pytest.mark.parametrize("encoding", ["identity", "zstd"])
async def test_cancel_put_from_the_client(tmp_path, encoding: str) -> None:
    data = _data(8 * MiB, "random" if encoding == "identity" else "compressible")
    async with no_leaks():
        async with triode.open_node(listen="127.0.0.1:0", data=tmp_path) as node:
            async with triode.connect(node.address) as client:
                client.cas.compression = encoding
                with trio.move_on_after(0.5) as scope:
                    await client.cas.put_stream(_Source(data, hang_after=12), Digest.of(data))
                assert scope.cancelled_caught
                await _eventually(lambda: _temp_files(node) == [])
                assert await client.cas.find_missing([Digest.of(data)]) == [Digest.of(data)]
                assert await client.ping() >= 0
    assert os.listdir(tmp_path / "tmp") == []


async def test_cancel_put_from_the_node_side(tmp_path) -> None:
    data = os.urandom(8 * MiB)
    digest = Digest.of(data)
    async with no_leaks():
        async with triode.open_node(listen="127.0.0.1:0", data=tmp_path) as node:
            async with triode.connect(node.address) as client, trio.open_nursery() as n:
                # The node drops the connection mid-upload: the handler is cancelled there.
                n.start_soon(_quietly, client.cas.put_stream, _Source(data, hang_after=12), digest)
                await _eventually(lambda: node.info()["storage"]["cas"]["writing_bytes"] > 0)
                for conn in list(node._connections):
                    conn.close("dropped by the test")
                await _eventually(lambda: _temp_files(node) == [])
                n.cancel_scope.cancel()
        # The node shuts down (its grace period runs out) while an upload is in flight.
        async with trio.open_nursery() as n:
            async with triode.open_node(listen="127.0.0.1:0", data=tmp_path, shutdown_grace=0.2) as node:
                client = await n.start(_connected, node.address)
                n.start_soon(_quietly, client.cas.put_stream, _Source(data, hang_after=12), digest)
                await _eventually(lambda: node.info()["storage"]["cas"]["writing_bytes"] > 0)
            n.cancel_scope.cancel()
    assert os.listdir(tmp_path / "tmp") == []


async def _quietly(fn, *args, **kwargs) -> None:
    try:
        await fn(*args, **kwargs)
    except ConnectionClosed:
        pass


async def _connected(address: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with triode.connect(address) as client:
        task_status.started(client)
        await trio.sleep_forever()


async def test_abandon_a_read_half_way(tmp_path) -> None:
    async with no_leaks():
        async with triode.open_node(listen="127.0.0.1:0", data=tmp_path) as node:
            async with triode.connect(node.address) as client:
                for encoding in ("identity", "zstd"):
                    digest = await client.cas.put(_data(32 * MiB, "compressible"))
                    async with client.cas.open_read(digest, encoding=encoding) as chunks:
                        async for _ in chunks:
                            break
                    await _eventually(lambda: node.info()["storage"]["cas"]["leased_or_reading"] == 0)
                    await _eventually(lambda: sum(c.serving for c in node._connections) == 0)
                    assert await client.cas.get(digest, encoding=encoding) == _data(32 * MiB, "compressible")


async def test_resume_after_a_cut_connection(tmp_path) -> None:
    data = os.urandom(12 * MiB + 5)
    digest = Digest.of(data)
    async with no_leaks():
        async with triode.open_node(listen="127.0.0.1:0", data=tmp_path) as node:
            async with triode.connect(node.address) as watcher:
                async with triode.connect(node.address) as first, trio.open_nursery() as n:
                    n.start_soon(lambda: _quietly(first.cas.put_stream, _Source(data, hang_after=24),
                                                  digest, upload_id="resume-test-1"))
                    with trio.fail_after(10):
                        while await watcher.cas.upload_status("resume-test-1") < 4 * MiB:  # noqa: ASYNC110
                            await trio.sleep(0.01)
                    first.connection.close("cable cut")
                    n.cancel_scope.cancel()  # the source would wait forever for its next chunk

                async def parked() -> dict:
                    return await watcher.connection.call("cas.upload_status", {"upload_id": "resume-test-1"})
                with trio.fail_after(10):
                    while (status := await parked())["active"]:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                offset = status["committed"]
                assert 4 * MiB <= offset < len(data)
                async with triode.connect(node.address) as second:
                    source = _Source(data[offset:])
                    await second.cas.put_stream(source, digest, upload_id="resume-test-1", offset=offset)
                    assert await second.cas.get(digest) == data
                    assert source.sent * 256 * 1024 < len(data) - 3 * MiB  # only the rest was sent
                assert _temp_files(node) == []


async def test_put_file_resumes(client: triode.Client, tmp_path) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(4 * MiB))
    digest = await client.cas.put_file(src, upload_id="file-upload-1")
    assert digest == Digest.of(src.read_bytes())
    assert await client.cas.upload_status("file-upload-1") == 0
    with pytest.raises(BlobNotFound):
        await client.cas.get(Digest.of(b"nope" * 100_000))


def _alter_stored(data_dir: Path, digest: Digest, *, at: int) -> None:
    (stored,) = data_dir.rglob(digest.hash)
    stored.chmod(0o644)
    with open(stored, "r+b") as f:
        f.seek(at)
        f.write(b"X")


@pytest.mark.parametrize("encoding", ["identity", "zstd"])
async def test_a_blob_altered_on_the_node_is_refused_by_the_reader(tmp_path, encoding: str) -> None:
    """Downloads are verified (by a hashing task beside the reader): bytes that do not match
    their digest end in DigestMismatch, and nothing is left running."""
    data = _data(9 * MiB, "compressible")
    async with no_leaks():
        async with triode.open_node(listen="127.0.0.1:0", data=tmp_path) as node:
            async with triode.connect(node.address) as client:
                digest = await client.cas.put(data)
                _alter_stored(Path(node.config.data), digest, at=5 * MiB)
                with pytest.raises(DigestMismatch, match="hash to"):
                    await client.cas.get(digest, encoding=encoding)
                with pytest.raises(DigestMismatch):
                    async with client.cas.open_read(digest, encoding=encoding) as chunks:
                        async for _ in chunks:
                            pass
                assert await client.ping()
