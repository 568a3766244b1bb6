"""The client side of actions: upload inputs from local paths, write outputs back.

``Client.upload_inputs`` calls into this module; ``triode run`` uses it, then
``Client.execute``, then :func:`write_outputs`. Every local path is checked the way the
node checks action paths: an input or an output that would reach outside the directory
it is relative to (absolute, ``..``, a symlink leading out) is refused with an
:class:`InvalidPath`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..chunks import hash_file_sync
from ..errors import InvalidArgument, InvalidPath
from ..model.action import Input
from ..model.digest import Digest
from ..model.paths import check_link_target, check_relative, inside, resolve_inside
from ..model.result import ActionResult

__all__ = ["LocalInputs", "scan_inputs", "upload_inputs", "write_outputs"]

#: Files read whole and sent in batched calls below this size; larger ones are streamed.
_SMALL = 64 * 1024


@dataclass
class LocalInputs:
    """Local files as an action's input tree: what to name them and where their bytes are."""

    inputs: dict[str, Input] = field(default_factory=dict)
    directories: list[str] = field(default_factory=list)
    #: digest to one local file that holds it
    sources: dict[Digest, Path] = field(default_factory=dict)


def _relative(root: Path, path: str | os.PathLike[str]) -> str:
    """``path`` (absolute, or relative to ``root``) as a normalized path under ``root``."""
    full = os.path.normpath(os.path.join(root, path))
    rel = os.path.relpath(full, root)
    if rel == ".":
        return ""
    if rel == ".." or rel.startswith("../") or os.path.isabs(rel):
        raise InvalidPath(
            f"input {os.fspath(path)!r} is outside {root}: inputs must be below it", path=str(path)
        )
    return rel.replace(os.sep, "/")


def scan_inputs(root: Path, paths: Iterable[str | os.PathLike[str]]) -> LocalInputs:
    """Walk and hash ``paths`` (files or directories, taken recursively) under ``root``.

    Synchronous: run it in a worker thread. A symlink is followed only when it stays
    inside ``root`` and leads to a file; its content is what the action sees.
    """
    root = Path(os.path.realpath(root))
    out = LocalInputs()
    dirs: set[str] = set()

    def add_file(rel: str, full: Path) -> None:
        st = os.stat(full)
        digest = hash_file_sync(full)
        out.inputs[rel] = Input(digest, bool(st.st_mode & stat.S_IXUSR))
        out.sources.setdefault(digest, full)

    def follow(rel: str, full: Path) -> Path:
        real = os.path.realpath(full)
        if not inside(root, real):
            raise InvalidPath(f"input {rel!r} is a symlink that leads out of {root} (to {real})", path=rel)
        return Path(real)

    for given in paths:
        rel = _relative(root, given)
        if rel:
            check_relative(rel, "input")
        full = root / rel if rel else root
        if rel:
            resolve_inside(root, rel, "input")
        if not os.path.lexists(full):
            raise InvalidArgument(f"input {os.fspath(given)!r} does not exist", path=os.fspath(given))
        target = follow(rel, full) if os.path.islink(full) else full
        if target.is_file():
            add_file(rel, target)
            continue
        if not target.is_dir():
            raise InvalidArgument(f"input {rel!r} is neither a file nor a directory", path=rel)
        if rel:
            dirs.add(rel)
        for dirpath, dirnames, filenames in os.walk(target):
            base = os.path.relpath(dirpath, target)
            prefix = rel if base == "." else (f"{rel}/{base}" if rel else base)
            for name in sorted(dirnames):
                child = f"{prefix}/{name}" if prefix else name
                if os.path.islink(os.path.join(dirpath, name)):
                    raise InvalidPath(
                        f"input {child!r} is a symlink to a directory; give the directory itself", path=child
                    )
                dirs.add(child)
            for name in sorted(filenames):
                child = f"{prefix}/{name}" if prefix else name
                child_full = Path(dirpath) / name
                if child_full.is_symlink():
                    child_full = follow(child, child_full)
                    if not child_full.is_file():
                        raise InvalidArgument(
                            f"input {child!r} is neither a file nor a directory", path=child
                        )
                elif not child_full.is_file():
                    continue  # sockets, fifos: nothing to send
                add_file(child, child_full)
    # Directories that hold inputs are implied; list only those that would otherwise be lost.
    holding: set[str] = set()
    for p in out.inputs:
        parts = p.split("/")
        holding.update("/".join(parts[:i]) for i in range(1, len(parts)))
    out.directories = sorted(d for d in dirs if d not in holding)
    return out


async def upload_inputs(cas: Any, root: Path, paths: Iterable[str | os.PathLike[str]]) -> LocalInputs:
    """Hash the local ``paths`` under ``root`` and upload the blobs ``cas`` does not have yet."""
    local = await trio.to_thread.run_sync(scan_inputs, Path(root), list(paths))
    missing = await cas.find_missing(list(local.sources))
    small: list[tuple[Digest, bytes]] = []
    for digest in missing:
        source = local.sources[digest]
        if digest.size <= _SMALL:
            data = await trio.to_thread.run_sync(source.read_bytes)
            small.append((digest, data))
            if sum(len(d) for _, d in small) >= 1024 * 1024:
                await _put_batch(cas, small)
                small = []
        else:
            await cas.put_file(source, digest)
    await _put_batch(cas, small)
    return local


async def _put_batch(cas: Any, blobs: list[tuple[Digest, bytes]]) -> None:
    if not blobs:
        return
    errors = await cas.batch_update(blobs)
    for error in errors.values():
        if error is not None:
            raise error


async def write_outputs(cas: Any, result: ActionResult, dest: Path) -> list[str]:
    """Write an action result's outputs under ``dest``: directories, files, symlinks.

    Files are replaced atomically; nothing is written through a symlink that leads
    out of ``dest``. Returns the paths written.
    """
    files = await trio.to_thread.run_sync(_prepare_outputs, Path(dest), result)
    umask = _umask()
    for path, digest, executable in files:
        await cas.write_to(digest, path)
        os.chmod(path, (0o777 if executable else 0o666) & ~umask)
    await trio.to_thread.run_sync(_write_links, Path(dest), result)
    return sorted(
        [e.path for e in result.output_directories]
        + [e.path for e in result.output_files]
        + [e.path for e in result.output_symlinks]
    )


def _prepare_outputs(dest: Path, result: ActionResult) -> list[tuple[Path, Digest, bool]]:
    """Make the directories and check every file's place; returns where each file goes."""
    dest = Path(os.path.realpath(dest))
    for directory in sorted(d.path for d in result.output_directories):
        resolve_inside(dest, directory, "output").mkdir(parents=True, exist_ok=True)
    files = []
    for entry in result.output_files:
        rel = entry.path
        path = resolve_inside(dest, rel, "output")
        path.parent.mkdir(parents=True, exist_ok=True)
        resolve_inside(dest, rel, "output")  # again, now that its parents exist
        if path.is_dir() and not path.is_symlink():
            raise InvalidPath(f"output {rel!r} is a file, but {path} is a directory here", path=rel)
        files.append((path, entry.digest, entry.executable))
    return files


def _write_links(dest: Path, result: ActionResult) -> None:
    dest = Path(os.path.realpath(dest))
    for entry in result.output_symlinks:
        rel, target = entry.path, entry.target
        check_link_target(dest, rel, target, "output")
        path = resolve_inside(dest, rel, "output")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.urandom(4).hex()}.link")
        os.symlink(target, tmp)
        os.replace(tmp, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
