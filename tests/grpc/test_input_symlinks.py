"""Input symlinks of a Triode action (what an REAPI input tree may hold): checked, part of the
digest only when present, and staged as links."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from triode.engine.staging import stage_inputs
from triode.errors import InvalidPath
from triode.model.action import ACTION_VERSION, Action, Input
from triode.model.digest import Digest
from triode.storage.disk import DiskCAS


def _action(**extra: object) -> Action:
    return Action(
        ("cat", "a/link"),
        env={"PATH": "/bin"},
        inputs={"a/file": Input(Digest.of(b"data"), True)},
        directories=("empty",),
        outputs=("out",),
        timeout=5.0,
        **extra,
    )  # type: ignore[arg-type]


def test_without_symlinks_the_encoding_and_digest_are_what_they_were() -> None:
    action = _action()
    before = msgpack.packb(
        [
            ACTION_VERSION,
            ["cat", "a/link"],
            [["PATH", "/bin"]],
            "",
            [["a/file", Digest.of(b"data").hash, 4, True]],
            ["empty"],
            ["out"],
            5.0,
            [],
            False,
        ],
        use_bin_type=True,
        use_single_float=False,
    )
    assert action.canonical() == before
    assert action.digest() == Digest.of(before)
    assert "symlinks" not in action.to_wire()


def test_symlinks_are_part_of_the_action() -> None:
    plain = _action()
    linked = _action(symlinks={"a/link": "file"})
    other = _action(symlinks={"a/link": "../empty"})
    assert len({plain.digest(), linked.digest(), other.digest()}) == 3
    assert Action.from_wire(linked.to_wire()) == linked
    assert Action.from_wire(linked.to_wire()).digest() == linked.digest()


@pytest.mark.parametrize(
    "links",
    [
        {"a/link": "/etc/passwd"},  # absolute
        {"a/link": "../../outside"},  # climbs out of the root
        {"a/file": "other"},  # also a file
        {"a": "elsewhere"},  # also a directory (a/file is below it)
        {"a/link/below": "x", "a/link": "y"},  # a link with a path below it
        {"../up": "x"},  # not a relative path
        {"a/link": ""},  # no target
    ],
)
def test_bad_symlinks_are_refused(links: dict[str, str]) -> None:
    with pytest.raises(InvalidPath):
        _action(symlinks=links)


async def test_staging_makes_the_links(tmp_path: Path) -> None:
    cas = DiskCAS(tmp_path / "cas")
    try:
        await cas.put(b"data")
        action = _action(symlinks={"a/link": "file", "deep/er/up": "../../a"})
        root = tmp_path / "root"
        root.mkdir()
        await stage_inputs(root, action, cas)
        assert os.readlink(root / "a/link") == "file"
        assert (root / "a/link").read_bytes() == b"data"
        assert os.readlink(root / "deep/er/up") == "../../a"
        assert (root / "empty").is_dir()
    finally:
        await cas.aclose()
