"""``triode run`` as a user runs it: a real subprocess, an embedded node over $TRIODE_HOME."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from triode.engine.runner import DEFAULT_GRACE

from .test_runner import _procs_with, _unique_sleep


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


def triode_run(cwd: Path, home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "TRIODE_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "triode", "run", *args], cwd=cwd, env=env, capture_output=True, timeout=timeout
    )


def test_run_twice_second_is_a_cache_hit_and_outputs_come_back(cwd: Path, home: Path, tmp_path: Path) -> None:
    (cwd / "words.txt").write_text("b\na\nc\n")
    counter = tmp_path / "runs"
    cmd = ["--input", "words.txt", "--output", "out/sorted.txt", "--result-json", "r.json", "--",
           "sh", "-c", f"echo ran >> {counter}; mkdir -p out; sort words.txt > out/sorted.txt; echo sorted"]
    first = triode_run(cwd, home, *cmd)
    assert first.returncode == 0, first.stderr
    assert first.stdout == b"sorted\n"
    assert (cwd / "out" / "sorted.txt").read_text() == "a\nb\nc\n"
    r1 = json.loads((cwd / "r.json").read_text())
    assert r1["cached"] is False and r1["exit_code"] == 0 and r1["timed_out"] is False
    assert {"action_digest", "node", "timings", "outputs"} <= set(r1)
    (cwd / "out" / "sorted.txt").unlink()
    second = triode_run(cwd, home, *cmd)
    assert second.returncode == 0 and second.stdout == b"sorted\n"
    r2 = json.loads((cwd / "r.json").read_text())
    assert r2["cached"] is True and r2["action_digest"] == r1["action_digest"]
    assert (cwd / "out" / "sorted.txt").read_text() == "a\nb\nc\n"
    assert counter.read_text() == "ran\n"  # the hit ran nothing
    # A changed input is a different action, and it runs.
    (cwd / "words.txt").write_text("z\ny\n")
    third = triode_run(cwd, home, *cmd)
    assert third.returncode == 0
    r3 = json.loads((cwd / "r.json").read_text())
    assert r3["cached"] is False and r3["action_digest"] != r1["action_digest"]
    assert (cwd / "out" / "sorted.txt").read_text() == "y\nz\n"


def test_exit_code_stderr_and_failures_not_cached(cwd: Path, home: Path) -> None:
    cmd = ["--result-json", "r.json", "--", "sh", "-c", "echo oops >&2; exit 7"]
    first = triode_run(cwd, home, *cmd)
    assert first.returncode == 7 and first.stderr.startswith(b"oops\n")
    second = triode_run(cwd, home, *cmd)
    assert second.returncode == 7
    assert json.loads((cwd / "r.json").read_text())["cached"] is False


def test_tree_of_sleepers_ignoring_sigterm_times_out_with_124(cwd: Path, home: Path) -> None:
    marker = _unique_sleep()  # in every sleeper's own command line
    script = f"trap '' TERM; for i in 1 2 3; do sh -c 'trap \"\" TERM; sleep {marker}' & done; wait"
    done = triode_run(cwd, home, "--timeout", "1", "--result-json", "r.json", "--", "sh", "-c", script)
    assert done.returncode == 124, done.stderr
    result = json.loads((cwd / "r.json").read_text())
    assert result["timed_out"] is True and result["cached"] is False
    # The node measured the run: start to the last process reaped, within timeout + grace + 1 s.
    assert result["timings"]["running"] <= 1 + DEFAULT_GRACE + 1
    assert _procs_with(marker) == []


def test_non_utf8_output_passes_through(cwd: Path, home: Path) -> None:
    done = triode_run(cwd, home, "--", "printf", "\\377\\376\\000\\n")
    assert done.returncode == 0 and done.stdout == b"\xff\xfe\x00\n"


@pytest.mark.parametrize("flag, path", [("--input", "../outside"), ("--input", "/etc/passwd"),
                                        ("--output", "../x"), ("--output", "/tmp/x"), ("--input", "link")])
def test_paths_escaping_the_directory_are_refused(cwd: Path, home: Path, flag: str, path: str) -> None:
    (cwd.parent / "outside").write_text("secret")
    (cwd / "link").symlink_to("/etc/passwd")
    done = triode_run(cwd, home, flag, path, "--", "true")
    assert done.returncode == 125  # triode's own refusal, never confused with the command's exit code
    assert path.encode() in done.stderr


def test_env_is_clean_and_set_by_flags(cwd: Path, home: Path) -> None:
    env_secret = "TRIODE_TEST_SECRET_FOR_RUN"
    os.environ[env_secret] = "nope"
    try:
        done = triode_run(cwd, home, "--env", "A=1", "--", "env")
    finally:
        del os.environ[env_secret]
    seen = sorted(done.stdout.decode().splitlines())
    # The isolated action also sees PWD, its working directory, as any shell would set it.
    others = [line for line in seen if not line.startswith("PWD=")]
    assert others == ["A=1", "PATH=/usr/local/bin:/usr/bin:/bin"]
    assert all(line.startswith(f"PWD={home}/work/") for line in seen if line.startswith("PWD="))


def test_readme_example_compile_twice_second_is_a_hit(cwd: Path, home: Path) -> None:
    import shutil

    if shutil.which("cc") is None:
        pytest.skip("no C compiler here")
    (cwd / "hello.c").write_text('#include <stdio.h>\nint main(void){puts("hello");return 0;}\n')
    cmd = ["--input", "hello.c", "--output", "hello", "--result-json", "r.json", "--",
           "cc", "-O2", "-o", "hello", "hello.c"]
    assert triode_run(cwd, home, *cmd).returncode == 0
    assert json.loads((cwd / "r.json").read_text())["cached"] is False
    (cwd / "hello").unlink()
    assert triode_run(cwd, home, *cmd).returncode == 0
    assert json.loads((cwd / "r.json").read_text())["cached"] is True
    assert subprocess.run([str(cwd / "hello")], capture_output=True).stdout == b"hello\n"


def test_remote_node_inputs_up_outputs_back(cwd: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TRIODE_HOME": str(tmp_path / "unused")}
    node = subprocess.Popen(
        [sys.executable, "-m", "triode", "node", "--listen", "127.0.0.1:0", "--data", str(tmp_path / "node")],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
    )
    try:
        assert node.stderr is not None
        line = node.stderr.readline().decode()
        assert line.startswith("listening on "), line
        address = line.split()[-1]
        (cwd / "src" / "deep").mkdir(parents=True)
        (cwd / "src" / "deep" / "a.txt").write_text("A")
        script = ("mkdir -p out/empty out/sub && cp src/deep/a.txt out/sub/copy.txt && "
                  "ln -s sub/copy.txt out/link && printf x > out/sub/run.sh && chmod +x out/sub/run.sh")
        done = triode_run(cwd, tmp_path / "unused", "--remote", address, "--input", "src",
                          "--output", "out", "--", "sh", "-c", script)
        assert done.returncode == 0, done.stderr
        assert (cwd / "out" / "sub" / "copy.txt").read_text() == "A"
        assert os.readlink(cwd / "out" / "link") == "sub/copy.txt"
        assert (cwd / "out" / "empty").is_dir()
        assert os.access(cwd / "out" / "sub" / "run.sh", os.X_OK)
    finally:
        node.terminate()
        node.wait(30)
