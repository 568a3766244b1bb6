"""Parsing actions from the wire: validation, the digest, and the memo of recent parses."""

from __future__ import annotations

import pytest

from triode.errors import InvalidArgument, InvalidPath
from triode.model import action as action_module
from triode.model.action import PARSED_ACTIONS, Action, Input, parse_wire_action
from triode.model.digest import Digest


def _wire(**fields: object) -> dict:
    base = Action(("cc", "-c", "a.c"), env={"PATH": "/bin"}, inputs={"src/a.c": Input(Digest.of(b"int x;"))},
                  outputs=("a.o",))
    return {**base.to_wire(), **fields}


def test_a_parse_is_the_same_action_with_the_same_digest() -> None:
    wire = _wire()
    first = parse_wire_action(wire)
    again = parse_wire_action(_wire())  # an equal value, not the same object
    assert again is first
    assert first == Action.from_wire(wire)
    assert first.digest() == Action.from_wire(wire).digest()


def test_any_difference_is_another_action() -> None:
    one = parse_wire_action(_wire())
    assert parse_wire_action(_wire(env={"PATH": "/usr/bin"})).digest() != one.digest()
    assert parse_wire_action(_wire(timeout=1.0)).digest() != one.digest()
    assert parse_wire_action(_wire(do_not_cache=True)).digest() != one.digest()


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"argv": []}, InvalidArgument),
        ({"outputs": ["../x"]}, InvalidPath),
        ({"inputs": [["/etc/passwd", Digest.of(b"").to_wire(), False]]}, InvalidPath),
        ({"surprise": 1}, InvalidArgument),
        ({"env": {"A": object()}}, InvalidArgument),  # not even msgpack data
    ],
)
def test_bad_actions_are_refused_every_time(fields: dict, error: type[Exception]) -> None:
    for _ in range(2):  # a refusal is never remembered as a parse
        with pytest.raises(error):
            parse_wire_action(_wire(**fields))


def test_the_memo_is_bounded() -> None:
    for i in range(PARSED_ACTIONS * 2):
        parse_wire_action(_wire(env={"N": str(i)}))
    assert len(action_module._parsed) <= PARSED_ACTIONS
    big = _wire(env={f"V{i}": "x" * 100 for i in range(400)})  # over PARSED_MAX_BYTES encoded
    before = dict(action_module._parsed)
    assert parse_wire_action(big) == Action.from_wire(big)
    assert action_module._parsed.keys() == before.keys()
