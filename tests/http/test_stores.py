"""The key-value store and the REAPI action cache that the HTTP (and gRPC) doors share."""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from triode.errors import FailedPrecondition, InvalidArgument, InvalidDigest, TooLarge
from triode.model.digest import Digest
from triode.proto import remote_execution_pb2 as pb
from triode.storage.disk import DiskCAS
from triode.storage.keyvalue import KeyValueStore
from triode.storage.memory import MemoryCAS
from triode.storage.reapi_ac import (
    MAX_RESULT_SIZE,
    ReapiActionCache,
    parse_action_result,
    referenced_digests,
    tree_file_digests,
)


def _action(n: int = 0) -> str:
    return hashlib.sha256(f"action {n}".encode()).hexdigest()


def _pb(d: Digest) -> pb.Digest:
    return pb.Digest(hash=d.hash, size_bytes=d.size)


@pytest.fixture(params=["memory", "disk"])
def stores(request, tmp_path):
    if request.param == "memory":
        cas = MemoryCAS(limit=1 << 20)
        kv = KeyValueStore(cas, max_entries=100)
    else:
        cas = DiskCAS(tmp_path / "data")
        kv = KeyValueStore(cas, tmp_path / "data" / "kv", max_entries=100)
    yield cas, kv
    kv.close()


async def test_get_and_put(stores):
    cas, kv = stores
    digest = await cas.put(b"value")
    assert await kv.get("ns", "k") is None
    await kv.put("ns", "k", digest)
    assert await kv.get("ns", "k") == digest
    assert await kv.get("other", "k") is None  # namespaces are apart
    assert await kv.get("ns", "k2") is None
    other = await cas.put(b"other value")
    await kv.put("ns", "k", other)  # the newest wins
    assert await kv.get("ns", "k") == other
    await kv.remove("ns", "k")
    assert await kv.get("ns", "k") is None


async def test_put_needs_the_blob_and_checks_its_arguments(stores):
    cas, kv = stores
    absent = Digest.of(b"never stored")
    with pytest.raises(FailedPrecondition, match="not in the CAS"):
        await kv.put("ns", "k", absent)
    assert await kv.get("ns", "k") is None
    digest = await cas.put(b"v")
    for namespace, key in [("", "k"), ("ns", ""), ("n\0s", "k"), ("n" * 300, "k"), ("ns", "k" * 2000)]:
        with pytest.raises(InvalidArgument):
            await kv.put(namespace, key, digest)


async def test_an_entry_whose_blob_is_gone_is_a_miss_and_is_dropped(tmp_path):
    cas = MemoryCAS(limit=100)
    kv = KeyValueStore(cas)
    first = await cas.put(b"a" * 60)
    await kv.put("ns", "k", first)
    await cas.put(b"b" * 60)  # evicts the first blob: the store holds 100 bytes
    assert await cas.find_missing([first]) == [first]
    assert await kv.get("ns", "k") is None
    assert kv.info()["entries"] == 0 and kv.counters["misses_blob_gone"] == 1


async def test_entries_survive_a_restart_and_stay_bounded(tmp_path):
    cas = DiskCAS(tmp_path)
    kv = KeyValueStore(cas, tmp_path / "kv", max_entries=20)
    digest = await cas.put(b"v")
    for i in range(50):
        await kv.put("ns", f"key{i}", digest)
    assert kv.info()["entries"] <= 20
    kv.close()
    again = KeyValueStore(cas, tmp_path / "kv", max_entries=20)
    try:
        assert await again.get("ns", "key49") == digest  # the most recent are kept
        assert await again.get("ns", "key0") is None
        assert again.info()["entries"] <= 20
    finally:
        again.close()


async def test_concurrent_puts_share_writes_and_all_land(tmp_path):
    cas = DiskCAS(tmp_path)
    kv = KeyValueStore(cas, tmp_path / "kv")
    digests = [await cas.put(f"value {i}".encode()) for i in range(40)]
    async with trio.open_nursery() as nursery:
        for i, digest in enumerate(digests):
            nursery.start_soon(kv.put, "ns", f"k{i}", digest)
    kv.close()
    again = KeyValueStore(cas, tmp_path / "kv")
    try:
        assert [await again.get("ns", f"k{i}") for i in range(40)] == digests
    finally:
        again.close()


async def test_a_torn_tail_is_skipped(tmp_path):
    cas = DiskCAS(tmp_path)
    kv = KeyValueStore(cas, tmp_path / "kv")
    digest = await cas.put(b"v")
    await kv.put("ns", "whole", digest)
    await kv.put("ns", "torn", digest)
    kv.close()
    log = tmp_path / "kv" / "log"
    log.write_bytes(log.read_bytes()[:-3])  # a crash mid-append
    again = KeyValueStore(cas, tmp_path / "kv")
    try:
        assert await again.get("ns", "whole") == digest
        assert await again.get("ns", "torn") is None
    finally:
        again.close()


# -- the REAPI action cache ----------------------------------------------------------------------


