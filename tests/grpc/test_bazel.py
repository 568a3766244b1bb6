"""Bazel 4 against a real ``python -m triode node`` with ``--grpc``: remote cache, remote
execution, an interrupted build, and a node restarted under a running action.

One workspace and one Bazel output root (so one Bazel server, shut down at the end) serve
every test; each test has its node. Skipped without Bazel (CI installs Debian's).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

import triode
from triode.procgroup import open_process_group, proc_stats

BAZEL = shutil.which("bazel")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BAZEL is None, reason="Bazel is not installed (CI installs Debian's bazel-bootstrap)"),
    pytest.mark.timeout(300),
]

CC_RULES = (
    "cc_binary",
    "cc_library",
    "cc_test",
    "cc_import",
    "cc_proto_library",
    "cc_toolchain",
    "cc_toolchain_suite",
    "fdo_profile",
    "fdo_prefetch_hints",
    "objc_library",
    "objc_import",
)
JAVA_RULES = (
    "java_binary",
    "java_import",
    "java_library",
    "java_plugin",
    "java_test",
    "java_runtime",
    "java_toolchain",
    "java_package_configuration",
    "java_proto_library",
    "java_lite_proto_library",
)

BUILD = """
genrule(name = "upper", srcs = ["input.txt"], outs = ["upper.txt"], cmd = "tr a-z A-Z < $< > $@")
genrule(name = "twice", srcs = [":upper"], outs = ["twice.txt"], cmd = "cat $< $< > $@")
genrule(name = "tree", outs = ["tree.txt"], cmd = "mkdir -p t/a && echo x > t/a/f && find t | sort > $@")
cc_library(name = "greet", srcs = ["greet.c"], hdrs = ["greet.h"])
cc_binary(name = "hello", srcs = ["hello.c"], deps = [":greet"])
genrule(name = "ran", outs = ["ran.txt"], tools = [":hello"], cmd = "$(location :hello) > $@")
genrule(name = "interrupted", outs = ["interrupted.txt"], tags = ["manual"],
        cmd = "sleep 120.0625 && echo done > $@")
genrule(name = "restarted", outs = ["restarted.txt"], tags = ["manual"],
        cmd = "sleep 4.03125 && echo survived > $@")
