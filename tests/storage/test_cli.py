"""``triode cas put|get|has`` as a user runs them: embedded over $TRIODE_HOME, and --remote."""

from __future__ import annotations

import os
import subprocess
import sys

import triode
from triode.model.digest import Digest


def _triode(*args: str, home, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRIODE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "triode", *args], env=env, input=stdin,
                          capture_output=True, timeout=60)


def test_put_get_has_embedded(tmp_path) -> None:
    home = tmp_path / "home"
    a, b = tmp_path / "a.txt", tmp_path / "b.bin"
    a.write_bytes(b"hello triode\n")
    b.write_bytes(os.urandom(300_000))
    put = _triode("cas", "put", str(a), str(b), home=home)
    assert put.returncode == 0, put.stderr
    lines = put.stdout.decode().splitlines()
    assert lines == [f"{Digest.of(a.read_bytes())}  {a}", f"{Digest.of(b.read_bytes())}  {b}"]
    got = _triode("cas", "get", str(Digest.of(a.read_bytes())), home=home)
    assert got.returncode == 0 and got.stdout == b"hello triode\n"
    out = tmp_path / "copy.bin"
    assert _triode("cas", "get", str(Digest.of(b.read_bytes())), "-o", str(out), home=home).returncode == 0
    assert out.read_bytes() == b.read_bytes()
    absent = Digest.of(b"absent")
    has = _triode("cas", "has", str(Digest.of(a.read_bytes())), str(absent), home=home)
    assert has.returncode == 1 and has.stdout.decode().split() == [str(absent)]
    assert _triode("cas", "has", str(Digest.of(a.read_bytes())), home=home).returncode == 0
    missing = _triode("cas", "get", str(absent), home=home)
    assert missing.returncode == 1 and b"not found" in missing.stderr
    bad = _triode("cas", "get", "nothex/12", home=home)
    assert bad.returncode == 2 and b"HASH/SIZE" in bad.stderr


async def test_remote(node: triode.Node, tmp_path) -> None:
    import trio

    f = tmp_path / "f"
    f.write_bytes(b"remote blob" * 10_000)

    def run(*args: str) -> subprocess.CompletedProcess:
        return _triode(*args, "--remote", node.address, home=tmp_path / "unused")

    put = await trio.to_thread.run_sync(run, "cas", "put", "--zstd", str(f))
    assert put.returncode == 0, put.stderr
    digest = Digest.parse(put.stdout.decode().split()[0])
    async with triode.connect(node.address) as client:
        assert await client.cas.get(digest) == f.read_bytes()
    got = await trio.to_thread.run_sync(run, "cas", "get", "--zstd", str(digest))
    assert got.stdout == f.read_bytes()
    assert (await trio.to_thread.run_sync(run, "cas", "has", str(digest))).returncode == 0
