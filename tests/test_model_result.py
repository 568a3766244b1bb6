"""Action results and execute outcomes as typed values: the wire shape, byte for byte, and its checks."""

from __future__ import annotations

import time
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

import triode
from triode.errors import InvalidArgument, InvalidPath
from triode.model.action import Action
from triode.model.digest import EMPTY, Digest
from triode.model.result import (
    EMPTY_CAPTURE,
    ActionResult,
    CapturedStream,
    ExecuteOutcome,
    ExecuteRequest,
    OutputDirectory,
    OutputFile,
    OutputSymlink,
    Timings,
)

X, Y = Digest.of(b"x"), Digest.of(b"y")


def _pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _old_executor_dict(stdout: Digest, out: Digest, executed_at: float) -> dict:
    """A result exactly as ``Executor._run`` built it while results were dicts."""
    return {
        "exit_code": 0,
        "signal": None,
        "timed_out": False,
        "stdout": {"digest": stdout.to_wire(), "truncated": False},
        "stderr": {"digest": EMPTY.to_wire(), "truncated": False},
        "output_files": [{"path": "out/a.o", "digest": out.to_wire(), "executable": True}],
        "output_symlinks": [{"path": "out/link", "target": "a.o"}],
        "output_directories": [{"path": "out"}, {"path": "out/empty"}],
        "missing_outputs": ["out/b.o"],
        "timings": {"queued": 0.0, "staging": 0.1, "running": 1.5, "uploading": 0.2},
        "node": "node-1",
        "executed_at": executed_at,
    }


def _typed(stdout: Digest, out: Digest, executed_at: float) -> ActionResult:
    """The same result as the executor builds it now."""
    return ActionResult(
        0, None, False, CapturedStream(stdout), EMPTY_CAPTURE,
        (OutputFile("out/a.o", out, True),),
        (OutputSymlink("out/link", "a.o"),),
        (OutputDirectory("out"), OutputDirectory("out/empty")),
        ("out/b.o",),
        Timings(0.0, 0.1, 1.5, 0.2),
        "node-1",
        executed_at,
    )


# -- the wire shape, byte for byte --------------------------------------------------------


def test_a_result_encodes_to_the_same_bytes_as_the_old_dict() -> None:
    now = time.time()
    old = _old_executor_dict(X, Y, now)
    typed = _typed(X, Y, now)
    assert typed.to_wire() == old
    assert _pack(typed.to_wire()) == _pack(old)
    assert ActionResult.from_wire(old) == typed
    assert _pack(ActionResult.from_wire(msgpack.unpackb(_pack(old))).to_wire()) == _pack(old)


@pytest.mark.parametrize(
    "old",
    [
        # What a `true` gives: no outputs, nothing printed.
        {"exit_code": 0, "signal": None, "timed_out": False,
         "stdout": {"digest": EMPTY.to_wire(), "truncated": False},
         "stderr": {"digest": EMPTY.to_wire(), "truncated": False},
         "output_files": [], "output_symlinks": [], "output_directories": [], "missing_outputs": [],
         "timings": {"queued": 0.25, "staging": 0.001, "running": 0.002, "uploading": 0.0003},
         "node": "n", "executed_at": 1_700_000_000.5},
        # Timed out, killed, its stdout cut at the cap.
        {"exit_code": 137, "signal": 9, "timed_out": True,
         "stdout": {"digest": X.to_wire(), "truncated": True},
         "stderr": {"digest": Y.to_wire(), "truncated": False},
         "output_files": [{"path": "a", "digest": X.to_wire(), "executable": False},
                          {"path": "b/c", "digest": X.to_wire(), "executable": True}],
         "output_symlinks": [], "output_directories": [{"path": "b"}], "missing_outputs": ["d", "e/f"],
         "timings": {"queued": 0.0, "staging": 0.0, "running": 5.0, "uploading": 0.0},
         "node": "node-ünïcode", "executed_at": 0.0},
    ],
    ids=["trivial", "timed-out"],
)
def test_fixed_examples_keep_their_bytes(old: dict) -> None:
    result = ActionResult.from_wire(old)
    assert _pack(result.to_wire()) == _pack(old)
    outcome = ExecuteOutcome(Digest.of(b"action"), False, result)
    old_outcome = {"action_digest": Digest.of(b"action").to_wire(), "cached": False, "result": old}
    assert _pack(outcome.to_wire()) == _pack(old_outcome)
    assert ExecuteOutcome.from_wire(old_outcome) == outcome


