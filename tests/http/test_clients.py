"""Real build clients against a real ``triode node --http`` process: Bazel's HTTP cache, ccache.

Each skips only where its client is not installed (CI installs both: ``.ci/run``).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from triode.procgroup import open_process_group
from triode.testing import no_leaks

from .raw import Raw

BAZEL = shutil.which("bazel")
CCACHE = shutil.which("ccache")
CC = shutil.which("gcc") or shutil.which("cc")


@asynccontextmanager
async def http_node_process(tmp_path: Path, *args: str) -> AsyncIterator[str]:
    """``python -m triode node --http 127.0.0.1:0 ARGS``; yields the HTTP address."""
    argv = [sys.executable, "-m", "triode", "node", "--listen", "127.0.0.1:0",
            "--data", str(tmp_path / "node"), "--http", "127.0.0.1:0", *args]
    env = {**os.environ, "TRIODE_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    async with open_process_group(argv, env=env, grace=5) as proc, trio.open_nursery() as nursery:
        assert proc.stderr is not None
        said = bytearray()
        with trio.fail_after(30):
            while (match := re.search(rb"http cache on (\S+:\d+)\n", said)) is None:
                chunk = await proc.stderr.receive_some()
                assert chunk, f"the node exited before serving: {said.decode()}"
                said += chunk

        async def drain() -> None:
            async for chunk in proc.stderr:
                said.extend(chunk)

        nursery.start_soon(drain)
        yield match.group(1).decode()
        nursery.cancel_scope.cancel()


async def run(argv: list[str], *, cwd: Path, env: dict[str, str], within: float = 120) -> str:
    with trio.fail_after(within):
        done = await trio.run_process(argv, cwd=cwd, env=env, capture_stdout=True, capture_stderr=True,
                                      check=False)
    out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"{' '.join(argv)} failed ({done.returncode}):\n{out[-4000:]}"
    return out


async def test_the_node_command_serves_the_http_cache(tmp_path):
    async with no_leaks(grace=10), http_node_process(tmp_path) as address:
        data = b"through the command"
        h = hashlib.sha256(data).hexdigest()
        async with await Raw.connect(address) as c:
            assert (await c.request("PUT", f"/cas/{h}", data)).status == 200
            assert (await c.request("GET", f"/cas/{h}")).body == data


# -- Bazel -----------------------------------------------------------------------------------------

CC_RULES = ("cc_binary", "cc_library", "cc_test", "cc_import", "cc_proto_library", "cc_toolchain",
            "cc_toolchain_suite", "fdo_profile", "fdo_prefetch_hints", "objc_library", "objc_import")
JAVA_RULES = ("java_binary", "java_import", "java_library", "java_plugin", "java_test", "java_runtime",
              "java_toolchain", "java_package_configuration", "java_proto_library", "java_lite_proto_library")

BUILD = """
genrule(name = "gen_a", outs = ["a.txt"], cmd = "echo alpha > $@")
genrule(name = "gen_b", srcs = [":a.txt"], outs = ["b.txt"], cmd = "cat $< $< > $@")
genrule(name = "gen_h", outs = ["gen.h"], cmd = "echo '#define GREETING \\"cached hello\\"' > $@")
cc_library(name = "lib", srcs = ["lib.c"], hdrs = ["lib.h", ":gen.h"])
cc_binary(name = "app", srcs = ["main.c"], deps = [":lib"])
"""
SOURCES = {
    "lib.h": "const char *greeting(void);\n",
    "lib.c": '#include "gen.h"\n#include "lib.h"\nconst char *greeting(void) { return GREETING; }\n',
    "main.c": '#include <stdio.h>\n#include "lib.h"\nint main(void) { puts(greeting()); return 0; }\n',
}


def _stub(root: Path, name: str, sub: str, rules: tuple[str, ...]) -> Path:
    """A local stand-in for @rules_cc / @rules_java that re-exports the native rules (offline)."""
    repo = root / name
    (repo / sub).mkdir(parents=True)
    (repo / "BUILD").write_text("")
    (repo / "WORKSPACE").write_text(f'workspace(name = "{name}")\n')
    (repo / sub / "BUILD").write_text('exports_files(["defs.bzl"])\n')
    (repo / sub / "defs.bzl").write_text("".join(f"def {r}(**kw): native.{r}(**kw)\n" for r in rules))
    return repo


def bazel_workspace(tmp_path: Path) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    cc = _stub(tmp_path / "stubs", "rules_cc", "cc", CC_RULES)
    java = _stub(tmp_path / "stubs", "rules_java", "java", JAVA_RULES)
    (ws / "WORKSPACE").write_text("")
    (ws / "BUILD").write_text(BUILD)
    for name, text in SOURCES.items():
        (ws / name).write_text(text)
    (ws / ".bazelrc").write_text(
        f"startup --output_user_root={tmp_path / 'bazel-root'}\n"
        "startup --max_idle_secs=120\n"  # a safety net: the test shuts the server down itself
        f"build --override_repository=rules_cc={cc}\n"
        f"build --override_repository=rules_java={java}\n"
        "build --spawn_strategy=processwrapper-sandbox\n"
        "build --color=no --curses=no --show_progress_rate_limit=60\n"
    )
    return ws


SUMMARY = re.compile(r"INFO: (\d+) processes?: (.*)\.")


def summary(output: str) -> dict[str, int]:
    """Bazel's "N processes: 6 remote cache hit, 4 internal." as {"remote cache hit": 6, ...}."""
    match = SUMMARY.search(output)
    assert match, f"no process summary in:\n{output[-3000:]}"
    counts = {}
    for part in match.group(2).split(", "):
        n, _, where = part.partition(" ")
        counts[where] = int(n)
    assert sum(counts.values()) == int(match.group(1))
    return counts