"""
SOURCES = {
    "input.txt": "hello from triode\n",
    "greet.h": "const char *greeting(void);\n",
    "greet.c": '#include "greet.h"\nconst char *greeting(void) { return "hello, remote world"; }\n',
    "hello.c": '#include <stdio.h>\n#include "greet.h"\nint main(void) { puts(greeting()); return 0; }\n',
}
#: Actions //... runs through a spawn strategy (the rest are Bazel's internal ones): the
#: genrules, and the compiles, archive and links of the C++ targets.
SPAWNS = 12
#: Options of the nodes that execute: the defaults, isolation included. (Bazel sets
#: PWD=/proc/self/cwd in every action; the sandbox must still start it in its work dir.)
EXEC_NODE: tuple[str, ...] = ()


@dataclass
class Workspace:
    root: Path
    output_root: Path
    home: Path

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "USER": "triode-test",
        }

    def argv(self, *args: str) -> list[str]:
        assert BAZEL is not None
        return [BAZEL, f"--output_user_root={self.output_root}", "--nohome_rc", *args]


@pytest.fixture(scope="module")
def workspace() -> Iterator[Workspace]:
    # Short paths: the Bazel server's socket lives under the output root.
    base = Path(tempfile.mkdtemp(prefix="tg-", dir="/tmp"))
    ws = Workspace(base / "ws", base / "root", base / "home")
    ws.home.mkdir()
    for name, rules in (("rules_cc", CC_RULES), ("rules_java", JAVA_RULES)):
        stub = base / f"{name}_stub"
        package = stub / name.removeprefix("rules_")
        package.mkdir(parents=True)
        (stub / "WORKSPACE").write_text(f'workspace(name = "{name}")\n')
        (stub / "BUILD").write_text("")
        (package / "BUILD").write_text('exports_files(["defs.bzl"])\n')
        (package / "defs.bzl").write_text("".join(f"def {r}(**kw): native.{r}(**kw)\n" for r in rules))
    ws.root.mkdir()
    (ws.root / "WORKSPACE").write_text('workspace(name = "triode_grpc_test")\n')
    (ws.root / "BUILD").write_text(BUILD)
    for name, text in SOURCES.items():
        (ws.root / name).write_text(text)
    (ws.root / ".bazelrc").write_text(
        f"build --override_repository=rules_cc={base}/rules_cc_stub\n"
        f"build --override_repository=rules_java={base}/rules_java_stub\n"
        "build --spawn_strategy=processwrapper-sandbox\n"
        "build --show_progress_rate_limit=60\n"
    )
    try:
        yield ws
    finally:
        subprocess.run(ws.argv("shutdown"), cwd=ws.root, env=ws.env(), capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class NodeProcess:
    address: str
    grpc: str
    process: trio.Process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_started: list[Path] = []


@asynccontextmanager
async def spawn_node(data: Path, grpc: str = "127.0.0.1:0", *args: str) -> AsyncIterator[NodeProcess]:
    """``python -m triode node --grpc`` in its own process group; stopped (TERM, then KILL) on exit."""
    await trio.Path(data).mkdir(parents=True, exist_ok=True)
    log = data / f"node-{grpc.replace(':', '-')}-{len(_started)}.log"
    _started.append(log)
    argv = [
        sys.executable,
        "-m",
        "triode",
        "node",
        "--listen",
        "127.0.0.1:0",
        "--grpc",
        grpc,
        "--data",
        str(data / "data"),
        "--shutdown-grace",
        "1",
        *args,
    ]
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(data), "TRIODE_HOME": str(data)}
    with open(log, "wb") as err:  # noqa: ASYNC230 - a local file, opened once
        async with open_process_group(argv, env=env, stdout=None, stderr=err, grace=5.0) as proc:
            with trio.fail_after(30):
                while True:
                    text = await trio.Path(log).read_text(errors="replace")
                    listening = [
                        line.split()[-1] for line in text.splitlines() if line.startswith("listening on ")
                    ]
                    door = [line.split()[-1] for line in text.splitlines() if line.startswith("grpc on ")]
                    if listening and door:
                        break
                    if proc.poll() is not None:
                        raise RuntimeError(f"node did not start:\n{text[-3000:]}")
                    await trio.sleep(0.05)
            yield NodeProcess(listening[0], door[0], proc)


async def bazel(ws: Workspace, *args: str, check: bool = True) -> str:
    """Run a Bazel command in the workspace; its output (Bazel writes to stderr)."""
    result = await trio.run_process(
        ws.argv(*args), cwd=ws.root, env=ws.env(), capture_stdout=True, capture_stderr=True, check=False
    )
    out = (result.stdout + result.stderr).decode(errors="replace")
    if check and result.returncode != 0:
        raise AssertionError(f"bazel {' '.join(args)} exited {result.returncode}:\n{out[-4000:]}")
    return out


def processes(output: str) -> dict[str, int]:
    """Bazel's summary line, ``20 processes: 11 remote cache hit, 9 internal.``, as counts."""
    found = re.findall(r"(\d+) process(?:es)?: ([^\n]*?)\.?\n", output)
    assert found, output[-3000:]
    total, kinds = found[-1]
    counts = {m.group(2): int(m.group(1)) for m in re.finditer(r"(\d+) ([a-z][a-z -]*[a-z])", kinds)}
    assert sum(counts.values()) == int(total), (total, counts)
    return counts


def descendants(pid: int, marker: bytes) -> list[int]:
    """Processes below ``pid`` whose command line holds ``marker``."""
    stats = list(proc_stats())
    below: set[int] = set()
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for p in stats:
            if p.ppid == parent and p.pid not in below:
                below.add(p.pid)
                frontier.append(p.pid)
    found = []
    for child in below:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:  # noqa: ASYNC230 - /proc, never blocks
                if marker in f.read():
                    found.append(child)
        except OSError:
            continue
    return found


async def wait_until(predicate: object, within: float = 60.0) -> None:
    with trio.fail_after(within):
        while not predicate():  # type: ignore[operator]  # noqa: ASYNC110 - other processes' state
            await trio.sleep(0.1)