def test_absent_fields_get_defaults_and_are_written_out_in_full() -> None:
    result = ActionResult.from_wire({"exit_code": 3})
    assert result == ActionResult(3)
    assert result.stdout == result.stderr == CapturedStream(EMPTY, False)
    assert result.output_files == () and result.timings == Timings()
    assert result.to_wire() == {
        "exit_code": 3, "signal": None, "timed_out": False,
        "stdout": {"digest": EMPTY.to_wire(), "truncated": False},
        "stderr": {"digest": EMPTY.to_wire(), "truncated": False},
        "output_files": [], "output_symlinks": [], "output_directories": [], "missing_outputs": [],
        "timings": {"queued": 0.0, "staging": 0.0, "running": 0.0, "uploading": 0.0},
        "node": "", "executed_at": 0.0,
    }
    # Whole seconds as ints are read as floats (and so written back as floats).
    assert ActionResult.from_wire({"exit_code": 0, "executed_at": 7}).executed_at == 7.0


def test_blobs_are_stdout_stderr_and_every_file_once() -> None:
    result = _typed(X, Y, 0.0)
    assert result.blobs() == [X, EMPTY, Y]
    assert ActionResult(0, stdout=CapturedStream(X), output_files=(OutputFile("a", X),)).blobs() == [X, EMPTY]
    assert result.output_count == 4


def test_the_types_are_public_and_immutable() -> None:
    assert triode.ActionResult is ActionResult and triode.ExecuteOutcome is ExecuteOutcome
    assert triode.OutputFile is OutputFile and triode.OutputDirectory is OutputDirectory
    assert triode.OutputSymlink is OutputSymlink
    result = ActionResult(0)
    with pytest.raises(AttributeError):
        result.exit_code = 1  # type: ignore[misc]
    assert hash(result) == hash(ActionResult(0))


# -- round trips --------------------------------------------------------------------------

_digests = st.builds(Digest, st.text("0123456789abcdef", min_size=64, max_size=64), st.integers(0, 2**40))
_names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\0"), min_size=1,
                 max_size=8).filter(lambda s: s not in (".", ".."))
_paths = st.lists(_names, min_size=1, max_size=4).map("/".join)
_seconds = st.floats(0, 1e10, allow_nan=False, allow_infinity=False)
_results = st.builds(
    ActionResult,
    exit_code=st.integers(-(2**31), 2**31),
    signal=st.none() | st.integers(1, 64),
    timed_out=st.booleans(),
    stdout=st.builds(CapturedStream, _digests, st.booleans()),
    stderr=st.just(EMPTY_CAPTURE) | st.builds(CapturedStream, _digests, st.booleans()),
    output_files=st.lists(st.builds(OutputFile, _paths, _digests, st.booleans()), max_size=5).map(tuple),
    output_symlinks=st.lists(
        st.builds(OutputSymlink, _paths, _paths),  # a target inside the root (absolute ones are refused)
        max_size=3,
    ).map(tuple),
    output_directories=st.lists(st.builds(OutputDirectory, _paths), max_size=3).map(tuple),
    missing_outputs=st.lists(_paths, max_size=3).map(tuple),
    timings=st.builds(Timings, _seconds, _seconds, _seconds, _seconds),
    node=st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
    executed_at=_seconds,
)


@given(_results)
def test_from_wire_of_to_wire_is_the_same_result(result: ActionResult) -> None:
    assert ActionResult.from_wire(result.to_wire()) == result
    # And through msgpack, as over the wire and on disk: the same bytes again.
    raw = _pack(result.to_wire())
    again = ActionResult.from_wire(msgpack.unpackb(raw, raw=False))
    assert again == result and _pack(again.to_wire()) == raw


@given(_results, _digests, st.booleans())
def test_outcomes_round_trip(result: ActionResult, digest: Digest, cached: bool) -> None:
    outcome = ExecuteOutcome(digest, cached, result)
    assert ExecuteOutcome.from_wire(outcome.to_wire()) == outcome
    # The scheduler's execute answers with the operation's name too.
    named = ExecuteOutcome.from_wire({**outcome.to_wire(), "operation": "n/00000001"})
    assert named == replace(outcome, operation="n/00000001")
    assert named.to_wire() == {**outcome.to_wire(), "operation": "n/00000001"}
    assert outcome.exit_code == result.exit_code and outcome.timed_out == result.timed_out


# -- checks (moved from tests/storage/test_ac.py) -----------------------------------------


