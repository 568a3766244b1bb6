"""DiskCAS and MemoryCAS: the CAS contract, verification, atomic storage, leases, resumption."""

from __future__ import annotations

import os
import stat
import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triode.chunks import READ_CHUNK, bytes_chunks
from triode.errors import BlobNotFound, DigestMismatch, FailedPrecondition, InvalidDigest, TooLarge
from triode.model.digest import EMPTY, Digest
from triode.storage.cas import CAS
from triode.storage.disk import DiskCAS, atomic_write_many, sweep_temp
from triode.storage.memory import MemoryCAS
from triode.testing import no_leaks


@pytest.fixture(params=["disk", "memory"])
def store(request, tmp_path) -> CAS:
    if request.param == "disk":
        return DiskCAS(tmp_path / "data")
    return MemoryCAS(limit=256 * 1024 * 1024)


def _temp_files(store: CAS) -> list[str]:
    return os.listdir(store.tmp_dir) if isinstance(store, DiskCAS) else []


class _Chunks:
    def __init__(self, pieces: list[bytes], *, hang_after: int | None = None) -> None:
        self._pieces = list(pieces)
        self._hang_after = hang_after
        self.sent = 0

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self._hang_after is not None and self.sent >= self._hang_after:
            await trio.sleep_forever()
        if not self._pieces:
            raise StopAsyncIteration
        await trio.lowlevel.checkpoint()
        self.sent += 1
        return self._pieces.pop(0)


def test_digest_parsing() -> None:
    d = Digest.of(b"abc")
    assert Digest.parse(str(d)) == d
    assert Digest.from_wire(d.to_wire()) == d
    for bad in ["", "abc/3", d.hash + "/", d.hash + "/-1", d.hash.upper() + "/3", d.hash + "/03",
                d.hash + "3", "/".join([d.hash, "3", "4"])]:
        with pytest.raises(InvalidDigest):
            Digest.parse(bad)
    with pytest.raises(InvalidDigest):
        Digest.from_wire([d.hash, "3"])


_hex = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_wire_digest = st.one_of(
    st.tuples(_hex, st.integers(min_value=0, max_value=2**40)).map(list),  # good: most of them
    st.tuples(_hex, st.integers(min_value=0, max_value=2**40)).map(list),
    st.tuples(_hex.map(str.upper), st.integers(0, 10)).map(list),
    st.tuples(_hex.map(lambda h: h[:63] + "\u00e9"), st.integers(0, 10)).map(list),
    st.tuples(_hex.map(lambda h: h[:63] + "g"), st.integers(0, 10)).map(list),
    st.tuples(_hex, st.integers(max_value=-1)).map(list),
    st.tuples(_hex, st.floats()).map(list),
    st.tuples(_hex.map(lambda h: h[:40])),
    st.just([EMPTY.hash, 0, 1]),
    st.none(),
)


@given(st.lists(_wire_digest, max_size=20))
def test_digest_lists_from_the_wire_are_checked_like_single_digests(values: list) -> None:
    # from_wire_list checks all the hashes in one pass; it must accept and refuse exactly
    # what from_wire does, one item at a time.
    expected: list[Digest] | None = []
    for value in values:
        try:
            expected.append(Digest.from_wire(value))
        except InvalidDigest:
            expected = None
            break
    if expected is None:
        with pytest.raises(InvalidDigest):
            Digest.from_wire_list(values)
    else:
        assert Digest.from_wire_list(values) == expected


@pytest.mark.parametrize("size", [0, 1, READ_CHUNK - 1, READ_CHUNK, READ_CHUNK + 1])
async def test_round_trip(store: CAS, size: int) -> None:
    data = os.urandom(size)
    digest = await store.put(data)
    assert digest == Digest.of(data)
    assert await store.get(digest) == data
    async with store.open_read(digest) as chunks:
        assert b"".join([c async for c in chunks]) == data
    assert await store.find_missing([digest, digest]) == []
    assert _temp_files(store) == []


async def test_empty_blob_always_exists(store: CAS) -> None:
    assert await store.find_missing([EMPTY]) == []
    assert await store.get(EMPTY) == b""
    if isinstance(store, DiskCAS):
        assert store.path_of(EMPTY).read_bytes() == b""
    with pytest.raises(DigestMismatch):
        await store.put(b"x", EMPTY)


async def test_missing_blob(store: CAS) -> None:
    digest = Digest.of(b"absent")
    assert await store.find_missing([digest]) == [digest]
    with pytest.raises(BlobNotFound):
        await store.get(digest)
    with pytest.raises(BlobNotFound):
        async with store.open_read(Digest.of(b"x" * 100_000)):
            pass


