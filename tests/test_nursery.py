"""Errors raised in the block of open_node / open_service_nursery come out as themselves."""

import pytest
import trio

import triode
from triode.concurrency import open_service_nursery
from triode.testing import no_leaks


async def test_block_error_is_not_wrapped() -> None:
    started = trio.Event()
    with pytest.raises(KeyError):
        async with open_service_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            started.set()
            raise KeyError("mine")


async def test_background_failure_is_a_group() -> None:
    async def boom() -> None:
        raise ValueError("background")

    with pytest.raises(ExceptionGroup) as info:
        async with open_service_nursery() as nursery:
            nursery.start_soon(boom)
            await trio.sleep_forever()
    assert info.group_contains(ValueError)


async def test_outer_cancel_passes_through() -> None:
    async with no_leaks():
        with trio.move_on_after(0.01) as scope:
            async with open_service_nursery() as nursery:
                nursery.start_soon(trio.sleep_forever)
                await trio.sleep_forever()
    assert scope.cancelled_caught


async def test_open_node_lets_the_callers_error_out(tmp_path) -> None:
    async with no_leaks():
        with pytest.raises(triode.BlobNotFound):
            async with triode.open_node(data=tmp_path) as node, triode.connect(node.address) as client:
                await client.cas.get(triode.Digest.of(b"never stored"))


async def test_open_node_start_failure_is_not_wrapped(tmp_path) -> None:
    busy = tmp_path / "file"
    busy.write_text("a file where the data dir should be")
    async with no_leaks():
        with pytest.raises(Exception) as info:
            async with triode.open_node(data=busy / "data"):
                pass
    assert not isinstance(info.value, BaseExceptionGroup)


async def test_open_node_accepts_str_paths(tmp_path) -> None:
    async with triode.open_node(data=str(tmp_path)) as node:
        assert node.config.data == tmp_path
