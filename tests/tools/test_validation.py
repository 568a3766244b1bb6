"""What a tool call may ask for is checked before any process starts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from triode.errors import InvalidArgument, InvalidPath, RuntimeMissing, TooLarge
from triode.tools.runtimes import find_runtime
from triode.tools.validation import (
    encode_input,
    validate_entrypoint,
    validate_env,
    validate_timeout,
    validate_tool_id,
)

JS = Path(__file__).with_name("fixtures") / "tools.mjs"


@pytest.mark.parametrize("tool", ["echo", "_private", "$dollar", "camelCase2", "a" * 128])
def test_good_tool_ids(tool: str) -> None:
    assert validate_tool_id(tool) == tool


@pytest.mark.parametrize("tool", ["", "2fast", "has space", "dot.ted", "a" * 129, "semi;colon", None, 5, "é"])
def test_bad_tool_ids(tool: object) -> None:
    with pytest.raises(InvalidArgument, match="tool id"):
        validate_tool_id(tool)


def test_good_env() -> None:
    assert validate_env({"API_KEY": "x=y", "N2": ""}) == {"API_KEY": "x=y", "N2": ""}
    assert validate_env(None) == {}


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ({"lower": "x"}, "not valid"),
        ({"A-B": "x"}, "not valid"),
        ({"": "x"}, "not valid"),
        ({"A": "line\nbreak"}, "CR, LF or NUL"),
        ({"A": "carriage\rreturn"}, "CR, LF or NUL"),
        ({"A": "nul\0"}, "CR, LF or NUL"),
        ({"A": 5}, "must be a string"),
        ({"LD_PRELOAD": "/tmp/evil.so"}, "not allowed"),
        ({"LD_LIBRARY_PATH": "/tmp"}, "not allowed"),
        ({"NODE_OPTIONS": "--require /tmp/x.js"}, "not allowed"),
        ({"BUN_CONFIG_REGISTRY": "x"}, "not allowed"),
        ({"DYLD_INSERT_LIBRARIES": "x"}, "not allowed"),
        ({"BASH_ENV": "x"}, "not allowed"),
        ({"TRIODE_BUN": "x"}, "not allowed"),
    ],
)
def test_bad_env(env: dict, why: str) -> None:
    with pytest.raises(InvalidArgument, match=why):
        validate_env(env)


def test_entrypoints(tmp_path: Path) -> None:
    assert validate_entrypoint(str(JS)) == JS.resolve()
    with pytest.raises(InvalidPath, match="absolute"):
        validate_entrypoint("tests/tools/fixtures/tools.mjs")
    with pytest.raises(InvalidPath, match="does not exist"):
        validate_entrypoint(str(tmp_path / "missing.js"))
    with pytest.raises(InvalidPath, match="must end in"):
        validate_entrypoint(str(tmp_path))
    (tmp_path / "dir.js").mkdir()
    with pytest.raises(InvalidPath, match="not a regular file"):
        validate_entrypoint(str(tmp_path / "dir.js"))


@pytest.mark.parametrize("timeout", [0, -1, math.nan, "5", True])
def test_bad_timeouts(timeout: object) -> None:
    with pytest.raises(InvalidArgument, match="timeout"):
        validate_timeout(timeout)


def test_input_must_be_json_and_bounded() -> None:
    assert encode_input({"a": [1, "é"]}, 100) == '{"a":[1,"é"]}'.encode()
    with pytest.raises(InvalidArgument, match="JSON"):
        encode_input({"a": b"bytes"}, 100)
    with pytest.raises(InvalidArgument, match="JSON"):
        encode_input(math.inf, 100)
    with pytest.raises(TooLarge):
        encode_input("x" * 200, 100)


def test_missing_runtime_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRIODE_BUN", str(tmp_path / "no-bun-here"))
    with pytest.raises(RuntimeMissing, match="npm registry's bun package") as info:
        find_runtime("bun")
    assert info.value.details["runtime"] == "bun"
    monkeypatch.setenv("TRIODE_NODE", str(tmp_path / "no-node-here"))
    with pytest.raises(RuntimeMissing, match="Node.js 20"):
        find_runtime("node")
