"""What the disk store promises about crashes: the one-level layout, the action cache's
sync barrier, a blob cut short by a power cut, and batches written in one hop."""

from __future__ import annotations

import os

import pytest
import trio

import triode.storage.aclog as aclog
import triode.storage.disk as disk
from triode.errors import DigestMismatch, ResourceExhausted
from triode.model.digest import Digest
from triode.model.result import ActionResult, CapturedStream
from triode.storage.ac import ActionCache
from triode.storage.disk import DiskCAS
from triode.testing import no_leaks


def _blobs(n: int, size: int = 1024) -> list[tuple[Digest, bytes]]:
    out = []
    for _ in range(n):
        data = os.urandom(size)
        out.append((Digest.of(data), data))
    return out


def test_store_opens_with_its_256_shards(tmp_path) -> None:
    store = DiskCAS(tmp_path)
    assert sorted(os.listdir(store.blob_dir)) == [f"{i:02x}" for i in range(256)]
    d = Digest.of(b"x")
    assert store.blob_file(d.hash) == f"{store.blob_dir}/{d.hash[:2]}/{d.hash}"


async def test_a_two_level_store_is_moved_to_one_level_when_opened(tmp_path) -> None:
    (digest, data), = _blobs(1)
    old = tmp_path / "cas" / digest.hash[:2] / digest.hash[2:4]
    old.mkdir(parents=True)
    (old / digest.hash).write_bytes(data)
    store = DiskCAS(tmp_path)
    assert not old.exists()
    await store.scan()
    assert await store.find_missing([digest]) == []
    assert await store.get(digest) == data


async def test_an_action_cache_entry_is_synced_after_the_blobs_it_names(tmp_path, monkeypatch) -> None:
    events: list[str] = []
    real = aclog.sync_filesystem

    def recording(fd: int) -> None:
        events.append("sync")
        real(fd)

    monkeypatch.setattr(aclog, "sync_filesystem", recording)
    store = DiskCAS(tmp_path)
    cache = ActionCache(store, tmp_path / "ac")
    (digest, data), = _blobs(1)
    await store.put(data, digest)
    events.append("blob stored")
    await cache.update(Digest.of(b"an action"), ActionResult(0, stdout=CapturedStream(digest)))
    cache.close()
    # The blob was acknowledged without a sync; the entry is durable only after one.
    assert events == ["blob stored", "sync"]


def test_sync_filesystem_reports_errors(monkeypatch) -> None:
    if disk._syncfs is None:
        pytest.skip("syncfs is Linux-only")
    with pytest.raises(OSError):
        disk.sync_filesystem(-1)


async def test_a_blob_cut_short_by_a_crash_is_absent_and_uploaded_again(tmp_path) -> None:
    (digest, data), = _blobs(1, 4096)
    store = DiskCAS(tmp_path)
    await store.put(data, digest)
    await store.aclose()
    # What a power cut can leave of a blob whose data never reached the disk.
    path = store.blob_file(digest.hash)
    os.chmod(path, 0o644)
    os.truncate(path, 0)
    store = DiskCAS(tmp_path)
    await store.scan()
    assert await store.find_missing([digest]) == [digest]
    assert (await store.batch_read([digest]))[digest] is None
    await store.put(data, digest)
    assert await store.get(digest) == data
    assert store.size == digest.size  # counted once, at its real size


async def test_a_batch_writes_what_is_missing_and_says_what_failed(tmp_path) -> None:
    store = DiskCAS(tmp_path)
    blobs = _blobs(50)
    await store.put(blobs[0][1], blobs[0][0])  # already there
    wrong = (Digest.of(b"right"), b"wrong")
    short = (Digest.of(b"four"), b"fou")
    result = await store.batch_update([*blobs, wrong, short, blobs[1]])
    assert [d for d, e in result.items() if e is not None] == [wrong[0], short[0]]
    assert isinstance(result[wrong[0]], DigestMismatch) and isinstance(result[short[0]], DigestMismatch)
    assert await store.find_missing([d for d, _ in blobs]) == []
    found = await store.batch_read([d for d, _ in blobs])
    assert all(found[d] == data for d, data in blobs)
    assert store.info()["writing_bytes"] == 0
    assert os.listdir(store.tmp_dir) == []
    assert store.size == sum(d.size for d, _ in blobs)


async def test_a_batch_and_a_put_of_one_blob_write_it_once(tmp_path) -> None:
    store = DiskCAS(tmp_path)
    blobs = _blobs(20)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.batch_update, blobs)
        for digest, data in blobs[::3]:
            nursery.start_soon(store.put, data, digest)
    assert await store.find_missing([d for d, _ in blobs]) == []
    assert store.counters["puts"] == len(blobs)
    assert store.size == sum(d.size for d, _ in blobs)


async def test_a_full_store_refuses_the_blobs_that_do_not_fit(tmp_path) -> None:
    store = DiskCAS(tmp_path, limit=10 * 1024)
    blobs = _blobs(4, 4096)
    with store.lease([d for d, _ in blobs]):
        result = await store.batch_update(blobs)
    stored = [d for d, e in result.items() if e is None]
    refused = [e for e in result.values() if e is not None]
    assert len(stored) == 2 and all(isinstance(e, ResourceExhausted) for e in refused)
    assert store.info()["writing_bytes"] == 0 and os.listdir(store.tmp_dir) == []


async def test_a_cancelled_batch_leaves_no_temp_file_or_reservation(tmp_path) -> None:
    store = DiskCAS(tmp_path)
    blobs = _blobs(200)
    async with no_leaks():
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(store.batch_update, blobs)
                await trio.lowlevel.checkpoint()
                scope.cancel()
    assert store.info()["writing_bytes"] == 0 and os.listdir(store.tmp_dir) == []
    # Whatever the batch stored before it was cancelled is whole and counted.
    missing = set(await store.find_missing([d for d, _ in blobs]))
    for digest, data in blobs:
        if digest not in missing:
            assert await store.get(digest) == data
    assert store.size == sum(d.size for d, _ in blobs if d not in missing)


async def test_a_clean_close_syncs_the_store(tmp_path, monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(disk, "sync_filesystem", lambda fd: calls.append(fd))
    store = DiskCAS(tmp_path)
    await store.put(b"abc")
    await store.aclose()
    assert len(calls) == 1