@pytest.mark.skipif(BAZEL is None, reason="bazel is not installed (CI installs it: .ci/run)")
async def test_bazel_rebuild_after_clean_is_all_remote_cache_hits(tmp_path):
    assert BAZEL is not None
    ws = bazel_workspace(tmp_path)
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    bazel = [BAZEL, "--nohome_rc"]  # the system rc says where Debian's Bazel is installed
    (tmp_path / "token").write_text("s3cret\n")
    token = ("--token-file", str(tmp_path / "token"))
    async with no_leaks(grace=10), http_node_process(tmp_path, *token) as address:
        # Both ways Bazel can present the token: a header, and basic auth in the URL.
        cache = [f"--remote_cache=http://{address}", "--remote_header=Authorization=Bearer s3cret"]
        try:
            cold = summary(await run([*bazel, "build", "//:all", *cache], cwd=ws, env=env))
            cache = [f"--remote_cache=http://bazel:s3cret@{address}"]
            ran = {where: n for where, n in cold.items() if where != "internal"}
            assert ran and set(ran) == {"processwrapper-sandbox"}, cold  # compiles, links, genrules
            await run([*bazel, "clean", "--expunge"], cwd=ws, env=env)
            warm = summary(await run([*bazel, "build", "//:all", *cache], cwd=ws, env=env))
            assert warm.get("remote cache hit") == ran["processwrapper-sandbox"], warm
            assert set(warm) <= {"remote cache hit", "internal"}, warm
            app = ws / "bazel-bin" / "app"
            with trio.fail_after(30):
                done = await trio.run_process([str(app)], capture_stdout=True)
            assert done.stdout == b"cached hello\n"
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(60):
                await trio.run_process([*bazel, "shutdown"], cwd=ws, env=env, check=False,
                                       capture_stdout=True, capture_stderr=True)


# -- ccache ----------------------------------------------------------------------------------------


def remote_stats(output: str) -> dict[str, int]:
    """The "Remote storage:" block of ``ccache -s -v`` as {"Hits": 3, "Misses": 0, ...}."""
    block = output.split("Remote storage:", 1)
    assert len(block) == 2, f"no remote storage stats in:\n{output}"
    stats = {}
    for line in block[1].splitlines()[1:]:
        if not line.startswith("  "):
            break
        name, _, rest = line.strip().partition(":")
        stats[name] = int(rest.split()[0])
    return stats


@pytest.mark.skipif(CCACHE is None or CC is None, reason="ccache (or a C compiler) is not installed "
                                                          "(CI installs it: .ci/run)")
async def test_ccache_hits_the_remote_store_from_a_second_build_dir(tmp_path):
    assert CCACHE is not None and CC is not None
    (tmp_path / "token").write_text("s3cret\n")
    sources = {f"unit{i}.c": f"int unit{i}(int x) {{ return x * {i + 1}; }}\n" for i in range(4)}
    token = ("--token-file", str(tmp_path / "token"))
    async with no_leaks(grace=10), http_node_process(tmp_path, *token) as address:

        async def build(name: str, storage: str) -> dict[str, int]:
            src = tmp_path / name
            src.mkdir()
            for file, text in sources.items():
                (src / file).write_text(text)
            env = {**os.environ, "CCACHE_DIR": str(tmp_path / f"{name}-cache"),
                   "CCACHE_REMOTE_STORAGE": storage, "CCACHE_NOHASHDIR": "1",
                   "CCACHE_BASEDIR": str(tmp_path), "CCACHE_CONFIGPATH": "/dev/null"}
            for file in sources:
                await run([CCACHE, CC, "-c", file, "-o", file[:-2] + ".o"], cwd=src, env=env, within=60)
            return remote_stats(await run([CCACHE, "-s", "-v"], cwd=src, env=env, within=30))

        url = f"http://ccache:s3cret@{address}/team"
        first = await build("first", url)
        assert (first["Hits"], first["Misses"], first.get("Errors", 0)) == (0, 4, 0), first
        second = await build("second", url)  # a new dir and an empty local cache
        assert (second["Hits"], second["Misses"], second.get("Errors", 0)) == (4, 0, 0), second
        bazel_layout = await build("third", url + "|layout=bazel")  # the same entries, another layout
        assert (bazel_layout["Hits"], bazel_layout.get("Errors", 0)) == (4, 0), bazel_layout
        other = await build("fourth", f"http://ccache:s3cret@{address}/other-team")
        assert other["Hits"] == 0  # namespaces are apart
        refused = await build("fifth", f"http://ccache:wrong@{address}/team")
        assert refused["Hits"] == 0 and refused.get("Errors", 0) > 0  # 401, and the compile still works
