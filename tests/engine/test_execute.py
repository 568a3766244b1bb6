"""Executing actions: staging, outputs, the action cache, and paths that try to get out."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from triode.errors import InvalidPath, MissingInputs
from triode.model.action import Action, Input
from triode.model.digest import Digest
from triode.model.result import ActionResult, OutputSymlink

from .conftest import Rig

SH = "/bin/sh"


def sh(script: str, **fields: object) -> Action:
    return Action(argv=(SH, "-c", script), env={"PATH": "/usr/bin:/bin"}, **fields)  # type: ignore[arg-type]


async def test_inputs_in_outputs_out(rig: Rig) -> None:
    data = await rig.cas.put(b"hello\n")
    action = sh(
        "mkdir -p out/sub out/empty && tr a-z A-Z < src/a.txt > out/sub/b.txt && echo made && "
        "printf '#!/bin/sh\\n' > out/tool && chmod +x out/tool && ln -s sub/b.txt out/link",
        inputs={"src/a.txt": Input(data)},
        outputs=("out", "missing.txt"),
    )
    outcome = await rig.executor.lookup_or_run(action)
    r = outcome.result
    assert not outcome.cached and r.exit_code == 0 and r.signal is None and not r.timed_out
    assert await rig.cas.get(r.stdout.digest) == b"made\n"
    files = {f.path: f for f in r.output_files}
    assert set(files) == {"out/sub/b.txt", "out/tool"}
    assert await rig.cas.get(files["out/sub/b.txt"].digest) == b"HELLO\n"
    assert files["out/tool"].executable and not files["out/sub/b.txt"].executable
    assert r.output_symlinks == (OutputSymlink("out/link", "sub/b.txt"),)
    assert {d.path for d in r.output_directories} == {"out", "out/sub", "out/empty"}
    assert r.missing_outputs == ("missing.txt",)
    assert r.node == "node-test"
    assert r.timings.running > 0 and r.timings.queued == 0
    # What the executor built is what the wire and the action cache carry, field for field.
    assert ActionResult.from_wire(r.to_wire()) == r
    assert await rig.ac.get(action.digest()) == r  # (no write-behind task here: written at once)


async def test_same_action_twice_second_is_a_hit_that_runs_nothing(rig: Rig, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    action = sh(f"echo ran >> {counter}; echo result")
    first = await rig.executor.lookup_or_run(action)
    second = await rig.executor.lookup_or_run(action)
    assert not first.cached and second.cached
    assert second.result == first.result
    assert counter.read_text() == "ran\n"
    assert rig.executor.counters["executed"] == 1 and rig.executor.counters["cache_hits"] == 1
    # skip_cache runs it again.
    third = await rig.executor.lookup_or_run(action, skip_cache=True)
    assert not third.cached and counter.read_text() == "ran\nran\n"


@pytest.mark.parametrize(
    "fields",
    [{"script": "exit 1"}, {"script": "sleep 30", "timeout": 0.2}, {"script": "true", "do_not_cache": True}],
    ids=["failing", "timed-out", "do-not-cache"],
)
async def test_not_cached(rig: Rig, tmp_path: Path, fields: dict) -> None:
    counter = tmp_path / "runs"
    fields = dict(fields)
    action = sh(f"echo ran >> {counter}; {fields.pop('script')}", **fields)
    first = await rig.executor.lookup_or_run(action)
    second = await rig.executor.lookup_or_run(action)
    assert not first.cached and not second.cached
    assert counter.read_text() == "ran\nran\n"
    assert rig.executor.counters["cache_writes"] == 0
    if "timeout" in fields:
        assert first.timed_out and first.result.signal is not None


async def test_changed_input_changes_digest() -> None:
    a = Action(("cat", "x"), inputs={"x": Input(Digest.of(b"1"))})
    b = Action(("cat", "x"), inputs={"x": Input(Digest.of(b"2"))})
    c = Action(("cat", "x"), inputs={"x": Input(Digest.of(b"1"), True)})
    again = Action.from_wire(a.to_wire())
    assert len({a.digest(), b.digest(), c.digest()}) == 3
    assert again.digest() == a.digest()


async def test_missing_inputs_are_named(rig: Rig) -> None:
    absent = Digest.of(b"never uploaded")
    with pytest.raises(MissingInputs) as info:
        await rig.executor.lookup_or_run(Action(("true",), inputs={"a": Input(absent)}))
    assert info.value.details["missing"] == [str(absent)]


@pytest.mark.parametrize("bad", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a"])
async def test_escaping_input_and_output_paths_refused(bad: str) -> None:
    with pytest.raises(InvalidPath) as info:
        Action(("true",), inputs={bad: Input(Digest.of(b""))})
    assert bad in str(info.value)
    with pytest.raises(InvalidPath):
        Action(("true",), outputs=(bad,))
    with pytest.raises(InvalidPath):
        Action(("true",), cwd=bad)
    with pytest.raises(InvalidPath):
        Action.from_wire({"argv": ["true"], "inputs": [[bad, Digest.of(b"").to_wire(), False]]})


async def test_output_through_a_symlink_out_of_the_root_refused(rig: Rig) -> None:
    with pytest.raises(InvalidPath) as info:
        await rig.executor.lookup_or_run(sh("ln -s /etc escape", outputs=("escape/passwd",)))
    assert "escape/passwd" in str(info.value)


@pytest.mark.parametrize("target", ["/etc/passwd", "../../outside", "a/../../../x"])
async def test_output_symlink_pointing_out_refused(rig: Rig, target: str) -> None:
    with pytest.raises(InvalidPath) as info:
        await rig.executor.lookup_or_run(sh(f"mkdir -p d && ln -s {target} d/link", outputs=("d",)))
    assert "d/link" in str(info.value)


async def test_inputs_are_hard_linked_read_only_and_executables_get_a_copy(rig: Rig) -> None:
    plain = await rig.cas.put(b"plain data\n")
    script = await rig.cas.put(b"#!/bin/sh\necho from-script\n")
    stored = rig.cas.path_of(plain)
    assert stored is not None
    action = sh(
        "stat -c '%i %a' a.txt; stat -c '%i %a' tool.sh; ./tool.sh",
        inputs={"a.txt": Input(plain), "tool.sh": Input(script, True)},
    )
    r = (await rig.executor.lookup_or_run(action)).result
    lines = (await rig.cas.get(r.stdout.digest)).decode().splitlines()
    a_ino, a_mode = lines[0].split()
    t_ino, t_mode = lines[1].split()
    assert int(a_ino) == os.stat(stored).st_ino and a_mode == "444"
    script_path = rig.cas.path_of(script)
    assert script_path is not None
    assert int(t_ino) != os.stat(script_path).st_ino and t_mode == "555"
    assert lines[2] == "from-script"
    assert os.stat(script_path).st_mode & 0o777 == 0o444  # the shared inode was never chmodded


async def test_an_action_that_writes_through_its_hard_link_is_not_cached(rig: Rig) -> None:
    blob = await rig.cas.put(b"precious\n")
    # chmod first: the action owns its inputs' inode (root would not even need to).
    action = sh("chmod u+w a.txt && echo corrupted >> a.txt", inputs={"a.txt": Input(blob)})
    outcome = await rig.executor.lookup_or_run(action)
    assert outcome.exit_code == 0
    assert rig.executor.counters["cache_writes"] == 0 and rig.executor.counters["inputs_altered"] == 1
    assert rig.cas.path_of(blob) is None  # the damaged file is no longer served


async def test_copied_inputs_keep_the_store_intact(tmp_path: Path) -> None:
    from .conftest import make_rig

    rig = make_rig(tmp_path / "data", link_inputs="never")
    try:
        blob = await rig.cas.put(b"precious\n")
        action = sh("chmod u+w a.txt && echo corrupted >> a.txt", inputs={"a.txt": Input(blob)})
        assert (await rig.executor.lookup_or_run(action)).exit_code == 0
        assert rig.executor.counters["inputs_copied"] == 1 and rig.executor.counters["inputs_altered"] == 0
        assert await rig.cas.get(blob) == b"precious\n"
        assert rig.executor.counters["cache_writes"] == 1
    finally:
        rig.close()


async def test_by_default_even_root_cannot_write_to_a_linked_input(tmp_path: Path) -> None:
    from .conftest import make_rig

    rig = make_rig(tmp_path / "data", link_inputs="auto")
    try:
        blob = await rig.cas.put(b"precious\n")
        action = sh("echo corrupted >> a.txt", inputs={"a.txt": Input(blob)})
        outcome = await rig.executor.lookup_or_run(action)
        if rig.executor.counters["inputs_linked"] == 0:
            pytest.skip("this root node copies inputs (no setpriv)")
        assert outcome.exit_code != 0  # EACCES, for root too
        assert await rig.cas.get(blob) == b"precious\n"
    finally:
        rig.close()


async def test_non_utf8_output_and_cwd(rig: Rig) -> None:
    action = sh("pwd | grep -o 'deep/dir$'; printf '\\377\\376\\000'", cwd="deep/dir")
    r = (await rig.executor.lookup_or_run(action)).result
    out = await rig.cas.get(r.stdout.digest)
    assert out == b"deep/dir\n\xff\xfe\x00"


async def test_output_over_the_cap_is_truncated_and_stored(rig: Rig) -> None:
    # The rig caps at 1 MiB; 3 MiB goes out, the head is kept (spilled to the work dir).
    r = (await rig.executor.lookup_or_run(sh("head -c 3145728 /dev/zero; echo done >&2"))).result
    assert r.stdout.truncated and not r.stderr.truncated
    assert r.stdout.digest == Digest.of(bytes(1024 * 1024))


async def test_clean_environment(rig: Rig) -> None:
    os.environ["TRIODE_NODE_SECRET"] = "s3cret"
    try:
        r = (await rig.executor.lookup_or_run(Action(("/usr/bin/env",), env={"ONLY": "this"}))).result
    finally:
        del os.environ["TRIODE_NODE_SECRET"]
    seen = (await rig.cas.get(r.stdout.digest)).decode().splitlines()
    # Nothing of the node's; PWD (the working directory) only where an isolated action's
    # sandbox sets it, as a shell would.
    assert [line for line in seen if not line.startswith("PWD=")] == ["ONLY=this"]


async def test_work_dir_removed_even_when_the_action_locks_it_down(rig: Rig) -> None:
    await rig.executor.lookup_or_run(sh("mkdir -p a/b && touch a/b/f && chmod 000 a/b && chmod 500 a"))
    assert rig.workdirs.count() == 0


async def test_abandoned_work_dirs_of_a_dead_node_are_removed(tmp_path: Path) -> None:
    from triode.engine.workdir import WorkDirs

    base = tmp_path / "work"
    live = WorkDirs(base, "live")
    live.open()
    (live.root / "busy").mkdir()
    (base / "dead").mkdir()
    (base / "dead" / "left").mkdir()
    (base / "dead.lock").touch()
    other = WorkDirs(base, "other")
    other.open()
    assert not (base / "dead").exists() and (live.root / "busy").exists()
    other.close()
    live.close()
    assert sorted(os.listdir(base)) == []


async def test_a_result_too_large_for_a_frame_is_refused(rig: Rig) -> None:
    from triode.errors import OutputTooLarge

    deep = "/".join(["d" * 200] * 18)  # ~3.6 KB per path, ~1,200 files: over 4 MiB encoded
    script = f"mkdir -p out/{deep} && cd out/{deep} && for i in $(seq 1 1200); do : > f$i; done"
    with pytest.raises(OutputTooLarge):
        await rig.executor.lookup_or_run(sh(script, outputs=("out",)))
