"""Crash safety with real processes: SIGKILL a node during uploads, restart it, check everything."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import triode
from triode.errors import TriodeError
from triode.model.digest import Digest
from triode.procgroup import open_process_group
from triode.testing import no_leaks


@asynccontextmanager
async def _node_process(data: Path, log: Path) -> AsyncIterator[tuple[trio.Process, str]]:
    """``triode node`` in its own process group; yields it and its address."""
    with open(log, "wb") as out:  # noqa: ASYNC230 - a log file, opened once
        argv = [sys.executable, "-m", "triode", "node", "--listen", "127.0.0.1:0", "--data", str(data)]
        async with open_process_group(argv, env=dict(os.environ), stdout=None, stderr=out.fileno(),
                                      grace=5) as proc:
            with trio.fail_after(30):
                while "listening on" not in (text := log.read_text(errors="replace")):  # noqa: ASYNC240
                    if proc.poll() is not None:
                        raise AssertionError(f"node exited: {text}")
                    await trio.sleep(0.02)
            address = text.split("listening on", 1)[1].split()[0]
            yield proc, address


def _check_disk(data: Path) -> int:
    """Every blob file hashes to its name and has its size; no temp file survives a restart."""
    count = 0
    for dirpath, _, files in os.walk(data / "cas"):
        for name in files:
            blob = Path(dirpath, name).read_bytes()
            assert hashlib.sha256(blob).hexdigest() == name, f"{name} does not match its bytes"
            count += 1
    return count


async def _uploader(address: str, acked: list[Digest], rng: random.Random) -> None:
    try:
        async with triode.connect(address) as client:
            while True:
                data = rng.randbytes(rng.choice([10, 1000, 70_000, 300_000, 2_000_000]))
                digest = await client.cas.put(data)
                acked.append(digest)
    except (TriodeError, OSError):
        return  # the node was killed under us


@pytest.mark.slow
async def test_sigkill_during_uploads_loses_nothing_acknowledged(tmp_path) -> None:
    rng = random.Random(1234)
    data = tmp_path / "data"
    acked: list[Digest] = []
    async with no_leaks():
        for round_ in range(5):
            async with _node_process(data, tmp_path / f"node{round_}.log") as (proc, address):
                if round_:
                    assert os.listdir(data / "tmp") == []  # swept at start
                    async with triode.connect(address) as client:
                        assert await client.cas.find_missing(acked) == []
                        for digest in rng.sample(acked, min(len(acked), 20)):
                            await client.cas.get(digest)  # verified against its digest
                async with trio.open_nursery() as n:
                    for i in range(4):
                        n.start_soon(_uploader, address, acked, random.Random(rng.random() + i))
                    await trio.sleep(rng.uniform(0.2, 1.0))
                    os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            _check_disk(data)
        async with _node_process(data, tmp_path / "last.log") as (_, address):
            async with triode.connect(address) as client:
                assert await client.cas.find_missing(acked) == []
    assert len(acked) > 20
    assert _check_disk(data) >= len(set(acked))
