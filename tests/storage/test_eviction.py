"""Eviction: the janitor keeps the disk tier under its limit by the node's record of use."""

from __future__ import annotations

import os

import pytest
import trio

import triode
from triode.errors import ResourceExhausted
from triode.model.digest import Digest
from triode.storage.disk import DiskCAS
from triode.testing import no_leaks

KiB = 1024


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:  # renamed into place or evicted while we looked
        return 0


def _disk_bytes(cas: DiskCAS) -> int:
    """Bytes of blob files and temp files on disk right now."""
    total = 0
    for dirpath, _, files in os.walk(cas.blob_dir):
        total += sum(_size(os.path.join(dirpath, f)) for f in files)
    for f in os.listdir(cas.tmp_dir):
        total += _size(str(cas.tmp_dir / f))
    return total


async def test_write_load_of_twice_the_cache_size(tmp_path) -> None:
    limit = 2048 * KiB
    async with no_leaks():
        async with triode.open_node(data=tmp_path, cache_size=limit) as node, \
                triode.connect(node.address) as client:
            cas: DiskCAS = node.parts["storage"].cas
            leased = [await client.cas.put(os.urandom(100 * KiB)) for _ in range(3)]
            peak = 0
            with cas.lease(leased):
                async def writer(i: int) -> None:
                    nonlocal peak
                    for j in range(10):
                        try:
                            await client.cas.put(os.urandom(40 * KiB + i * 100 + j))
                        except ResourceExhausted:  # refused rather than past the limit
                            pass
                        peak = max(peak, cas.size + cas.info()["writing_bytes"], _disk_bytes(cas))

                async with trio.open_nursery() as n:
                    for i in range(10):  # 10 x 10 x ~40 KiB: about twice the limit
                        n.start_soon(writer, i)
                    with trio.fail_after(30):
                        while n.child_tasks:
                            peak = max(peak, _disk_bytes(cas))
                            await trio.sleep(0.005)
            assert peak <= limit
            assert cas.counters["evictions"] > 0
            assert await client.cas.find_missing(leased) == []  # leased blobs survived
            with trio.fail_after(10):
                while cas.size > limit * cas.high_watermark:  # noqa: ASYNC110 - the janitor's work
                    await trio.sleep(0.01)
            info = (await client.info())["storage"]["cas"]
            assert info["evictions"] == cas.counters["evictions"] and info["limit"] == limit


async def test_least_recently_used_go_first_and_readers_are_safe(tmp_path) -> None:
    cas = DiskCAS(tmp_path, limit=10 * KiB, high_watermark=0.9, low_watermark=0.5)
    await cas.scan()
    blobs = [await cas.put(os.urandom(2 * KiB)) for _ in range(4)]
    await cas.get(blobs[0])  # used: now the most recent
    async with cas.open_read(blobs[1]):  # being read: stays
        await cas.evict()
        assert await cas.find_missing(blobs) == [blobs[2], blobs[3]]
    assert cas.size <= 5 * KiB


async def test_full_of_leased_blobs_refuses_writes(tmp_path) -> None:
    cas = DiskCAS(tmp_path, limit=10 * KiB)
    blobs = [await cas.put(os.urandom(3 * KiB)) for _ in range(3)]
    with cas.lease(blobs):
        with pytest.raises(ResourceExhausted) as info:
            await cas.put(os.urandom(3 * KiB))
        assert info.value.retry_after
    await cas.put(os.urandom(3 * KiB))  # once released, eviction makes room
    assert cas.size <= 10 * KiB


async def test_restart_keeps_the_order_of_use(tmp_path) -> None:
    cas = DiskCAS(tmp_path, limit=100 * KiB)
    await cas.scan()
    blobs = [await cas.put(os.urandom(KiB)) for _ in range(5)]
    await cas.get(blobs[0])
    await cas.aclose()
    again = DiskCAS(tmp_path, limit=100 * KiB)
    await again.scan()
    assert again.size == 5 * KiB and len(again) == 6  # five blobs and the empty one
    order = [h for h in again._index if h != Digest.of(b"").hash]
    assert order == [d.hash for d in blobs[1:]] + [blobs[0].hash]