async def _result(cas, *, tree_files: int = 1) -> tuple[pb.ActionResult, list[Digest]]:
    """A result with an output file, stdout by digest and an output directory."""
    out = await cas.put(b"output bytes")
    stdout = await cas.put(b"stdout bytes")
    files = [await cas.put(f"tree file {i}".encode()) for i in range(tree_files)]
    nodes = [pb.FileNode(name=f"f{i}", digest=_pb(d)) for i, d in enumerate(files)]
    tree = pb.Tree(root=pb.Directory(files=nodes))
    tree_digest = await cas.put(tree.SerializeToString())
    result = pb.ActionResult(
        output_files=[pb.OutputFile(path="out/a.o", digest=_pb(out))],
        output_directories=[pb.OutputDirectory(path="out/dir", tree_digest=_pb(tree_digest))],
        stdout_digest=_pb(stdout),
        exit_code=0,
    )
    return result, [out, stdout, tree_digest, *files]


async def test_reapi_results_round_trip_and_are_shared_through_the_kv(stores):
    cas, kv = stores
    ac = ReapiActionCache(cas, kv)
    result, blobs = await _result(cas)
    raw = result.SerializeToString()
    assert await ac.get(_action()) is None
    await ac.update(_action(), raw)
    assert await ac.get(_action()) == raw
    assert set(referenced_digests(result)) == set(blobs[:3])
    assert await kv.get("reapi.ac", _action()) == Digest.of(raw)
    # A second cache over the same stores (another door) sees it.
    assert await ReapiActionCache(cas, kv).get(_action()) == raw


async def test_a_result_is_a_hit_only_while_every_blob_is_stored(tmp_path):
    cas = DiskCAS(tmp_path)
    kv = KeyValueStore(cas, tmp_path / "kv")
    ac = ReapiActionCache(cas, kv)
    try:
        result, blobs = await _result(cas, tree_files=3)
        await ac.update(_action(), result.SerializeToString())
        tree_file = blobs[-1]
        path = cas.path_of(tree_file)
        assert cas.drop_damaged(tree_file, os.stat(path).st_ino)  # gone, as evicted
        assert await ac.get(_action()) is None
        assert ac.counters["misses_incomplete"] == 1
        await cas.put(b"tree file 2")
        assert await ac.get(_action()) is not None
    finally:
        kv.close()


async def test_update_refuses_a_result_whose_blobs_are_not_stored():
    cas = MemoryCAS()
    ac = ReapiActionCache(cas, KeyValueStore(cas))
    absent = Digest.of(b"not uploaded")
    result = pb.ActionResult(output_files=[pb.OutputFile(path="a", digest=_pb(absent))])
    with pytest.raises(FailedPrecondition, match="upload them first") as info:
        await ac.update(_action(), result.SerializeToString())
    assert info.value.details["missing"] == [str(absent)]
    assert await ac.get(_action()) is None


@pytest.mark.parametrize("make, message", [
    (lambda d: b"\xff\xff\xff\xff", "not an ActionResult"),
    (lambda d: pb.ActionResult(output_files=[pb.OutputFile(path="../escape", digest=d)]), "'..' segment"),
    (lambda d: pb.ActionResult(output_files=[pb.OutputFile(path="/abs", digest=d)]), "not a relative path"),
    (lambda d: pb.ActionResult(output_files=[pb.OutputFile(path="a//b", digest=d)]), "empty"),
    (lambda d: pb.ActionResult(output_files=[pb.OutputFile(path="", digest=d)]), "empty"),
    (lambda d: pb.ActionResult(output_files=[pb.OutputFile(path="a", digest=d),
                                             pb.OutputFile(path="a", digest=d)]), "twice"),
    (lambda d: pb.ActionResult(output_symlinks=[pb.OutputSymlink(path="a/../../b", target="x")]), "'..'"),
    (lambda d: pb.ActionResult(output_files=[pb.OutputFile(path="a")]), "no digest"),
    (lambda d: pb.ActionResult(output_files=[pb.OutputFile(path="a", digest=pb.Digest(hash="XYZ"))]),
     "64 lowercase hex"),
    (lambda d: pb.ActionResult(stdout_digest=pb.Digest(hash=d.hash, size_bytes=-1)), "non-negative"),
    (lambda d: pb.ActionResult(output_directories=[pb.OutputDirectory(path="d")]), "no tree_digest"),
])
async def test_update_validates_the_shape(make, message):
    cas = MemoryCAS()
    ac = ReapiActionCache(cas, KeyValueStore(cas))
    stored = await cas.put(b"present")
    value = make(_pb(stored))
    raw = value if isinstance(value, bytes) else value.SerializeToString()
    with pytest.raises(InvalidArgument, match=message):
        await ac.update(_action(), raw)
    assert await ac.get(_action()) is None


async def test_bad_action_hashes_and_sizes():
    cas = MemoryCAS()
    ac = ReapiActionCache(cas, KeyValueStore(cas))
    for bad in ("", "ab", "AB" * 32, "g" * 64):
        with pytest.raises(InvalidDigest):
            await ac.get(bad)
    with pytest.raises(TooLarge):
        parse_action_result(b"\0" * (MAX_RESULT_SIZE + 1))


def test_tree_files_are_read_from_root_and_children():
    a, b = Digest.of(b"a"), Digest.of(b"b")
    tree = pb.Tree(root=pb.Directory(files=[pb.FileNode(name="a", digest=_pb(a))]),
                   children=[pb.Directory(files=[pb.FileNode(name="b", digest=_pb(b)),
                                                 pb.FileNode(name="a2", digest=_pb(a))])])
    assert tree_file_digests(tree.SerializeToString()) == [a, b]
    with pytest.raises(InvalidArgument, match="not a Tree"):
        tree_file_digests(b"\xff\xff")
