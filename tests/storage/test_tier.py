"""Two real nodes on loopback: write-through, read-through, one shared fetch, the backing node down."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

import triode
from triode.errors import BlobNotFound, Unavailable
from triode.model.digest import Digest
from triode.model.result import ActionResult, CapturedStream
from triode.testing import no_leaks

MiB = 1024 * 1024


def _cas(node: triode.Node):
    return node.parts["storage"].cas


async def _serve_node(data: Path, *, task_status=trio.TASK_STATUS_IGNORED, **options) -> None:
    async with triode.open_node(listen=options.pop("listen", "127.0.0.1:0"), data=data, **options) as node:
        task_status.started(node)
        await trio.sleep_forever()


async def test_write_through_and_read_through(tmp_path) -> None:
    async with no_leaks():
        async with triode.open_node(data=tmp_path / "back") as back, \
                triode.open_node(data=tmp_path / "front", backing=back.address) as front, \
                triode.connect(front.address) as client, triode.connect(back.address) as direct:
            big, small = os.urandom(3 * MiB), b"small blob"
            for data in (big, small):
                digest = await client.cas.put(data)
                assert await direct.cas.get(digest) == data  # written through
            only_back = await direct.cas.put(os.urandom(2 * MiB))
            absent = Digest.of(b"nowhere")
            before = _cas(front).backing.counters["find_missing_calls"]
            assert await client.cas.find_missing([only_back, absent, Digest.of(big)]) == [absent]
            assert _cas(front).backing.counters["find_missing_calls"] == before + 1  # once per batch
            assert _cas(front).path_of(only_back) is None
            assert await client.cas.get(only_back) == await direct.cas.get(only_back)  # read through
            assert _cas(front).path_of(only_back) is not None  # and kept
            # The action cache is tiered too.
            action = Digest.of(b"action")
            result = ActionResult(0, stdout=CapturedStream(Digest.of(big)))
            await client.ac.update(action, result)
            assert (await direct.ac.get(action)) == result
            other = Digest.of(b"other action")
            await direct.ac.update(other, ActionResult(3))
            assert (await client.ac.get(other)).exit_code == 3


@pytest.mark.parametrize("size", [20_000, 8 * MiB])
async def test_one_shared_fetch_for_50_readers(tmp_path, size: int) -> None:
    async with no_leaks():
        async with triode.open_node(data=tmp_path / "back") as back, \
                triode.open_node(data=tmp_path / "front", backing=back.address) as front:
            data = os.urandom(size)
            async with triode.connect(back.address) as direct:
                digest = await direct.cas.put(data)
            reads_before = _cas(back).counters["hits"]
            results: list[bytes] = []
            async with triode.connect(front.address) as client:
                async with trio.open_nursery() as n:
                    # The first reader starts the fetch and is cancelled while it runs.
                    cancelled = trio.CancelScope()

                    async def first() -> None:
                        with cancelled:
                            await client.cas.get(digest)

                    n.start_soon(first)
                    await trio.lowlevel.checkpoint()
                    for _ in range(50):
                        n.start_soon(lambda: _append(results, client.cas.get(digest)))
                    await _until(lambda: _cas(front).backing.counters["fetches"] >= 1)
                    cancelled.cancel()
            assert len(results) == 50 and all(r == data for r in results)
            assert _cas(back).counters["hits"] == reads_before + 1  # the backing node saw one read
            assert _cas(front).backing.counters["fetches"] == 1


async def _append(results: list[bytes], awaitable) -> None:
    results.append(await awaitable)


async def _until(predicate) -> None:
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - polling the node's own counters
            await trio.sleep(0.001)


async def test_failed_fetch_reaches_every_waiter_and_the_next_read_retries(tmp_path) -> None:
    async with no_leaks():
        async with triode.open_node(data=tmp_path / "back") as back, \
                triode.open_node(data=tmp_path / "front", backing=back.address) as front, \
                triode.connect(front.address) as client:
            data = os.urandom(MiB)
            digest = Digest.of(data)
            errors: list[Exception] = []

            async def reader() -> None:
                try:
                    await client.cas.get(digest)
                except BlobNotFound as exc:
                    errors.append(exc)

            async with trio.open_nursery() as n:
                for _ in range(10):
                    n.start_soon(reader)
            assert len(errors) == 10 and "backing node" in str(errors[0])
            async with triode.connect(back.address) as direct:
                await direct.cas.put(data)
            assert await client.cas.get(digest) == data


async def test_backing_node_killed_and_restarted(tmp_path) -> None:
    async with no_leaks(), trio.open_nursery() as n:
        back_scope = trio.CancelScope()

        async def run_back(listen: str = "127.0.0.1:0", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
            with back_scope:
                await _serve_node(tmp_path / "back", listen=listen, task_status=task_status)

        back = await n.start(run_back)
        address = back.address
        async with triode.open_node(data=tmp_path / "front", backing=address) as front, \
                triode.connect(front.address) as client:
            local = await client.cas.put(b"held locally" * 1000)
            elsewhere = Digest.of(b"never stored")
            back_scope.cancel()  # the backing node goes away
            await _until(lambda: not _cas(front).backing.connected)
            assert await client.cas.get(local) == b"held locally" * 1000  # local reads keep working
            with trio.fail_after(2):  # ... and what needs the backing node fails fast, naming it
                with pytest.raises(Unavailable, match=address):
                    await client.cas.put(b"new blob")
                with pytest.raises(Unavailable, match=address):
                    await client.cas.get(elsewhere)
                with pytest.raises(Unavailable, match=address):
                    await client.cas.find_missing([elsewhere])
            assert "backing" in (await client.info())["storage"]["cas"]
            # It comes back on the same address; the front reconnects by itself.
            back_scope = trio.CancelScope()
            await n.start(run_back, address)
            await _until(lambda: _cas(front).backing.connected)
            digest = await client.cas.put(b"new blob")
            async with triode.connect(address) as direct:
                assert await direct.cas.get(digest) == b"new blob"
        back_scope.cancel()
