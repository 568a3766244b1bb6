"""Real ``triode node`` processes on loopback for the cluster tests."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

import triode
from triode.model.action import Action
from triode.procgroup import open_process_group


@dataclass
class NodeProcess:
    address: str
    process: trio.Process
    log: Path

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye, no draining."""
        os.killpg(self.process.pid, signal.SIGKILL)


@asynccontextmanager
async def spawn_node(tmp: Path, *args: str, ready_timeout: float = 30.0) -> AsyncIterator[NodeProcess]:
    """``python -m triode node`` in its own process group; stopped (TERM, then KILL) on exit."""
    await trio.Path(tmp).mkdir(parents=True, exist_ok=True)
    log = tmp / "node.log"
    argv = [sys.executable, "-m", "triode", "node", "--listen", "127.0.0.1:0", "--data", str(tmp / "data"),
            "--shutdown-grace", "2", *args]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), "TRIODE_HOME": str(tmp)}
    with open(log, "wb") as err:  # noqa: ASYNC230 - a local file, opened once
        async with open_process_group(argv, env=env, stdout=None, stderr=err, grace=5.0) as proc:
            with trio.fail_after(ready_timeout):
                while True:
                    text = await trio.Path(log).read_text(errors="replace")
                    found = [line for line in text.splitlines() if line.startswith("listening on ")]
                    if found:
                        break
                    if proc.returncode is not None or proc.poll() is not None:
                        raise RuntimeError(f"node did not start:\n{text[-3000:]}")
                    await trio.sleep(0.05)
            yield NodeProcess(found[0].split()[-1], proc, log)


@asynccontextmanager
async def spawn_cluster(tmp: Path, n: int, *args: str) -> AsyncIterator[list[NodeProcess]]:
    """``n`` nodes, every one after the first seeded with the first; returns once all see each other."""
    async with spawn_node(tmp / "n0", *args) as first:
        nodes = [first]
        async with _more(tmp, n - 1, first.address, args, nodes):
            await wait_for_peers([node.address for node in nodes], n - 1)
            yield nodes


@asynccontextmanager
async def _more(
    tmp: Path, n: int, seed: str, args: Sequence[str], nodes: list[NodeProcess]
) -> AsyncIterator[None]:
    if n == 0:
        yield
        return
    async with spawn_node(tmp / f"n{len(nodes)}", "--peer", seed, *args) as node:
        nodes.append(node)
        async with _more(tmp, n - 1, seed, args, nodes):
            yield


async def wait_for(predicate: Callable[[], Any], *, within: float = 30.0, every: float = 0.1) -> None:
    """Poll another process's state (no event to wait on across processes) until true."""
    with trio.fail_after(within):
        while not await predicate():  # noqa: ASYNC110
            await trio.sleep(every)


async def wait_for_peers(addresses: Sequence[str], count: int, within: float = 30.0) -> None:
    """Until each node sees ``count`` peers alive (and knows their load)."""
    for address in addresses:
        async with triode.connect(address) as client:

            async def ready(client: triode.Client = client) -> bool:
                peers = (await client.status())["sched"]["peers"]
                return sum(1 for p in peers if p["state"] == "alive" and p["load"]) >= count

            await wait_for(ready, within=within)


def sleep_action(seconds: float, tag: str | int = "") -> Action:
    """``sleep`` as an action; ``tag`` makes otherwise identical actions distinct."""
    return Action(argv=("sleep", str(seconds)), env={"TAG": str(tag)}, timeout=60)
