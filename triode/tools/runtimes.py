"""Finding bun and node, and the command line that starts a worker under each.

node comes from the system. bun comes from the npm registry's ``bun`` package, which
ships the binary inside it; ``scripts/setup-js`` installs it (with amaro, the type
stripper node 20 needs for TypeScript) into a project-local ``.triode-js/``. We look
there, in ``$TRIODE_JS_HOME``, in ``$TRIODE_HOME/js`` and on ``PATH``, and when the
runtime is nowhere we say exactly how to get it rather than failing on exec.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import RuntimeMissing
from .validation import validate_runtime

__all__ = ["Runtime", "find_runtime", "js_homes", "HARNESS", "HOW_TO_GET"]

HARNESS = Path(__file__).with_name("js") / "worker.mjs"

HOW_TO_GET = {
    "bun": (
        "install it from the npm registry's bun package: run scripts/setup-js in a Triode checkout, "
        "or `npm install --prefix ~/.cache/triode/js bun`, or set TRIODE_BUN to a bun binary"
    ),
    "node": "install Node.js 20 or newer so that `node` is on PATH, or set TRIODE_NODE to a node binary",
}


def js_homes() -> list[Path]:
    """Directories that may hold a ``node_modules`` with bun and amaro, most specific first."""
    homes = []
    if os.environ.get("TRIODE_JS_HOME"):
        homes.append(Path(os.environ["TRIODE_JS_HOME"]))
    homes.append(Path(__file__).resolve().parents[2] / ".triode-js")  # a source checkout
    homes.append(Path.cwd() / ".triode-js")
    triode_home = os.environ.get("TRIODE_HOME")
    homes.append((Path(triode_home) if triode_home else Path.home() / ".cache" / "triode") / "js")
    seen: list[Path] = []
    for home in homes:
        if home not in seen:
            seen.append(home)
    return seen


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@dataclass(frozen=True)
class Runtime:
    """A JavaScript runtime found on this machine."""

    name: str
    executable: str
    #: amaro's entry file, for TypeScript under node (bun strips types itself).
    amaro: str | None = None

    def argv(self, entrypoint: Path, channel_fd: int) -> list[str]:
        """The command line of a worker serving ``entrypoint``, replying on ``channel_fd``."""
        if self.name == "bun":
            # No auto-install of missing packages and no .env files: a tool gets the env we give.
            head = [self.executable, "--no-install", "--no-env-file", str(HARNESS)]
        else:
            head = [self.executable, str(HARNESS)]
        tail = ["--channel-fd", str(channel_fd)]
        if self.amaro:
            tail += ["--amaro", self.amaro]
        return [*head, *tail, str(entrypoint)]


def find_runtime(name: str) -> Runtime:
    """The runtime called ``name`` ("bun" or "node"), or :class:`RuntimeMissing` saying how to get it."""
    validate_runtime(name)
    override = os.environ.get(f"TRIODE_{name.upper()}")
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override))
    elif name == "bun":
        candidates += [home / "node_modules" / ".bin" / "bun" for home in js_homes()]
    on_path = shutil.which(name)
    if on_path and not override:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if _executable(candidate):
            amaro = None
            if name == "node":
                for home in js_homes():
                    entry = home / "node_modules" / "amaro" / "dist" / "index.js"
                    if entry.is_file():
                        amaro = str(entry)
                        break
            return Runtime(name, str(candidate), amaro)
    looked = ", ".join(str(c) for c in candidates) or "PATH"
    raise RuntimeMissing(
        f"the {name} runtime is not installed (looked at {looked}): {HOW_TO_GET[name]}",
        runtime=name,
        looked=[str(c) for c in candidates],
    )
