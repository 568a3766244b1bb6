"""Paths inside an action's input root, and the checks that keep them there.

An action names every file by a relative, ``/``-separated path. A path that is
absolute, climbs out with ``..``, or reaches outside through a symlink could make a
node read or overwrite its own files (its CAS, its keys), so each is refused with an
:class:`~triode.errors.InvalidPath` that names it. The lexical check runs when an
action is parsed; the symlink checks run against the work dir, where the action's own
process may have planted links.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidPath

__all__ = ["check_relative", "inside", "resolve_inside", "check_link_target", "parents"]


def check_relative(path: object, what: str, *, allow_root: bool = False) -> str:
    """``path`` if it is a normalized relative path; else InvalidPath saying what is wrong.

    Normalized means no empty, ``.`` or ``..`` component, no leading or trailing ``/``,
    so that one file has exactly one spelling (and one action digest).
    """
    if not isinstance(path, str):
        raise InvalidPath(f"{what} must be a string path, got {path!r}", path=repr(path))
    if path == "":
        if allow_root:
            return path
        raise InvalidPath(f"{what} is empty: name a path relative to the input root", path=path)
    if "\0" in path:
        raise InvalidPath(f"{what} {path!r} contains a NUL byte", path=path)
    if path.startswith("/"):
        raise InvalidPath(f"{what} {path!r} is absolute: paths are relative to the input root", path=path)
    for part in path.split("/"):
        if part == "..":
            raise InvalidPath(f"{what} {path!r} climbs out of the input root with '..'", path=path)
        if part in ("", "."):
            raise InvalidPath(
                f"{what} {path!r} is not normalized (empty or '.' component); write it as "
                f"{'/'.join(p for p in path.split('/') if p not in ('', '.'))!r}",
                path=path,
            )
    return path


def parents(path: str) -> list[str]:
    """The directories above ``path``, outermost first: ``a/b/c`` gives ``a``, ``a/b``."""
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def inside(root: Path, candidate: str | os.PathLike[str]) -> bool:
    """Whether ``candidate`` (an absolute, resolved path) is ``root`` or below it."""
    root_s = os.fspath(root)
    cand = os.fspath(candidate)
    return cand == root_s or cand.startswith(root_s.rstrip("/") + "/")


def resolve_inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel`` once its parent directories are known to stay inside ``root``.

    The last component is not followed (it may itself be a symlink, which outputs
    keep as a symlink), but every directory above it is resolved: one that is a
    symlink leading out of the root is refused. ``root`` must already be resolved.
    """
    check_relative(rel, what)
    parent = os.path.dirname(rel)
    if parent:
        real = os.path.realpath(root / parent)
        if not inside(root, real):
            raise InvalidPath(
                f"{what} {rel!r} goes through a symlink that leads out of the input root (to {real})",
                path=rel,
            )
    return root / rel


def check_link_target(root: Path, link_rel: str, target: str, what: str) -> None:
    """Refuse a symlink whose target is absolute or points (lexically) out of ``root``."""
    if os.path.isabs(target):
        raise InvalidPath(
            f"{what} {link_rel!r} is a symlink to the absolute path {target!r}, outside the input root",
            path=link_rel,
            target=target,
        )
    joined = os.path.normpath(os.path.join(os.path.dirname(link_rel), target))
    if joined == ".." or joined.startswith("../"):
        raise InvalidPath(
            f"{what} {link_rel!r} is a symlink to {target!r}, which points out of the input root",
            path=link_rel,
            target=target,
        )
