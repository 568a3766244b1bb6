"""A Bazel workspace for the benchmarks of the cache doors (HTTP and gRPC): C libraries
with generated headers linked into one binary, built offline with Bazel 4 (Debian's
bazel-bootstrap) through stand-in @rules_cc and @rules_java repositories. No workloads here.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from pathlib import Path

_CC_RULES = ("cc_binary", "cc_library", "cc_test", "cc_import", "cc_proto_library", "cc_toolchain",
             "cc_toolchain_suite", "fdo_profile", "fdo_prefetch_hints", "objc_library", "objc_import")
_JAVA_RULES = ("java_binary", "java_import", "java_library", "java_plugin", "java_test", "java_runtime",
               "java_toolchain", "java_package_configuration", "java_proto_library",
               "java_lite_proto_library")
_SUMMARY = re.compile(r"INFO: \d+ process(?:es)?: (.*)\.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stub(root: Path, name: str, sub: str, rules: tuple[str, ...]) -> Path:
    """A local @rules_cc / @rules_java re-exporting the native rules (Bazel 4 offline)."""
    repo = root / name
    (repo / sub).mkdir(parents=True)
    (repo / "BUILD").write_text("")
    (repo / "WORKSPACE").write_text(f'workspace(name = "{name}")\n')
    (repo / sub / "BUILD").write_text('exports_files(["defs.bzl"])\n')
    (repo / sub / "defs.bzl").write_text("".join(f"def {r}(**kw): native.{r}(**kw)\n" for r in rules))
    return repo


def workspace(root: Path, units: int) -> Path:
    """``units`` C libraries (each with a generated header) linked into one binary."""
    ws = root / "ws"
    ws.mkdir(parents=True)
    cc = _stub(root / "stubs", "rules_cc", "cc", _CC_RULES)
    java = _stub(root / "stubs", "rules_java", "java", _JAVA_RULES)
    (ws / "WORKSPACE").write_text("")
    build = []
    for i in range(units):
        build.append(f'genrule(name = "gen{i}", outs = ["gen{i}.h"], '
                     f'cmd = "echo \'#define K{i} {i}\' > $@")\n'
                     f'cc_library(name = "u{i}", srcs = ["u{i}.c"], hdrs = ["gen{i}.h"])\n')
        body = "\n".join(f"static int f{i}_{j}(int x) {{ return x * {j} + K{i}; }}" for j in range(40))
        calls = " + ".join(f"f{i}_{j}(x)" for j in range(40))
        (ws / f"u{i}.c").write_text(f'#include "gen{i}.h"\n{body}\nint u{i}(int x) {{ return {calls}; }}\n')
    decls = "".join(f"int u{i}(int);\n" for i in range(units))
    total = " + ".join(f"u{i}(1)" for i in range(units))
    main = f'#include <stdio.h>\n{decls}int main(void) {{ printf("%d\\n", {total}); }}\n'
    (ws / "main.c").write_text(main)
    deps = ", ".join(f'":u{i}"' for i in range(units))
    build.append(f'cc_binary(name = "app", srcs = ["main.c"], deps = [{deps}])\n')
    (ws / "BUILD").write_text("".join(build))
    (ws / ".bazelrc").write_text(
        f"startup --output_user_root={root / 'bazel-root'}\nstartup --max_idle_secs=600\n"
        f"build --override_repository=rules_cc={cc}\nbuild --override_repository=rules_java={java}\n"
        "build --spawn_strategy=processwrapper-sandbox\nbuild --color=no --curses=no\n"
    )
    return ws


def run_bazel(bazel: str, ws: Path, *args: str) -> str:
    done = subprocess.run([bazel, "--nohome_rc", *args], cwd=ws, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HOME": str(ws.parent / "home")})
    if done.returncode != 0:
        raise RuntimeError(f"bazel {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stderr


def clean_build(bazel: str, ws: Path, *flags: str, expect: str, forbid: str = "") -> float:
    """Seconds of ``bazel build`` after ``bazel clean``; checks where the actions ran."""
    run_bazel(bazel, ws, "clean")
    start = time.perf_counter()
    out = run_bazel(bazel, ws, "build", "//:app", *flags)
    elapsed = time.perf_counter() - start
    match = _SUMMARY.search(out)
    if match is None or expect not in match.group(1) or (forbid and forbid in match.group(1)):
        raise RuntimeError(f"expected {expect!r} (and no {forbid!r}) in Bazel's summary, got: "
                           f"{match and match.group(0)}")
    return elapsed
