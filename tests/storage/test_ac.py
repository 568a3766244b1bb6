"""The action cache: shape validation, hits only while blobs exist, on disk and over the wire."""

from __future__ import annotations

import pytest
import trio

import triode
from triode.errors import FailedPrecondition, InvalidArgument
from triode.storage.ac import ActionCache, referenced_blobs, validate_action_result
from triode.storage.digest import Digest
from triode.storage.disk import DiskCAS
from triode.storage.memory import MemoryCAS

ACTION = Digest.of(b"an action")


def _result(stdout: Digest, out: Digest) -> dict:
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


def test_validation_names_the_bad_field() -> None:
    good = _result(Digest.of(b"x"), Digest.of(b"y"))
    assert validate_action_result(good) == good
    assert validate_action_result({"exit_code": 3})["output_files"] == []
    bad_cases = {
        "exit_code": {**good, "exit_code": "0"},
        "stdout.digest": {**good, "stdout": {"digest": ["nothex", 1]}},
        "output_files[0].path": {
            **good, "output_files": [{"path": "../etc", "digest": good["stdout"]["digest"]}]
        },
        "timings.running": {**good, "timings": {"running": -1}},
        "timed_out": {**good, "timed_out": 1},
        "missing_outputs[0]": {**good, "missing_outputs": ["/abs"]},
        "result": [1, 2],
    }
    for field, value in bad_cases.items():
        with pytest.raises(InvalidArgument) as info:
            validate_action_result(value)
        assert field in str(info.value), (field, str(info.value))
    with pytest.raises(InvalidArgument, match="unknown keys"):
        validate_action_result({**good, "extra": 1})
    assert set(referenced_blobs(good)) == {Digest.of(b"x"), Digest.of(b"y"), Digest.of(b"")}


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
        assert await ActionCache(cas, tmp_path / "ac").get(ACTION) == _result(stdout, out)  # survives
        await cas.evict(0)  # evict everything
        assert cas.path_of(out) is None
    else:
        cas._evict(0)
    assert await ac.get(ACTION) is None


async def test_over_the_wire(client: triode.Client) -> None:
    stdout, out = await client.cas.put(b"hi"), await client.cas.put(b"obj" * 1000)
    assert await client.ac.get(ACTION) is None
    await client.ac.update(ACTION, _result(stdout, out))
    assert await client.ac.get(ACTION) == _result(stdout, out)
    with pytest.raises(InvalidArgument, match="exit_code"):
        await client.ac.update(ACTION, {"exit_code": None})
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
        (keys[2], {"exit_code": "zero"}),
        (keys[3], _result(out, stdout)),
    ])
    assert errors[0] is None and errors[3] is None
    assert isinstance(errors[1], FailedPrecondition) and "not in the CAS" in str(errors[1])
    assert isinstance(errors[2], InvalidArgument) and "exit_code" in str(errors[2])
    assert await ac.get(keys[0]) == _result(stdout, out)
    assert await ac.get(keys[3]) == _result(out, stdout)
    assert await ac.get(keys[1]) is None and await ac.get(keys[2]) is None
    assert ac.counters["updates"] == 2
    if where == "disk":  # all written through one temp dir, none left in it
        assert await ActionCache(cas, tmp_path / "ac").get(keys[3]) == _result(out, stdout)
        assert list((tmp_path / "tmp").iterdir()) == []
    assert await ac.update_many([]) == []


async def test_on_disk_the_oldest_entries_go_past_the_limit(tmp_path) -> None:
    cas = DiskCAS(tmp_path)
    ac = ActionCache(cas, tmp_path / "ac", max_entries=20)
    stdout, out = await cas.put(b"hello\n"), await cas.put(b"object")
    groups = [[Digest.of(b"action %d %d" % (g, i)) for i in range(10)] for g in range(5)]
    for group in groups:
        assert await ac.update_many([(key, _result(stdout, out)) for key in group]) == [None] * 10
        await trio.sleep(0.05)  # file times are coarse: keep the groups apart
    entries = sum(len(list(shard.iterdir())) for shard in (tmp_path / "ac").iterdir())
    assert entries <= 20 and ac.info()["entries"] == entries
    assert all([await ac.get(key) is not None for key in groups[-1]])  # the newest stay
    assert all([await ac.get(key) is None for key in groups[0] + groups[1]])  # the oldest went
    # A cache opened later counts what is there, and keeps to the same limit.
    again = ActionCache(cas, tmp_path / "ac", max_entries=20)
    assert again.info()["entries"] == entries
