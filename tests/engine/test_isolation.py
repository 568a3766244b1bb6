"""Isolation of actions (triode/engine/sandbox.py), against real ``triode node`` processes.

Every case runs twice: on a node that is root, and on one that is not (a node process
run as ``nobody`` through setpriv, over a data dir it owns; where the tests themselves
do not run as root, that is simply this user). The attacks are the ones of issue #18:
a detached writer that changes a hard-linked input after its action returned, and a
daemon that outlives its action.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio._core._thread_cache as thread_cache

import triode
from triode.engine.sandbox import find_bwrap
from triode.model.action import Action, Input
from triode.model.digest import Digest
from triode.procgroup import open_process_group
from triode.testing import no_leaks, procs_with

pytestmark = pytest.mark.skipif(find_bwrap() is None, reason="bubblewrap is not installed")

NODES = ["root", "unprivileged"]
PATH = "/usr/bin:/bin"


@dataclass
class NodeProcess:
    address: str
    data: Path
    log: Path
    process: trio.Process

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")


def _nobody() -> tuple[int, int]:
    entry = pwd.getpwnam("nobody")
    return entry.pw_uid, entry.pw_gid


@asynccontextmanager
async def spawn_node(
    kind: str, tmp_path: Path, *args: str, started: bool = True, home: Path | None = None
) -> AsyncIterator[NodeProcess]:
    """``triode node`` on loopback as root, or as a user that is not root, over its own data dir.

    With ``started=False`` the node is expected to refuse to start: it is waited for and
    yielded once it has exited. ``home``: the home (and data dir's parent) of an earlier
    node, to start another over the same data dir (the caller removes it).
    """
    prefix: list[str] = []
    made = None
    if kind == "root":
        if os.geteuid() != 0:
            pytest.skip("needs root")
    elif os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("needs setpriv to run a node as nobody")
        uid, gid = _nobody()
        if home is None:
            # A dir nobody can reach (pytest's own are root's, 0700), removed at the end.
            home = made = Path(tempfile.mkdtemp(prefix="triode-isolation-"))
            os.chown(home, uid, gid)
        prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--"]
    if home is None:
        home = tmp_path / "node"
    home.mkdir(exist_ok=True)
    log = tmp_path / "node.log"
    argv = [*prefix, sys.executable, "-m", "triode", "node", "--listen", "127.0.0.1:0", "--data",
            str(home / "data"), "--shutdown-grace", "2", *args]
    env = {"PATH": os.environ.get("PATH", PATH), "HOME": str(home), "TRIODE_HOME": str(home)}
    try:
        with open(log, "wb") as err:  # noqa: ASYNC230 - a local file, opened once
            async with open_process_group(argv, env=env, stdout=None, stderr=err, grace=5.0) as proc:
                with trio.fail_after(30):
                    while True:
                        text = await trio.Path(log).read_text(errors="replace")
                        lines = text.splitlines()
                        ready = [i for i, line in enumerate(lines) if line.startswith("listening on ")]
                        if ready and any(line.startswith("actions: ") for line in lines[ready[0]:]):
                            break
                        if proc.poll() is not None:
                            if not started:
                                break
                            raise RuntimeError(f"node did not start:\n{text[-3000:]}")
                        await trio.sleep(0.05)
                if not started:
                    assert proc.returncode is not None, f"the node started:\n{text}"
                    yield NodeProcess("", home / "data", log, proc)
                    return
                yield NodeProcess(lines[ready[0]].split()[-1], home / "data", log, proc)
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def sh(script: str, **fields: object) -> Action:
    env = {"PATH": PATH, **fields.pop("env", {})}  # type: ignore[dict-item]
    return Action(argv=("/bin/sh", "-c", script), env=env, **fields)  # type: ignore[arg-type]


def marker() -> str:
    """Seconds to sleep (about 1000) that no other sleeper has in its command line."""
    return f"1000.{secrets.randbelow(10**9):09d}"


def stored_path(data: Path, digest: Digest) -> Path:
    return data / "cas" / digest.hash[:2] / digest.hash


async def engine_info(client: triode.Client) -> dict:  # type: ignore[type-arg]
    return (await client.status())["engine"]


@pytest.mark.parametrize("kind", NODES)
async def test_a_detached_writer_cannot_change_a_staged_input(kind: str, tmp_path: Path) -> None:
    precious = b"precious\n"
    async with no_leaks(), spawn_node(kind, tmp_path) as node, triode.connect(node.address) as client:
        blob = await client.cas.put(precious)
        sleeper = marker()
        store = stored_path(node.data, blob)
        # Right away, through the input and through the store's own path; then, from a daemon
        # the action leaves behind, after the action has returned.
        action = sh(
            "chmod u+w in.txt && echo now >> in.txt; chmod u+w \"$STORE\" && echo now >> \"$STORE\"; "
            f"setsid sh -c 'sleep {sleeper}; chmod u+w in.txt; echo later >> in.txt; "
            "chmod u+w \"$STORE\"; echo later >> \"$STORE\"' >/dev/null 2>&1 </dev/null & echo started",
            inputs={"in.txt": Input(blob)}, env={"STORE": str(store)},
        )
        outcome = await client.execute(action)
        assert await client.cas.get(outcome.result.stdout.digest) == b"started\n"
        engine = await engine_info(client)
        if kind == "root":
            assert engine["inputs_linked"] == 1  # the attack was on a hard link to the stored file
            assert stored_path(node.data, blob).stat().st_uid == _nobody()[0]
        else:
            assert engine["inputs_copied"] == 1
        assert procs_with(sleeper) == []  # the writer did not outlive its action
        await trio.sleep(0.3)
        assert store.read_bytes() == precious
        assert await client.cas.get(blob) == precious
        assert (await client.cas.batch_read([blob]))[blob] == precious
        again = await client.execute(sh("cat in.txt", inputs={"in.txt": Input(blob)}, env={"N": "2"}))
        assert await client.cas.get(again.result.stdout.digest) == precious
        reply = await client.connection.call("cas.verify", {})
        assert reply["damaged"] == [] and reply["checked"] >= 3


@pytest.mark.parametrize("kind", NODES)
async def test_a_daemon_does_not_outlive_its_action(kind: str, tmp_path: Path) -> None:
    async with no_leaks(), spawn_node(kind, tmp_path) as node, triode.connect(node.address) as client:
        tag = marker()
        sleeps = [f"{tag}{i}" for i in range(4)]
        action = sh(
            # setsid with every descriptor closed; a double fork; one deaf to TERM and HUP; one
            # that moved to a process group of its own and holds nothing of ours.
            f"setsid sleep {sleeps[0]} >/dev/null 2>&1 </dev/null & "
            f"(sh -c 'sleep {sleeps[1]} <&- >&- 2>&- &' &) ; "
            f"setsid sh -c 'trap \"\" TERM HUP; exec sleep {sleeps[2]}' >/dev/null 2>&1 </dev/null & "
            f"setsid sh -c 'exec 0<&- 1>&- 2>&-; sleep {sleeps[3]}' & sleep 0.2; echo left",
            do_not_cache=True,
        )
        outcome = await client.execute(action)
        assert outcome.exit_code == 0
        assert await client.cas.get(outcome.result.stdout.digest) == b"left\n"
        assert [s for s in sleeps if procs_with(s)] == []


@pytest.mark.parametrize("kind", NODES)
async def test_the_daemons_of_a_timed_out_action_end_with_it(kind: str, tmp_path: Path) -> None:
    async with no_leaks(), spawn_node(kind, tmp_path) as node, triode.connect(node.address) as client:
        daemon = marker()
        action = sh(
            f"setsid sleep {daemon} >/dev/null 2>&1 </dev/null & "
            "trap 'echo last words; exit 3' TERM; sleep 30 & wait",
            timeout=0.5, do_not_cache=True,
        )
        outcome = await client.execute(action)
        r = outcome.result
        # The command still got its SIGTERM and its grace (the sandbox did not take it away)...
        assert r.timed_out and r.exit_code == 3 and r.signal is None
        assert await client.cas.get(r.stdout.digest) == b"last words\n"
        assert procs_with(daemon) == []  # ...and what it left behind went with it


async def test_an_action_outlives_the_thread_that_started_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # trio starts processes from cached worker threads, which exit once idle (10 s; 0.1 s
    # here). bwrap's --die-with-parent tied the sandbox to that thread: every isolated action
    # that ran past it was SIGKILLed (exit 137) on a quiet node.
    monkeypatch.setattr(thread_cache, "IDLE_TIMEOUT", 0.1)
    async with no_leaks(), triode.open_node(listen="127.0.0.1:0", data=tmp_path / "data") as node:
        async with triode.connect(node.address) as client:
            assert (await engine_info(client))["isolated"]
            outcome = await client.execute(sh("sleep 1; echo done", do_not_cache=True))
            assert (outcome.exit_code, outcome.result.signal) == (0, None)
            assert await client.cas.get(outcome.result.stdout.digest) == b"done\n"


@pytest.mark.parametrize("kind", NODES)
async def test_a_node_stops_what_a_killed_node_left_running(kind: str, tmp_path: Path) -> None:
    # A SIGKILLed node cannot stop its actions: they run in sessions and sandboxes of their
    # own. The next node over the same data dir stops them before it removes their dirs.
    sleeper = marker()
    home = tmp_path / "node"
    if kind != "root":  # a home nobody can reach (pytest's dirs are root's, 0700)
        home = Path(tempfile.mkdtemp(prefix="triode-isolation-"))
        if os.geteuid() == 0:
            os.chown(home, *_nobody())
    async with no_leaks():
        async with spawn_node(kind, tmp_path, home=home) as first:
            async with triode.connect(first.address) as client, trio.open_nursery() as nursery:
                async def run() -> None:
                    with contextlib.suppress(triode.TriodeError, trio.BrokenResourceError):
                        await client.execute(sh(f"sleep {sleeper}", do_not_cache=True))

                nursery.start_soon(run)
                with trio.fail_after(20):
                    while not procs_with(sleeper):  # noqa: ASYNC110 - polling, bounded
                        await trio.sleep(0.05)
                first.process.kill()
                await first.process.wait()
                await trio.sleep(0.5)
                assert procs_with(sleeper), "the action went with the node: nothing to test"
                nursery.cancel_scope.cancel()
        try:
            async with spawn_node(kind, tmp_path, home=home) as second:
                assert procs_with(sleeper) == []  # stopped before the node said it listens
                assert "stopped 1 process groups a killed node left running" in second.stderr()
                roots = [p for p in (second.data / "work").iterdir() if p.is_dir()]
                assert len(roots) == 1  # the second node's own: the first's dirs are gone
        finally:
            for pid in procs_with(sleeper):  # only when the test failed: nothing to leave behind
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if kind != "root":
                shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("kind", NODES)
async def test_an_action_runs_in_its_work_dir_whatever_pwd_it_sets(kind: str, tmp_path: Path) -> None:
    """Bazel sends PWD=/proc/self/cwd: bubblewrap without --chdir would start in $PWD."""
    async with no_leaks(), spawn_node(kind, tmp_path) as node, triode.connect(node.address) as client:
        for pwd in ("/proc/self/cwd", "/", "/nonexistent"):
            action = Action(("/bin/sh", "-c", "cat here.txt"), env={"PWD": pwd},
                            inputs={"sub/here.txt": await client.cas.put(b"in the work dir")}, cwd="sub")
            r = (await client.execute(action)).result
            assert r.exit_code == 0 and await client.cas.get(r.stdout.digest) == b"in the work dir"


@pytest.mark.parametrize("kind", NODES)
async def test_the_action_sees_its_own_environment_and_an_error_for_a_missing_program(
    kind: str, tmp_path: Path
) -> None:
    async with no_leaks(), spawn_node(kind, tmp_path) as node, triode.connect(node.address) as client:
        r = (await client.execute(Action(("/usr/bin/env",), env={"ONLY": "this"}))).result
        seen = (await client.cas.get(r.stdout.digest)).decode().splitlines()
        # Its env, and the PWD of its working directory that bwrap sets, as a shell would.
        assert [line for line in seen if not line.startswith("PWD=")] == ["ONLY=this"]
        assert all(line.startswith(f"PWD={node.data / 'work'}") for line in seen if line.startswith("PWD="))
        r = (await client.execute(Action(("/usr/bin/env",), env={"PWD": "/mine"}))).result
        assert await client.cas.get(r.stdout.digest) == b"PWD=/mine\n"
        r = (await client.execute(Action(("/bin/pwd",)))).result
        assert (await client.cas.get(r.stdout.digest)).startswith(str(node.data / "work").encode())
        r = (await client.execute(Action(("no-such-program",), env={"PATH": PATH}))).result
        assert r.exit_code == 127
        assert b"cannot run 'no-such-program'" in await client.cas.get(r.stderr.digest)
        r = (await client.execute(Action(("/bin/sh", "-c", "kill -9 $$")))).result
        assert r.exit_code == 137 and r.signal == 9


@pytest.mark.parametrize("kind", NODES)
async def test_status_shows_the_isolation_mode(kind: str, tmp_path: Path) -> None:
    async with no_leaks(), spawn_node(kind, tmp_path) as node, triode.connect(node.address) as client:
        engine = await engine_info(client)
        assert engine["isolation"] == "bwrap" and engine["isolated"] is True
        assert "PID namespace" in engine["isolation_detail"] and engine["action_network"] == "host"
        assert f"actions: {engine['isolation_detail']}" in node.stderr().splitlines()
        done = await trio.run_process(
            [sys.executable, "-m", "triode", "status", "--json", "--remote", node.address],
            capture_stdout=True, env={**os.environ, "TRIODE_HOME": str(tmp_path / "unused")},
        )
        assert json.loads(done.stdout)["engine"]["isolation"] == "bwrap"


@pytest.mark.parametrize("kind", NODES)
async def test_without_bwrap_the_node_says_so_at_start_and_in_status(kind: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "bwrap")
    async with no_leaks(), spawn_node(kind, tmp_path, "--bwrap", missing) as node:
        async with triode.connect(node.address) as client:
            engine = await engine_info(client)
            assert engine["isolation"] == "none" and engine["isolated"] is False
            detail = engine["isolation_detail"]
            assert detail.startswith("NOT ISOLATED:") and missing in detail
            assert f"actions: {engine['isolation_detail']}" in node.stderr().splitlines()
            # Unisolated, inputs are copied: the stored blob is out of the action's reach that way.
            blob = await client.cas.put(b"precious\n")
            await client.execute(sh("chmod u+w in.txt; echo x >> in.txt", inputs={"in.txt": Input(blob)}))
            assert await client.cas.get(blob) == b"precious\n"
            assert (await engine_info(client))["inputs_copied"] == 1
    # Asked for bwrap outright, the node refuses to start and says why.
    async with no_leaks(), spawn_node(kind, tmp_path, "--bwrap", missing, "--isolation", "bwrap",
                                      started=False) as refused:
        assert refused.process.returncode == 2
        assert f"there is no bwrap to run at {missing}" in refused.stderr()


@pytest.mark.parametrize("kind", NODES)
async def test_an_action_without_network(kind: str, tmp_path: Path) -> None:
    python = shutil.which("python3", path=PATH)
    if python is None:
        pytest.skip("needs a python3 on /usr/bin:/bin")
    connect = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)"
    async with no_leaks():
        for network, expected in (("host", 0), ("none", 1)):
            async with spawn_node(kind, tmp_path, "--action-network", network) as node:
                async with triode.connect(node.address) as client:
                    assert (await engine_info(client))["action_network"] == network
                    host, port = node.address.rsplit(":", 1)
                    action = Action((python, "-c", connect, host, port), do_not_cache=True)
                    assert (await client.execute(action)).exit_code == expected

