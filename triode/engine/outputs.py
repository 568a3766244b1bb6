"""Collecting an action's outputs from its work dir into the CAS.

Each output path may turn out to be a file, a directory (taken recursively: every
file, every subdirectory so empty ones come back, every symlink) or a symlink, which is
kept as a symlink and never followed. Nothing is read through a symlink: an output
whose parent directories lead out of the root, or a symlink pointing out of it, is
refused with the path named. Walking is done in one worker thread; the files then go
to the CAS through its own API (which hashes and stores them off the event loop).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidPath, OutputTooLarge
from ..model.paths import check_link_target, resolve_inside

__all__ = ["Collected", "scan_outputs", "MAX_OUTPUT_ENTRIES"]

#: Files, directories and symlinks one action may return (the result must fit a frame).
MAX_OUTPUT_ENTRIES = 50_000


@dataclass
class Collected:
    #: (relative path, absolute path, executable)
    files: list[tuple[str, Path, bool]] = field(default_factory=list)
    symlinks: list[dict[str, Any]] = field(default_factory=list)
    directories: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def count(self) -> int:
        return len(self.files) + len(self.symlinks) + len(self.directories)


def scan_outputs(root: Path, outputs: tuple[str, ...]) -> Collected:
    """Find what each output path is (synchronous: run it in a worker thread)."""
    found = Collected()
    seen: set[str] = set()
    for rel in outputs:
        full = resolve_inside(root, rel, "output")
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            found.missing.append(rel)
            continue
        _add(found, seen, root, rel, full, st)
        if stat.S_ISDIR(st.st_mode):
            _walk(found, seen, root, rel, full)
    return found


def _add(found: Collected, seen: set[str], root: Path, rel: str, full: Path, st: os.stat_result) -> None:
    if rel in seen:  # outputs may nest ("out" and "out/a"): report each path once
        return
    seen.add(rel)
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidPath(f"output {rel!r} has a name that is not UTF-8; rename it", path=repr(rel)) from None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(full)
        try:
            target.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidPath(f"output symlink {rel!r} has a target that is not UTF-8", path=rel) from None
        check_link_target(root, rel, target, "output")
        found.symlinks.append({"path": rel, "target": target})
    elif stat.S_ISDIR(st.st_mode):
        found.directories.append({"path": rel})
    elif stat.S_ISREG(st.st_mode):
        found.files.append((rel, full, bool(st.st_mode & stat.S_IXUSR)))
    else:  # fifos, sockets, devices have no content to store
        found.missing.append(rel)
    if found.count() > MAX_OUTPUT_ENTRIES:
        raise OutputTooLarge(
            f"the action produced more than {MAX_OUTPUT_ENTRIES} output entries (at {rel!r}); "
            "collect fewer paths or archive them into one file",
            limit=MAX_OUTPUT_ENTRIES,
        )


def _walk(found: Collected, seen: set[str], root: Path, rel: str, full: Path) -> None:
    stack = [(rel, full)]
    while stack:
        rel_dir, dir_path = stack.pop()
        with os.scandir(dir_path) as entries:
            children = sorted(entries, key=lambda e: e.name)
        for entry in children:
            child_rel = f"{rel_dir}/{entry.name}"
            child = dir_path / entry.name
            st = entry.stat(follow_symlinks=False)
            _add(found, seen, root, child_rel, child, st)
            if stat.S_ISDIR(st.st_mode):
                stack.append((child_rel, child))