def test_a_bad_field_is_named() -> None:
    good = _old_executor_dict(X, Y, 1.0)
    bad_cases = {
        "exit_code": {**good, "exit_code": "0"},
        "signal": {**good, "signal": 9.0},
        "stdout.digest": {**good, "stdout": {"digest": ["nothex", 1]}},
        "stderr.truncated": {**good, "stderr": {"digest": EMPTY.to_wire(), "truncated": "no"}},
        "output_files[0].path": {
            **good, "output_files": [{"path": "../etc", "digest": good["stdout"]["digest"]}]
        },
        "output_files[0].digest": {**good, "output_files": [{"path": "a"}]},
        "output_symlinks[0].target": {**good, "output_symlinks": [{"path": "a", "target": ""}]},
        "output_directories[0].path": {**good, "output_directories": [{"path": "a//b"}]},
        "output_directories": {**good, "output_directories": {"path": "a"}},
        "timings.running": {**good, "timings": {"running": -1}},
        "timings.staging": {**good, "timings": {"staging": float("nan")}},
        "timed_out": {**good, "timed_out": 1},
        "missing_outputs[0]": {**good, "missing_outputs": ["/abs"]},
        "node": {**good, "node": 7},
        "executed_at": {**good, "executed_at": float("inf")},
        "result": [1, 2],
    }
    for field, value in bad_cases.items():
        with pytest.raises(InvalidArgument) as info:
            ActionResult.from_wire(value)
        assert field in str(info.value), (field, str(info.value))
        assert info.value.details["field"] == field
        # On the wire these are INVALID_ARGUMENT (docs/protocol.md, "ac.update"), not a subclass's code.
        assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgument, match="'exit_code' is required"):
        ActionResult.from_wire({"signal": None})
    with pytest.raises(InvalidArgument, match="unknown keys") as info:
        ActionResult.from_wire({**good, "extra": 1})
    assert info.value.details["field"] == "result"
    with pytest.raises(InvalidArgument, match="unknown keys"):
        ActionResult.from_wire({**good, "stdout": {"digest": X.to_wire(), "size": 1}})


def test_a_bad_outcome_is_refused() -> None:
    good = ExecuteOutcome(X, False, ActionResult(0)).to_wire()
    with pytest.raises(InvalidArgument, match="action_digest, cached, result"):
        ExecuteOutcome.from_wire({"cached": False, "result": good["result"]})
    with pytest.raises(InvalidArgument, match="cached"):
        ExecuteOutcome.from_wire({**good, "cached": 1})
    with pytest.raises(InvalidArgument, match="digest"):
        ExecuteOutcome.from_wire({**good, "action_digest": "x"})
    with pytest.raises(InvalidArgument, match="exit_code"):
        ExecuteOutcome.from_wire({**good, "result": {}})


# -- execute requests ---------------------------------------------------------------------


def test_an_execute_request_is_parsed_once_per_method() -> None:
    action = Action(("true",), env={"A": "1"})
    wire = action.to_wire()
    request = ExecuteRequest.from_wire({"action": wire, "skip_cache": True, "priority": 5})
    assert request == ExecuteRequest(action, skip_cache=True, priority=5)
    assert request.action_wire is wire  # forwarded as it came
    assert ExecuteRequest.from_wire({"action": wire}) == ExecuteRequest(action)
    forwarded = ExecuteRequest.from_wire({"action": wire, "origin": "n1"}, method="sched.forward")
    assert forwarded.origin == "n1"
    with pytest.raises(InvalidArgument, match="engine.execute got unknown arguments: priority"):
        ExecuteRequest.from_wire({"action": wire, "priority": 1}, method="engine.execute")
    with pytest.raises(InvalidArgument, match="unknown arguments: origin"):
        ExecuteRequest.from_wire({"action": wire, "origin": "n1"}, method="sched.submit")
    with pytest.raises(InvalidArgument, match="unknown arguments: bogus"):
        ExecuteRequest.from_wire({"action": wire, "bogus": 1})
    with pytest.raises(InvalidArgument, match="priority"):
        ExecuteRequest.from_wire({"action": wire, "priority": 10**6})
    with pytest.raises(InvalidArgument, match="skip_cache"):
        ExecuteRequest.from_wire({"action": wire, "skip_cache": "yes"})
    with pytest.raises(InvalidArgument, match=r"execute takes \{action"):
        ExecuteRequest.from_wire([wire])
    with pytest.raises(InvalidPath):
        ExecuteRequest.from_wire({"action": {"argv": ["true"], "outputs": ["../x"]}})
