"""A store that notices: ``cas.verify`` (and ``triode cas verify``), and damaged bytes never served.

Blobs are damaged the way a disk, a person or an escaped process would: by writing to
the stored file in the data dir directly.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

import triode
from triode.errors import BlobNotFound, InvalidArgument, InvalidDigest
from triode.model.digest import Digest
from triode.storage.memory import MemoryCAS
from triode.testing import no_leaks

SMALL = b"small and precious\n"
LARGE = bytes(range(256)) * (24 * 1024)  # 6 MiB: hashed over more than one step
INTACT = b"left alone\n"


def stored(data: Path, digest: Digest) -> Path:
    return data / "cas" / digest.hash[:2] / digest.hash


def damage(data: Path, digest: Digest) -> None:
    """Change one byte of a stored blob in place, as something outside the node would."""
    path = stored(data, digest)
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.seek(digest.size // 2)
        byte = f.read(1)
        f.seek(digest.size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


async def triode_cli(home: Path, *args: str) -> trio.CompletedProcess[bytes]:
    env = {**os.environ, "TRIODE_HOME": str(home)}
    return await trio.run_process([sys.executable, "-m", "triode", *args], capture_stdout=True,
                                  capture_stderr=True, check=False, env=env)


def lines(done: trio.CompletedProcess[bytes]) -> list[str]:
    return done.stdout.decode().splitlines()


@pytest.mark.parametrize("where", ["embedded", "remote"])
async def test_cas_verify_finds_and_removes_blobs_damaged_on_disk(where: str, tmp_path: Path) -> None:
    data = tmp_path / "home"
    async with no_leaks():
        async with triode.open_node(listen="127.0.0.1:0", data=data) as node, node.connect() as client:
            small, large, intact = [await client.cas.put(b) for b in (SMALL, LARGE, INTACT)]
            address = node.address
            assert address is not None
            if where == "remote":
                damage(data, small)
                damage(data, large)
                remote: Sequence[str] = ("--remote", address)
                done = await triode_cli(tmp_path / "unused", "cas", "verify", *remote)
        if where == "embedded":  # the CLI's own node over the data dir, with the node above gone
            damage(data, small)
            damage(data, large)
            remote = ()
            done = await triode_cli(data, "cas", "verify")
        assert done.returncode == 1, done.stderr
        assert sorted(lines(done)) == sorted(f"damaged  {d}  (removed)" for d in (small, large))
        assert b"verified 4 blob(s)" in done.stderr and b"2 damaged" in done.stderr  # (the empty blob too)
        assert not stored(data, small).exists() and not stored(data, large).exists()
        assert stored(data, intact).read_bytes() == INTACT
        # Nothing damaged is left, and the damaged blobs are gone, not served.
        home = data if where == "embedded" else tmp_path / "unused"
        async with triode.open_node(listen="127.0.0.1:0" if remote else None, data=data) as node:
            args = ("--remote", node.address) if remote else ()
            again = await triode_cli(home, "cas", "verify", *args)  # type: ignore[arg-type]
            assert again.returncode == 0 and lines(again) == [], again.stderr
            named = await triode_cli(home, "cas", "verify", str(intact), str(small), *args)  # type: ignore[arg-type]
            assert named.returncode == 0 and lines(named) == [f"missing  {small}"]
            got = await triode_cli(home, "cas", "get", str(small), *args)  # type: ignore[arg-type]
            assert got.returncode == 1 and got.stdout == b""


async def test_a_small_blob_damaged_on_disk_is_never_served(tmp_path: Path) -> None:
    data = tmp_path / "d"
    async with no_leaks(), triode.open_node(listen=None, data=data) as node, node.connect() as client:
        blob, other = await client.cas.put(SMALL), await client.cas.put(INTACT)
        damage(data, blob)
        with pytest.raises(BlobNotFound):
            await client.cas.get(blob)  # (read whole: hashed, found wrong, removed)
        assert not stored(data, blob).exists()
        assert node.parts["storage"].cas.counters["damaged_removed"] == 1  # type: ignore[attr-defined]
        await client.cas.put(SMALL)
        damage(data, blob)
        found = await client.cas.batch_read([blob, other])
        assert found == {blob: None, other: INTACT}
        assert await client.cas.find_missing([blob]) == [blob]
        await client.cas.put(SMALL)  # stored again, whole
        assert await client.cas.get(blob) == SMALL


@pytest.mark.parametrize("payload", [SMALL, LARGE], ids=["small", "large"])
async def test_a_damaged_copy_is_stored_again_when_the_backing_node_refuses_it(
    payload: bytes, tmp_path: Path
) -> None:
    front = tmp_path / "front"
    async with no_leaks():
        async with triode.open_node(listen=None, data=front) as node, node.connect() as client:
            blob = await client.cas.put(payload)
        damage(front, blob)
        async with triode.open_node(listen="127.0.0.1:0", data=tmp_path / "back") as back, \
                triode.open_node(listen=None, data=front, backing=back.address) as node, \
                node.connect() as client, back.connect() as back_client:
            # Here already, so the put reads nothing and sends the stored copy on: the backing
            # node (or our own whole read of a small one) finds it damaged.
            assert await client.cas.put(payload) == blob
            assert await back_client.cas.get(blob) == payload
            assert stored(front, blob).read_bytes() == payload
            assert node.parts["storage"].cas.counters["damaged_removed"] == 1  # type: ignore[attr-defined]
            report = await client.connection.call("cas.verify", {})
            assert report["damaged"] == [] and report["checked"] == 2


async def test_verify_in_memory_and_its_arguments() -> None:
    cas = MemoryCAS(limit=1 << 20)
    good, bad = await cas.put(SMALL), await cas.put(INTACT)
    cas._blobs[bad] = b"left alone?"  # what no disk can do to it: the check itself is the same
    missing = Digest.of(b"never stored")
    report = await cas.verify([good, bad, missing])
    assert (report.checked, report.damaged, report.missing) == (2, [bad], [missing])
    assert await cas.find_missing([good, bad]) == [bad]
    assert (await cas.verify()).damaged == []
    async with no_leaks(), triode.open_node(listen=None) as node, node.connect() as client:
        await client.cas.put(SMALL)
        assert (await client.connection.call("cas.verify", {"digests": [good.to_wire()]}))["checked"] == 1
        with pytest.raises(InvalidDigest):
            await client.connection.call("cas.verify", {"digests": [["nothex", 1]]})
        with pytest.raises(InvalidArgument):
            await client.connection.call("cas.verify", {"digests": "all"})
