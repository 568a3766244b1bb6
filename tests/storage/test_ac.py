"""The action cache: hits only while blobs exist, on disk and over the wire, the same bytes as ever.

The shape of a result is checked by ``ActionResult.from_wire`` (tests/test_model_result.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgpack
import pytest

import triode
from triode.errors import FailedPrecondition, InvalidArgument
from triode.model.digest import Digest
from triode.model.result import ActionResult
from triode.storage.ac import ActionCache
from triode.storage.disk import DiskCAS
from triode.storage.memory import MemoryCAS

ACTION = Digest.of(b"an action")


@contextmanager
def opened(cas: DiskCAS, root: Path, **options: int) -> Iterator[ActionCache]:
    """Another action cache on the same directory, as another process would have."""
    ac = ActionCache(cas, root, **options)
    try:
        yield ac
    finally:
        ac.close()


def _result(stdout: Digest, out: Digest) -> ActionResult:
    return ActionResult.from_wire(_wire(stdout, out))


def _wire(stdout: Digest, out: Digest) -> dict:
    """A result as the executor built it before results were typed (and as the protocol has it)."""
    return {
        "exit_code": 0, "signal": None, "timed_out": False,
        "stdout": {"digest": stdout.to_wire(), "truncated": False},
        "stderr": {"digest": Digest.of(b"").to_wire(), "truncated": False},
        "output_files": [{"path": "out/a.o", "digest": out.to_wire(), "executable": True}],
        "output_symlinks": [{"path": "out/link", "target": "a.o"}],
        "output_directories": [{"path": "out"}, {"path": "out/empty"}],
        "missing_outputs": ["out/b.o"],
        "timings": {"queued": 0.0, "staging": 0.1, "running": 1.5, "uploading": 0.2},
        "node": "node-1", "executed_at": 1_700_000_000.0,
    }


@pytest.mark.parametrize("where", ["disk", "memory"])
async def test_entries_are_stored_as_the_same_bytes_as_before(tmp_path, where: str) -> None:
    cas = DiskCAS(tmp_path) if where == "disk" else MemoryCAS(limit=10_000)
    ac = ActionCache(cas, tmp_path / "ac" if where == "disk" else None)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    await ac.update(ACTION, _result(stdout, out))
    old = msgpack.packb(_wire(stdout, out), use_bin_type=True)
    if where == "disk":
        assert old in (tmp_path / "ac" / "log").read_bytes()
    else:
        assert ac._memory[ACTION] == old
    ac.close()


@pytest.mark.parametrize("where", ["disk", "memory"])
async def test_hit_only_while_blobs_exist(tmp_path, where: str) -> None:
    cas = DiskCAS(tmp_path) if where == "disk" else MemoryCAS(limit=10_000)
    ac = ActionCache(cas, tmp_path / "ac" if where == "disk" else None)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    assert await ac.get(ACTION) is None
    with pytest.raises(FailedPrecondition, match="not in the CAS"):
        await ac.update(ACTION, _result(stdout, Digest.of(b"never uploaded")))
    await ac.update(ACTION, _result(stdout, out))
    assert await ac.get(ACTION) == _result(stdout, out)
    if where == "disk":
        with opened(cas, tmp_path / "ac") as again:
            assert await again.get(ACTION) == _result(stdout, out)  # survives
        await cas.evict(0)  # evict everything
        assert cas.path_of(out) is None
    else:
        cas._evict(0)
    assert await ac.get(ACTION) is None
    ac.close()


async def test_over_the_wire(client: triode.Client) -> None:
    stdout, out = await client.cas.put(b"hi"), await client.cas.put(b"obj" * 1000)
    assert await client.ac.get(ACTION) is None
    await client.ac.update(ACTION, _result(stdout, out))
    assert await client.ac.get(ACTION) == _result(stdout, out)
    # The node checks what comes over the wire, and names the bad field.
    key = ACTION.to_wire()
    with pytest.raises(InvalidArgument, match="exit_code") as info:
        await client.connection.call("ac.update", {"action_digest": key, "result": {"exit_code": None}})
    assert info.value.details["field"] == "exit_code"
    with pytest.raises(InvalidArgument, match="unknown keys"):
        await client.connection.call(
            "ac.update", {"action_digest": key, "result": {**_wire(stdout, out), "extra": 1}}
        )
    reply = await client.connection.call("ac.get", {"action_digest": key})
    assert reply == {"result": _wire(stdout, out)}  # the map as it always was
    with pytest.raises(InvalidArgument):
        await client.connection.call("ac.get", {"action_digest": "x"})


@pytest.mark.parametrize("where", ["disk", "memory"])
async def test_update_many_stores_the_good_entries_and_names_each_bad_one(tmp_path, where: str) -> None:
    cas = DiskCAS(tmp_path) if where == "disk" else MemoryCAS(limit=10_000)
    ac = ActionCache(cas, tmp_path / "ac" if where == "disk" else None)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    keys = [Digest.of(b"action %d" % i) for i in range(4)]
    errors = await ac.update_many([
        (keys[0], _result(stdout, out)),
        (keys[1], _result(stdout, Digest.of(b"never uploaded"))),
        (keys[2], ActionResult(0, missing_outputs=("x" * 4000,) * 1100)),  # over 4 MiB encoded
        (keys[3], _result(out, stdout)),
    ])
    assert errors[0] is None and errors[3] is None
    assert isinstance(errors[1], FailedPrecondition) and "not in the CAS" in str(errors[1])
    assert isinstance(errors[2], InvalidArgument) and "bytes encoded" in str(errors[2])
    assert await ac.get(keys[0]) == _result(stdout, out)
    assert await ac.get(keys[3]) == _result(out, stdout)
    assert await ac.get(keys[1]) is None and await ac.get(keys[2]) is None
    assert ac.counters["updates"] == 2
    if where == "disk":
        with opened(cas, tmp_path / "ac") as again:
            assert await again.get(keys[3]) == _result(out, stdout)
    assert await ac.update_many([]) == []
    ac.close()


async def test_on_disk_the_oldest_entries_go_past_the_limit(tmp_path) -> None:
    cas = DiskCAS(tmp_path)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    groups = [[Digest.of(b"action %d %d" % (g, i)) for i in range(10)] for g in range(5)]
    with opened(cas, tmp_path / "ac", max_entries=20) as ac:
        for group in groups:
            assert await ac.update_many([(key, _result(stdout, out)) for key in group]) == [None] * 10
        assert ac.counters["compactions"] >= 1 and ac.info()["entries"] <= 20
        assert all([await ac.get(key) is not None for key in groups[-1]])  # the newest stay
        assert all([await ac.get(key) is None for key in groups[0] + groups[1]])  # the oldest went
        entries = ac.info()["entries"]
    # A cache opened later finds the same entries, and keeps to the same limit.
    with opened(cas, tmp_path / "ac", max_entries=20) as again:
        assert again.info()["entries"] == entries
        assert all([await again.get(key) is not None for key in groups[-1]])


async def test_on_disk_entries_in_use_outlive_newer_ones(tmp_path) -> None:
    """A hit counts as a use: compaction drops the least recently used, not the oldest written."""
    cas = DiskCAS(tmp_path)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    old, middle, new = ([Digest.of(b"action %d %d" % (g, i)) for i in range(10)] for g in range(3))
    with opened(cas, tmp_path / "ac", max_entries=20) as ac:
        await ac.update_many([(key, _result(stdout, out)) for key in old])
        await ac.update_many([(key, _result(stdout, out)) for key in middle])
        for key in old[:5]:  # in use: read after the middle ones were written
            assert await ac.get(key) is not None
        await ac.update_many([(key, _result(stdout, out)) for key in new])  # past 20: compacts
        assert ac.counters["compactions"] == 1
        present = {key for key in old + middle + new if await ac.get(key) is not None}
    # 18 stay (90% of the limit): the 10 newest, the 5 in use, the 3 last written before them.
    assert present == set(new) | set(old[:5]) | set(middle[-3:])
    # The rewritten log is in order of use, so a process that opens it later keeps to it.
    newer = [Digest.of(b"action 3 %d" % i) for i in range(4)]
    with opened(cas, tmp_path / "ac", max_entries=20) as again:
        await again.update_many([(key, _result(stdout, out)) for key in newer])  # 22: compacts
        assert again.counters["compactions"] == 1
        kept = {key for key in old + middle + new + newer if await again.get(key) is not None}
    assert kept == set(newer) | set(new) | set(old[1:5])  # the 4 least recently used went


async def test_the_log_is_bounded_in_bytes_too(tmp_path) -> None:
    cas = DiskCAS(tmp_path)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    with opened(cas, tmp_path / "ac", max_bytes=20_000) as ac:
        for i in range(100):
            await ac.update(Digest.of(b"action %d" % i), _result(stdout, out))
        assert ac.info()["log_bytes"] <= 20_000
        assert await ac.get(Digest.of(b"action 99")) is not None
        assert await ac.get(Digest.of(b"action 0")) is None


async def test_a_replaced_entry_and_a_removed_one_stay_so_after_reopening(tmp_path) -> None:
    cas = DiskCAS(tmp_path)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    gone = Digest.of(b"removed")
    with opened(cas, tmp_path / "ac") as ac:
        await ac.update(ACTION, _result(stdout, out))
        await ac.update(ACTION, _result(out, stdout))
        await ac.update(gone, _result(stdout, out))
        await ac.remove(gone)
        assert await ac.get(gone) is None
        assert ac.info()["entries"] == 1
    with opened(cas, tmp_path / "ac") as again:
        assert await again.get(ACTION) == _result(out, stdout)
        assert await again.get(gone) is None
        assert again.info()["entries"] == 1


async def test_damaged_and_torn_records_are_misses_and_the_rest_is_kept(tmp_path) -> None:
    cas = DiskCAS(tmp_path)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    keys = [Digest.of(b"action %d" % i) for i in range(3)]
    # The middle one holds the records' magic: the scan must not take it for a record.
    middle = dataclasses.replace(_result(stdout, out), missing_outputs=("TAC1" * 20,))
    with opened(cas, tmp_path / "ac") as ac:
        for key in keys:
            await ac.update(key, middle if key == keys[1] else _result(stdout, out))
    log = tmp_path / "ac" / "log"
    data = bytearray(log.read_bytes())
    data[data.rindex(b"TAC1" * 20) + 80] ^= 0xFF  # a flipped bit in the middle record's value
    log.write_bytes(bytes(data) + data[:70])  # and a torn write at the end, as a crash leaves
    with opened(cas, tmp_path / "ac") as ac:
        assert await ac.get(keys[0]) == _result(stdout, out)
        assert await ac.get(keys[1]) is None
        assert await ac.get(keys[2]) == _result(stdout, out)
        # Written after the damage, readable now and after reopening.
        await ac.update(keys[1], _result(out, stdout))
        assert await ac.get(keys[1]) == _result(out, stdout)
    with opened(cas, tmp_path / "ac") as again:
        assert await again.get(keys[1]) == _result(out, stdout)
        assert again.info()["entries"] == 3
        # Damage found when reading (after the log was indexed) is a miss too.
        fd = os.open(log, os.O_WRONLY)
        os.pwrite(fd, b"NODE-1", data.index(b"node-1"))
        os.close(fd)
        assert await again.get(keys[0]) is None
        assert await again.get(keys[2]) == _result(stdout, out)


async def test_two_processes_share_one_log(tmp_path) -> None:
    """What one writes the other reads, also across the other's compaction."""
    cas = DiskCAS(tmp_path)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    with opened(cas, tmp_path / "ac", max_entries=20) as a, opened(cas, tmp_path / "ac", max_entries=20) as b:
        await a.update(ACTION, _result(stdout, out))
        assert await b.get(ACTION) == _result(stdout, out)
        await b.update(ACTION, _result(out, stdout))
        key = Digest.of(b"new in b")
        await b.update(key, _result(stdout, out))
        assert await a.get(key) == _result(stdout, out)  # a miss in a looks at b's appends
        assert await a.get(ACTION) == _result(out, stdout)
        for i in range(30):  # b compacts, a still has the old file open
            await b.update(Digest.of(b"filler %d" % i), _result(stdout, out))
        assert b.counters["compactions"] >= 1
        newest = Digest.of(b"filler 29")
        assert await a.get(newest) == _result(stdout, out)
        await a.update(Digest.of(b"after"), _result(stdout, out))  # appended to the new file
        assert await b.get(Digest.of(b"after")) == _result(stdout, out)
        for i in range(30):  # b compacts again, and a writes before it reads
            await b.update(Digest.of(b"more filler %d" % i), _result(stdout, out))
        await a.update(Digest.of(b"after again"), _result(stdout, out))
        assert await b.get(Digest.of(b"after again")) == _result(stdout, out)
        assert await a.get(Digest.of(b"more filler 29")) == _result(stdout, out)


async def test_entries_of_the_file_per_entry_layout_move_into_the_log(tmp_path) -> None:
    cas = DiskCAS(tmp_path)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    shard = tmp_path / "ac" / ACTION.hash[:2]
    shard.mkdir(parents=True)
    (shard / f"{ACTION.hash}_{ACTION.size}").write_bytes(msgpack.packb(_wire(stdout, out)))
    with opened(cas, tmp_path / "ac") as ac:
        assert await ac.get(ACTION) == _result(stdout, out)
    assert sorted(os.listdir(tmp_path / "ac")) == ["lock", "log"]
