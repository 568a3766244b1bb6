"""``triode node`` and ``triode ping`` as a user runs them: separate processes, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

import triode
from triode import errors
from triode.procgroup import open_process_group
from triode.testing import no_leaks

#: Runs ``triode`` with one extra part serving ``test.sleep`` (sleep ARGS seconds, then
#: answer "slept") and ``test.hold`` (answer "released" once the file named by ARGS
#: exists), so a test can have a call in flight when it signals the node. Each says on
#: stderr when it has started, so the test knows the call is in flight without guessing.
WITH_SLEEP_METHOD = """
import os
import sys
from contextlib import asynccontextmanager
import trio
import triode.node.compose

class Part:
    name = "test"
    def info(self):
        return {}

@asynccontextmanager
async def sleep_part(node):
    async def sleep(call):
        print(f"test.sleep {call.args}: started", file=sys.stderr, flush=True)
        await trio.sleep(call.args)
        return "slept"

    async def hold(call):
        print("test.hold: started", file=sys.stderr, flush=True)
        while not os.path.exists(call.args):
            await trio.sleep(0.02)
        return "released"

    node.router.add("test.sleep", sleep)
    node.router.add("test.hold", hold)
    yield Part()

triode.node.compose.PARTS = (*triode.node.compose.PARTS, sleep_part)
from triode.cli import main
sys.exit(main(sys.argv[1:]))
"""


def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "TRIODE_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}


@dataclass
class RunningNode:
    proc: trio.Process
    address: str
    stderr: bytearray = field(default_factory=bytearray)


@asynccontextmanager
async def triode_node(tmp_path: Path, *args: str, sleep_method: bool = False) -> AsyncIterator[RunningNode]:
    """``triode node --listen 127.0.0.1:0 ARGS``; yields once it says where it listens."""
    head = [sys.executable, "-c", WITH_SLEEP_METHOD] if sleep_method else [sys.executable, "-m", "triode"]
    argv = [*head, "node", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "data"), *args]
    async with open_process_group(argv, env=env(tmp_path), grace=2) as proc, trio.open_nursery() as n:
        assert proc.stderr is not None
        running: RunningNode | None = None
        buf = bytearray()
        with trio.fail_after(30):
            while (match := re.search(rb"listening on (\S+:\d+)\n", buf)) is None:
                chunk = await proc.stderr.receive_some()
                assert chunk, f"node exited before listening: {buf.decode()}"
                buf += chunk
        running = RunningNode(proc, match.group(1).decode(), buf)

        async def drain() -> None:
            async for chunk in proc.stderr:
                running.stderr += chunk

        n.start_soon(drain)
        yield running
        n.cancel_scope.cancel()


async def triode_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [sys.executable, "-m", "triode", *args], env=env(tmp_path), capture_stdout=True,
            capture_stderr=True, check=False,
        )


async def wait_exit(proc: trio.Process, within: float = 30) -> int:
    with trio.fail_after(within):
        return await proc.wait()


async def wait_said(node: RunningNode, line: bytes, within: float = 30) -> None:
    """Until the node has written ``line`` to its stderr (read by the drain task)."""
    with trio.fail_after(within):
        while line not in node.stderr:  # noqa: ASYNC110 - another process's output, polled
            await trio.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_node_serves_and_exits_0_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    async with no_leaks(), triode_node(tmp_path) as node:
        assert re.fullmatch(r"127\.0\.0\.1:\d+", node.address)
        async with triode.connect(node.address) as client:
            info = await client.info()
            assert info["address"] == node.address
            assert await client.ping() >= 0
        node.proc.send_signal(sig)
        assert await wait_exit(node.proc) == 0
    assert f"{sig.name}: shutting down".encode() in node.stderr


async def test_sigterm_lets_the_call_in_flight_finish(tmp_path: Path) -> None:
    release = tmp_path / "release"
    # A grace far longer than any wait below: the call in flight ends when the test says.
    async with no_leaks(), triode_node(tmp_path, "--shutdown-grace", "120", sleep_method=True) as node:
        async with triode.connect(node.address) as client, trio.open_nursery() as nursery:
            answer: list[str] = []

            async def call() -> None:
                answer.append(await client.connection.call("test.hold", str(release)))

            nursery.start_soon(call)
            await wait_said(node, b"test.hold: started")
            node.proc.send_signal(signal.SIGTERM)
            # The node refuses new work while it drains (once its GOODBYE has arrived) ...
            with trio.fail_after(30):
                while True:
                    try:
                        await client.connection.call("test.sleep", 0)
                    except (errors.ConnectionClosed, errors.Unavailable) as exc:
                        assert "shutting down" in str(exc)
                        break
                    await trio.sleep(0.05)
            assert not answer
            await trio.Path(release).touch()
        # ... and the call that was running got its answer.
        assert answer == ["released"]
        assert await wait_exit(node.proc) == 0


async def test_shutdown_grace_bounds_the_wait(tmp_path: Path) -> None:
    async with no_leaks(), triode_node(tmp_path, "--shutdown-grace", "0.5", sleep_method=True) as node:
        async with triode.connect(node.address) as client, trio.open_nursery() as nursery:
            async def call() -> None:
                with pytest.raises(errors.ConnectionClosed):
                    await client.connection.call("test.sleep", 600)

            nursery.start_soon(call)
            await wait_said(node, b"test.sleep 600: started")
            node.proc.send_signal(signal.SIGINT)
        assert await wait_exit(node.proc, within=20) == 0


async def test_listen_address_in_use_is_a_clear_error(tmp_path: Path) -> None:
    async with no_leaks(), triode_node(tmp_path) as node:
        done = await triode_cli(tmp_path, "node", "--listen", node.address, "--data", str(tmp_path / "d2"))
        assert done.returncode == 2  # triode's own failure (1 is kept for a plain "no")
        assert done.stderr.decode().strip() == (
            f"triode: cannot listen on {node.address}: Address already in use"
        )
        node.proc.send_signal(signal.SIGINT)
        assert await wait_exit(node.proc) == 0


# -- triode ping -----------------------------------------------------------------------


async def test_ping(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    async with no_leaks(), triode_node(tmp_path, "--token-file", str(token)) as node:
        done = await triode_cli(tmp_path, "ping", node.address, "--token-file", str(token), "-c", "3")
        assert done.returncode == 0, done.stderr
        lines = done.stdout.decode().splitlines()
        assert len(lines) == 3
        assert all(re.fullmatch(rf"pong from node-\w+ at {node.address}: [\d.]+ ms", ln) for ln in lines)

        done = await triode_cli(tmp_path, "ping", node.address)
        assert done.returncode == 1
        assert b"requires a token" in done.stderr
        node.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(node.proc) == 0


async def test_ping_nobody_listening(tmp_path: Path) -> None:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # the port is free: nobody answers there
    done = await triode_cli(tmp_path, "ping", f"127.0.0.1:{port}")
    assert done.returncode == 1
    assert f"cannot reach node at 127.0.0.1:{port}".encode() in done.stderr
    assert b"Traceback" not in done.stderr


async def test_ping_silent_server_times_out(tmp_path: Path) -> None:
    """Something accepts the connection but never says hello: ping gives up on time."""
    async with no_leaks():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        async with listeners[0], trio.open_nursery() as nursery:
            async def accept_and_ignore() -> None:
                held: list[trio.abc.Stream] = []
                try:
                    while True:
                        held.append(await listeners[0].accept())
                finally:
                    for stream in held:
                        await trio.aclose_forcefully(stream)

            nursery.start_soon(accept_and_ignore)
            done = await triode_cli(tmp_path, "ping", f"127.0.0.1:{port}", "--timeout", "1")
            nursery.cancel_scope.cancel()
    assert done.returncode == 1
    assert f"no answer from 127.0.0.1:{port} within 1.0s".encode() in done.stderr


async def test_ping_bad_address(tmp_path: Path) -> None:
    done = await triode_cli(tmp_path, "ping", "no-port-here")
    assert done.returncode == 1
    assert b"HOST:PORT" in done.stderr


async def test_unreadable_tls_files_are_a_clear_error(tmp_path: Path) -> None:
    done = await triode_cli(tmp_path, "node", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "d"),
                            "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "k.pem"))
    assert done.returncode == 2
    assert b"cannot load the TLS certificate" in done.stderr
    assert b"Traceback" not in done.stderr