async def test_mismatches_store_nothing(store: CAS) -> None:
    data = b"hello world" * 10_000
    right = Digest.of(data)
    wrong_hash = Digest(Digest.of(b"other").hash, len(data))
    with pytest.raises(DigestMismatch):
        await store.put(data, wrong_hash)
    with pytest.raises(DigestMismatch, match="longer"):
        await store.put(data, Digest(right.hash, len(data) - 1))
    with pytest.raises(DigestMismatch, match="ended after"):
        await store.put(data, Digest(right.hash, len(data) + 1))
    assert await store.find_missing([right, wrong_hash]) == [right, wrong_hash]
    assert _temp_files(store) == []
    assert store.uploads.status("x") is None
    assert await store.put(data, right) == right  # the store is fine afterwards


async def test_too_large(tmp_path) -> None:
    store = MemoryCAS(limit=1000)
    with pytest.raises(TooLarge):
        await store.put(b"x" * 1001)
    disk = DiskCAS(tmp_path, max_blob_size=10)
    with pytest.raises(TooLarge):
        await disk.put(b"x" * 11)
    with pytest.raises(TooLarge):
        await disk.get(await disk.put(b"x" * 10), limit=5)


async def test_concurrent_puts_of_one_blob_write_once(store: CAS) -> None:
    data = os.urandom(3 * READ_CHUNK)
    digest = Digest.of(data)
    sources = [_Chunks([data[i : i + 1000] for i in range(0, len(data), 1000)]) for _ in range(10)]
    async with trio.open_nursery() as n:
        for src in sources:
            n.start_soon(store.put_stream, src, digest)
    assert await store.get(digest) == data
    assert store.counters["puts"] == 1
    # Every other put saw the blob and stopped without reading its source.
    assert sum(1 for s in sources if s.sent == 0) == 9


async def test_cancelled_put_leaves_nothing(store: CAS) -> None:
    data = os.urandom(2 * READ_CHUNK)
    digest = Digest.of(data)
    src = _Chunks([data[:READ_CHUNK + 5], data[READ_CHUNK + 5:]], hang_after=1)
    async with no_leaks():
        with trio.move_on_after(0.2):
            await store.put_stream(src, digest)
    assert await store.find_missing([digest]) == [digest]
    assert _temp_files(store) == []
    assert store.uploads.status("u") is None


async def test_resume_a_cut_upload(store: CAS) -> None:
    data = os.urandom(3 * READ_CHUNK + 11)
    digest = Digest.of(data)
    # The cut upload keeps its temp file open for the resumption; once resumed, nothing is left.
    async with no_leaks():
        with trio.move_on_after(0.2):
            await store.put_stream(_Chunks([data[:READ_CHUNK * 2], data[READ_CHUNK * 2:]], hang_after=1),
                                   digest, upload_id="upload-1")
        got, committed, active = store.uploads.status("upload-1")
        assert (got, committed, active) == (digest, 2 * READ_CHUNK, False)
        with pytest.raises(FailedPrecondition, match="resume from offset"):
            await store.put_stream(bytes_chunks(data[5:]), digest, upload_id="upload-1", offset=5)
        await store.put_stream(bytes_chunks(data[committed:]), digest, upload_id="upload-1", offset=committed)
    assert await store.get(digest) == data
    assert store.uploads.status("upload-1") is None
    assert _temp_files(store) == []


async def test_partial_uploads_are_bounded_and_swept(tmp_path) -> None:
    store = DiskCAS(tmp_path, max_partial_uploads=3, partial_max_age=10)
    # The cut uploads keep their temp files open (at most 3) until they are swept.
    async with no_leaks():
        for i in range(5):
            data = os.urandom(READ_CHUNK * 2)
            with trio.move_on_after(0.1):
                await store.put_stream(_Chunks([data[:READ_CHUNK], data[READ_CHUNK:]], hang_after=1),
                                       Digest.of(data), upload_id=f"upload-{i}")
        assert len(store.uploads) == 3 and len(_temp_files(store)) == 3
        assert store.uploads.status("upload-0") is None and store.uploads.status("upload-4") is not None
        assert store.uploads.sweep() == 0
        assert store.uploads.sweep(now=time.monotonic() + 11) == 3
    assert _temp_files(store) == []


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=5000), cuts=st.lists(st.integers(0, 5000), max_size=10))
async def test_any_chunking_stores_the_same_blob(tmp_path, data: bytes, cuts: list[int]) -> None:
    store = DiskCAS(tmp_path / "h")
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    digest = await store.put_stream(_Chunks(pieces), Digest.of(data))
    assert await store.get(digest) == data


async def test_disk_layout_read_only_and_hard_linkable(tmp_path) -> None:
    store = DiskCAS(tmp_path)
    digest = await store.put(b"payload")
    path = store.path_of(digest)
    assert path == tmp_path / "cas" / digest.hash[:2] / digest.hash
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    os.link(path, tmp_path / "linked")
    assert (tmp_path / "linked").read_bytes() == b"payload"
    assert store.path_of(Digest.of(b"nope")) is None


