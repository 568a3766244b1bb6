"""Fixtures shared by every test: leak-checked nodes and clients."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import triode
from triode.testing import no_leaks


@pytest.fixture
async def leak_check() -> AsyncIterator[None]:
    """Fail the test if a task, fd or child process it started is still there at the end."""
    async with no_leaks():
        yield


@pytest.fixture
async def node(tmp_path) -> AsyncIterator[triode.Node]:
    """A node on loopback over a fresh data dir; checked for leaks once it is closed."""
    async with no_leaks():
        async with triode.open_node(listen="127.0.0.1:0", data=tmp_path / "data") as n:
            yield n


@pytest.fixture
async def client(node: triode.Node) -> AsyncIterator[triode.Client]:
    async with triode.connect(node.address) as c:
        yield c
