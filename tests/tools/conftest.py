"""Fixtures for tool tests: both runtimes, the fixture entrypoints, a leak-checked pool."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from triode.errors import RuntimeMissing
from triode.testing import no_leaks
from triode.tools import ToolPool, find_runtime, open_tool_pool

FIXTURES = Path(__file__).with_name("fixtures")
JS = FIXTURES / "tools.mjs"
TS = FIXTURES / "tools.ts"


def in_ci() -> bool:
    """Whether this is a CI run (``CI=true``, as CI services set it; ``1`` counts too)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.fixture(params=["bun", "node"])
def runtime(request: pytest.FixtureRequest) -> str:
    """Each test runs under bun and under node; bun comes from scripts/setup-js (.triode-js/).

    A runtime that is missing skips its tests on a developer's machine, but fails them
    under CI: there a skip would pass the run with the tools never tested.
    """
    try:
        find_runtime(request.param)
    except RuntimeMissing as exc:
        if in_ci():
            pytest.fail(
                f"{request.param} is not installed and CI={os.environ['CI']}: the tools tests must run "
                f"in CI ({exc}); install Node.js 20+ with npm and run scripts/setup",
                pytrace=False,
            )
        pytest.skip(f"{request.param} is not installed here ({exc}); run scripts/setup-js")
    return request.param


@pytest.fixture
async def pool(runtime: str) -> AsyncIterator[ToolPool]:
    """A pool of 2 workers on the test's runtime; nothing it started may outlive it."""
    async with no_leaks(), open_tool_pool(size=2, runtime=runtime, timeout=20.0, grace=1.0) as p:
        yield p