async def test_remote_cache_cold_then_all_hits(workspace: Workspace, tmp_path: Path) -> None:
    async with spawn_node(tmp_path / "node") as node:
        flags = [f"--remote_cache=grpc://{node.grpc}", "//..."]
        await bazel(workspace, "clean", "--expunge")
        cold = processes(await bazel(workspace, "build", *flags))
        assert cold.get("processwrapper-sandbox") == SPAWNS and "remote cache hit" not in cold, cold
        await bazel(workspace, "clean", "--expunge")
        warm = processes(await bazel(workspace, "build", *flags))
        assert warm.get("remote cache hit") == SPAWNS and "processwrapper-sandbox" not in warm, warm
        assert (workspace.root / "bazel-bin" / "ran.txt").read_text() == "hello, remote world\n"


async def test_remote_execution_runs_every_action_on_the_node(workspace: Workspace, tmp_path: Path) -> None:
    async with spawn_node(tmp_path / "node", "127.0.0.1:0", *EXEC_NODE) as node:
        flags = [f"--remote_executor=grpc://{node.grpc}", "--spawn_strategy=remote", "//..."]
        await bazel(workspace, "clean", "--expunge")
        ran = processes(await bazel(workspace, "build", *flags))
        assert ran.get("remote") == SPAWNS and set(ran) <= {"remote", "internal"}, ran
        hello = await trio.run_process([str(workspace.root / "bazel-bin" / "hello")], capture_stdout=True)
        assert hello.stdout == b"hello, remote world\n"
        assert (workspace.root / "bazel-bin" / "ran.txt").read_text() == "hello, remote world\n"
        assert (workspace.root / "bazel-bin" / "tree.txt").read_text() == "t\nt/a\nt/a/f\n"
        async with triode.connect(node.address) as client:
            executed = (await client.status())["sched"]["counters"]["executed"]
        assert executed == SPAWNS
        await bazel(workspace, "clean")
        again = processes(await bazel(workspace, "build", *flags))
        assert again.get("remote cache hit") == SPAWNS and "remote" not in again, again


async def test_interrupted_build_cancels_its_remote_actions(workspace: Workspace, tmp_path: Path) -> None:
    async with spawn_node(tmp_path / "node", "127.0.0.1:0", *EXEC_NODE) as node:
        marker = b"120.0625"
        log = tmp_path / "bazel.log"
        argv = workspace.argv(
            "build", f"--remote_executor=grpc://{node.grpc}", "--spawn_strategy=remote", "//:interrupted"
        )
        with open(log, "wb") as out:  # noqa: ASYNC230 - a local file, opened once
            async with open_process_group(
                argv, env=workspace.env(), cwd=workspace.root, stdout=out, stderr=out
            ) as client:
                await wait_until(lambda: descendants(node.process.pid, marker))
                client.send_signal(signal.SIGINT)
                with trio.fail_after(60):
                    await client.wait()
        assert "interrupted" in log.read_text(errors="replace").lower()
        await wait_until(lambda: not descendants(node.process.pid, marker), within=20)
        async with triode.connect(node.address) as c:
            counters = (await c.status())["sched"]["counters"]
        assert counters["cancelled"] == 1 and counters["executed"] == 1


async def test_node_restarted_mid_execute_and_bazel_resumes(workspace: Workspace, tmp_path: Path) -> None:
    grpc = f"127.0.0.1:{free_port()}"
    grpc_log = tmp_path / "grpc.log"
    argv = workspace.argv(
        "build",
        f"--remote_executor=grpc://{grpc}",
        "--spawn_strategy=remote",
        "--remote_retries=30",
        f"--experimental_remote_grpc_log={grpc_log}",
        "//:restarted",
    )
    out_path = tmp_path / "bazel.log"
    with open(out_path, "wb") as out:  # noqa: ASYNC230 - a local file, opened once
        async with spawn_node(tmp_path / "node", grpc, *EXEC_NODE) as first:
            async with open_process_group(
                argv, env=workspace.env(), cwd=workspace.root, stdout=out, stderr=out
            ) as client:
                await wait_until(lambda: descendants(first.process.pid, b"4.03125"))
                first.process.send_signal(signal.SIGTERM)  # a graceful stop, mid-Execute
                with trio.fail_after(30):
                    await first.process.wait()
                async with spawn_node(tmp_path / "node", grpc, *EXEC_NODE):  # the same port and data dir
                    with trio.fail_after(120):
                        code = await client.wait()
    output = out_path.read_text(errors="replace")
    assert code == 0, output[-3000:]
    assert (workspace.root / "bazel-bin" / "restarted.txt").read_text() == "survived\n"
    assert grpc_log.read_bytes().count(b"Execution/WaitExecution") >= 1
