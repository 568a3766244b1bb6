"""docs/protocol.md must describe every method a node serves and every error code."""

from pathlib import Path

import triode
from triode import errors

PROTOCOL = (Path(__file__).resolve().parent.parent / "docs" / "protocol.md").read_text()


async def test_every_method_a_node_serves_is_documented(tmp_path: Path) -> None:
    async with triode.open_node(listen=None, data=tmp_path) as node:
        methods = list(node.router)
    assert methods
    undocumented = [m for m in methods if f"`{m}`" not in PROTOCOL]
    assert undocumented == [], f"add these methods to docs/protocol.md: {undocumented}"


def test_every_error_code_is_documented() -> None:
    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.TriodeError)}
    assert "BLOB_NOT_FOUND" in codes
    undocumented = sorted(c for c in codes if f"`{c}`" not in PROTOCOL)
    assert undocumented == [], f"add these error codes to docs/protocol.md: {undocumented}"