async def test_put_file_and_write_to(store: CAS, tmp_path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(READ_CHUNK * 2 + 3))
    digest = await store.put_file(src)
    assert digest == Digest.of(src.read_bytes())
    out = tmp_path / "out.bin"
    await store.write_to(digest, out)
    assert out.read_bytes() == src.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []
    with pytest.raises(BlobNotFound):
        await store.write_to(Digest.of(b"x" * 100), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []


async def test_abandoned_read_is_closed(tmp_path) -> None:
    store = DiskCAS(tmp_path)
    digest = await store.put(os.urandom(4 * READ_CHUNK))
    async with no_leaks():
        async with store.open_read(digest) as chunks:
            async for _ in chunks:
                break
    assert store.info()["leased_or_reading"] == 0


async def test_batches(store: CAS) -> None:
    blobs = [os.urandom(n) for n in (0, 1, 100, 5000)]
    pairs = [(Digest.of(b), b) for b in blobs]
    bad = (Digest.of(b"right"), b"wrong")
    result = await store.batch_update([*pairs, bad])
    assert isinstance(result[bad[0]], DigestMismatch)
    assert all(result[d] is None for d, _ in pairs)
    got = await store.batch_read([d for d, _ in pairs] + [bad[0]])
    assert got[bad[0]] is None
    assert all(got[d] == b for d, b in pairs)


async def test_memory_lru_keeps_within_limit() -> None:
    store = MemoryCAS(limit=10_000)
    digests = [await store.put(os.urandom(3000)) for _ in range(3)]
    await store.get(digests[0])  # now most recently used
    await store.put(os.urandom(3000))
    assert store.size <= 10_000
    assert await store.find_missing(digests) == [digests[1]]


def test_temp_files_of_dead_writers_are_swept(tmp_path) -> None:
    store = DiskCAS(tmp_path)
    (store.tmp_dir / "999999999.dead.writer").write_bytes(b"half a blob")
    mine = store.tmp_dir / f"{os.getpid()}.live.writer"
    mine.write_bytes(b"in progress")
    assert sweep_temp(store.tmp_dir) == 1
    assert os.listdir(store.tmp_dir) == [mine.name]
    assert DiskCAS(tmp_path).swept == 0


async def test_lease_is_sync_and_async(tmp_path) -> None:
    store = DiskCAS(tmp_path)
    d = await store.put(b"leased")
    with store.lease([d]):
        assert store.info()["leased_or_reading"] == 1
    async with store.lease([d]):
        assert store.info()["leased_or_reading"] == 1
    assert store.info()["leased_or_reading"] == 0




async def test_memory_lease_protects_from_eviction() -> None:
    store = MemoryCAS(limit=10_000)
    kept = await store.put(os.urandom(4000))
    assert store.path_of(kept) is None
    with store.lease([kept]):
        await store.put(os.urandom(4000))
        await store.put(os.urandom(4000))
        assert await store.find_missing([kept]) == []
    assert store.size <= 10_000


async def test_drop_damaged_removes_the_file_and_its_record(tmp_path) -> None:
    """path_of trusts the store's record, so a blob found altered is dropped through the store."""
    store = DiskCAS(tmp_path)
    digest = await store.put(b"x" * 100)
    path = store.path_of(digest)
    assert path is not None
    size = store.size
    assert not store.drop_damaged(digest, path.stat().st_ino + 1)  # replaced since: kept
    assert store.drop_damaged(digest, path.stat().st_ino)
    assert not path.exists() and store.path_of(digest) is None and store.size == size - 100
    assert await store.find_missing([digest]) == [digest]


def test_atomic_write_many_keeps_what_it_placed_before_a_failure(tmp_path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    (tmp_path / "not-a-dir").write_bytes(b"")
    files = [
        (tmp_path / "a" / "one", b"1"), (tmp_path / "not-a-dir" / "two", b"2"), (tmp_path / "three", b"3"),
    ]
    with pytest.raises(OSError):
        atomic_write_many(tmp, files)
    assert (tmp_path / "a" / "one").read_bytes() == b"1"  # placed (and its dir fsynced) before the failure
    assert not (tmp_path / "three").exists()
    assert list(tmp.iterdir()) == []  # no temp file left behind
    atomic_write_many(tmp, [(tmp_path / "three", b"3"), (tmp_path / "a" / "four", b"4")], 0o644)
    assert (tmp_path / "three").read_bytes() == b"3" and (tmp_path / "a" / "four").read_bytes() == b"4"
    assert stat.S_IMODE((tmp_path / "three").stat().st_mode) == 0o644
