"""Writing a result's outputs back: nothing a result names may land outside the destination."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from triode.client.actions import write_outputs
from triode.errors import InvalidPath
from triode.model.digest import Digest
from triode.model.result import ActionResult
from triode.storage.memory import MemoryCAS


def _listing(root: Path) -> list[str]:
    """Every path under ``root`` (symlinks not followed), relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def _result(**outputs: list[dict]) -> ActionResult:
    """A result as a node sends it (a node, or a peer, the client need not trust)."""
    return ActionResult.from_wire({"exit_code": 0, **outputs})


@pytest.mark.parametrize(
    "path, target",
    [
        ("link", "/etc"),  # absolute
        ("link", "../.."),  # climbs out of dest
        ("out/link", "../../escape"),  # climbs out from a subdirectory
        ("out/deeper/link", "../../x/../../../etc/passwd"),  # out, however it winds
    ],
)
async def test_a_symlink_leading_out_of_dest_is_refused(tmp_path: Path, path: str, target: str) -> None:
    dest = tmp_path / "a" / "dest"
    dest.mkdir(parents=True)
    before = _listing(tmp_path)
    with pytest.raises(InvalidPath) as info:
        await write_outputs(MemoryCAS(), _result(output_symlinks=[{"path": path, "target": target}]), dest)
    assert info.value.details.get("path") == path
    assert not (dest / path).is_symlink()  # the link was not made
    assert _listing(tmp_path) == before  # nothing at all was written, outside dest or in it


async def test_symlinks_and_files_that_stay_inside_are_written(tmp_path: Path) -> None:
    """The other side of the test above: the refusal is not of every link."""
    cas = MemoryCAS()
    digest = await cas.put(b"data")
    assert digest == Digest.of(b"data")
    result = _result(
        output_files=[{"path": "out/file.txt", "digest": digest.to_wire()}],
        output_symlinks=[{"path": "out/sub/link", "target": "../file.txt"}, {"path": "top", "target": "out"}],
    )
    written = await write_outputs(cas, result, tmp_path)
    assert written == ["out/file.txt", "out/sub/link", "top"]
    assert os.readlink(tmp_path / "out" / "sub" / "link") == "../file.txt"
    assert (tmp_path / "out" / "sub" / "link").read_bytes() == b"data"
    assert os.readlink(tmp_path / "top") == "out"
