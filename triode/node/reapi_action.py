"""An REAPI Action as a Triode :class:`~triode.model.action.Action`, and a Triode result as an
REAPI ``ActionResult``.

In: the ``Action`` and its ``Command`` are read from the CAS, and the input root's
``Directory`` tree is flattened (files with their executable bits, every directory so
empty ones exist, symlinks). Paths of the command (its outputs) are relative to its
working directory; Triode's are relative to the input root, so they are joined. The
parents of every output are created before the run, as REAPI asks. Whatever is missing
(the Action, the Command, a Directory, an input file) is one ``MissingInputs`` error that
names every missing blob, so the client uploads them all at once. The REAPI timeout, the
platform properties, ``do_not_cache`` and the salt go into the Triode action too: the salt
and the platform change its digest, so they keep results apart.

Out: output files and symlinks as they are; each output directory as a ``Tree`` (its
Directory messages, canonical: entries sorted by name) stored in the CAS; stdout and
stderr by digest; and the execution's timestamps, rebuilt from Triode's timings.
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import timestamp_pb2  # type: ignore[import-untyped]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]

from ..errors import InvalidArgument, InvalidPath, MissingInputs, TooLarge
from ..model.action import Action, Input
from ..model.digest import Digest
from ..model.paths import check_relative, parents
from ..model.result import ActionResult
from ..proto import remote_execution_pb2 as pb
from .reapi import MAX_BATCH, from_digest, to_digest

__all__ = ["Prepared", "DirectoryCache", "prepare", "to_reapi_result", "MAX_INPUT_ENTRIES"]

#: Files, directories and symlinks in one input tree (counted as flattened).
MAX_INPUT_ENTRIES = 500_000
#: The largest Action, Command or Directory message read.
MAX_MESSAGE = 16 * 1024 * 1024
#: Parsed Directory messages kept (a build's actions share most of their trees).
DIRECTORY_CACHE = 20_000
#: The platform property the action's salt becomes (so salted actions are told apart).
SALT_PROPERTY = "reapi.salt"


@dataclass
class Prepared:
    """An REAPI action, read and checked, and the Triode action it runs as."""

    action_digest: Digest
    action: Action
    do_not_cache: bool
    working_directory: str
    #: The command's outputs as it names them (relative to its working directory).
    output_files: tuple[str, ...] = ()
    output_directories: tuple[str, ...] = ()
    output_paths: tuple[str, ...] = ()
    #: Set when the action's timeout was set (REAPI wants DEADLINE_EXCEEDED when it passes).
    timeout: float | None = None
    command_digest: Digest | None = field(default=None, repr=False)


class DirectoryCache:
    """Parsed Directory messages by digest, the most recently used kept (bounded)."""

    def __init__(self, limit: int = DIRECTORY_CACHE) -> None:
        self.limit = limit
        self._items: OrderedDict[Digest, pb.Directory] = OrderedDict()

    def get(self, digest: Digest) -> pb.Directory | None:
        found = self._items.get(digest)
        if found is not None:
            self._items.move_to_end(digest)
        return found

    def put(self, digest: Digest, directory: pb.Directory) -> None:
        self._items[digest] = directory
        while len(self._items) > self.limit:
            self._items.popitem(last=False)


def _parse(message_type: Any, data: bytes, what: str) -> Any:
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        kind = message_type.DESCRIPTOR.name
        raise InvalidArgument(f"{what} is not a valid {kind} message: {exc}") from None


async def _read(cas: Any, digests: list[Digest]) -> dict[Digest, bytes | None]:
    """Blobs by digest (None when missing), small ones in batches."""
    out: dict[Digest, bytes | None] = {}
    batch: list[Digest] = []
    held = 0
    for d in digests:
        if d.size > MAX_MESSAGE:
            raise TooLarge(f"blob {d} is {d.size} bytes: over {MAX_MESSAGE} for an Action, Command or "
                           "Directory")
        if held + d.size > MAX_BATCH and batch:
            out.update(await cas.batch_read(batch))
            batch, held = [], 0
        batch.append(d)
        held += d.size
    if batch:
        out.update(await cas.batch_read(batch))
    return out


def _name(name: str, where: str) -> str:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise InvalidPath(f"{where}: {name[:200]!r} is not a file name (empty, '.', '..', or with '/')",
                          path=name)
    return name


async def prepare(cas: Any, action_digest: Digest, cache: DirectoryCache, *, inputs: bool = True) -> Prepared:
    """Read the action ``action_digest`` names and build the Triode action it runs as.

    With ``inputs=False`` only the Action and the Command are read (enough to turn a result
    into an REAPI one). Raises MissingInputs listing every blob that is not in the CAS.
    """
    found = await _read(cas, [action_digest])
    raw = found.get(action_digest)
    if raw is None:
        raise MissingInputs(f"the action {action_digest} is not in the CAS: upload it first",
                            missing=[str(action_digest)])
    action = _parse(pb.Action, raw, f"action {action_digest}")
    command_digest = to_digest(action.command_digest, "action.command_digest")
    root_digest = to_digest(action.input_root_digest, "action.input_root_digest")
    command_raw = (await _read(cas, [command_digest])).get(command_digest)
    if command_raw is None:
        raise MissingInputs(f"the command {command_digest} of action {action_digest} is not in the CAS: "
                            "upload it first", missing=[str(command_digest)])
    command = _parse(pb.Command, command_raw, f"command {command_digest}")
    cwd = command.working_directory.strip("/") if command.working_directory not in ("", ".") else ""
    check_relative(cwd, "command working_directory", allow_root=True)
    output_paths = tuple(command.output_paths)
    output_files = () if output_paths else tuple(command.output_files)
    output_dirs = () if output_paths else tuple(command.output_directories)
    outputs: list[str] = []
    for p in (*output_paths, *output_files, *output_dirs):
        check_relative(p, "command output")
        outputs.append(posixpath.join(cwd, p) if cwd else p)
    timeout = None
    if action.HasField("timeout"):
        seconds = action.timeout.seconds + action.timeout.nanos / 1e9
        if seconds < 0:
            raise InvalidArgument(f"action timeout must not be negative, got {seconds}s")
        timeout = seconds or None
    platform: dict[str, list[str]] = {}
    for prop in [*command.platform.properties, *action.platform.properties]:
        platform.setdefault(prop.name, []).append(prop.value)
    flat = {name: ",".join(sorted(set(values))) for name, values in platform.items()}
    if action.salt:
        flat[SALT_PROPERTY] = action.salt.hex()
    env: dict[str, str] = {}
    for var in command.environment_variables:
        env[var.name] = var.value
    files: dict[str, Input] = {}
    dirs: list[str] = []
    links: dict[str, str] = {}
    if inputs:
        tree = await _load_tree(cas, root_digest, cache, action_digest)
        _flatten(root_digest, tree, files, dirs, links)
        file_missing = await cas.find_missing(list({i.digest for i in files.values()}))
        if file_missing:
            await _missing_tree(cas, action_digest, [], file_missing)
    output_parents = {parent for path in outputs for parent in parents(path)}
    if cwd:
        output_parents.add(cwd)
    try:
        triode_action = Action(
            argv=tuple(command.arguments),
            env=env,
            cwd=cwd,
            inputs=files,
            directories=tuple(sorted(set(dirs) | output_parents)),
            outputs=tuple(outputs),
            timeout=timeout,
            platform=flat,
            do_not_cache=action.do_not_cache,
            symlinks=links,
        )
    except InvalidArgument as exc:
        raise type(exc)(f"action {action_digest}: {exc.message}", **exc.details) from None
    return Prepared(action_digest, triode_action, action.do_not_cache, cwd, output_files, output_dirs,
                    output_paths, timeout, command_digest)


async def _missing_tree(cas: Any, action_digest: Digest, dirs: list[Digest], files: list[Digest]) -> None:
    names = sorted({str(d) for d in [*dirs, *files]})
    raise MissingInputs(
        f"{len(names)} input blob(s) of action {action_digest} are not in the CAS: upload them and retry "
        f"(e.g. {names[0]})", missing=names)


async def _load_tree(
    cas: Any, root: Digest, cache: DirectoryCache, action_digest: Digest
) -> dict[Digest, pb.Directory]:
    """Every Directory of the tree under ``root``, read level by level (the cache first)."""
    tree: dict[Digest, pb.Directory] = {}
    level = [root]
    missing: list[Digest] = []
    while level:
        fetch = []
        for d in level:
            cached = cache.get(d)
            if cached is not None:
                tree[d] = cached
            else:
                fetch.append(d)
        found = await _read(cas, fetch) if fetch else {}
        for d in fetch:
            raw = found.get(d)
            if raw is None:
                missing.append(d)
                continue
            directory = _parse(pb.Directory, raw, f"directory {d}")
            cache.put(d, directory)
            tree[d] = directory
        following: list[Digest] = []
        for d in level:
            directory = tree.get(d)
            if directory is None:
                continue
            for i, sub in enumerate(directory.directories):
                child = to_digest(sub.digest, f"directory {d}: directories[{i}].digest")
                if child not in tree and child not in following:
                    following.append(child)
            if len(tree) + len(following) > MAX_INPUT_ENTRIES:
                raise TooLarge(f"the input tree of action {action_digest} has over {MAX_INPUT_ENTRIES} "
                               "entries")
        level = following
    if missing:
        await _missing_tree(cas, action_digest, missing, [])
    return tree


def _flatten(
    root: Digest,
    tree: dict[Digest, pb.Directory],
    files: dict[str, Input],
    dirs: list[str],
    links: dict[str, str],
) -> None:
    stack = [("", root)]
    count = 0
    while stack:
        prefix, digest = stack.pop()
        directory = tree[digest]
        seen: set[str] = set()
        count += len(directory.files) + len(directory.directories) + len(directory.symlinks)
        if count > MAX_INPUT_ENTRIES:
            raise TooLarge(f"the input tree has over {MAX_INPUT_ENTRIES} files, directories and symlinks")
        for f in directory.files:
            name = _name(f.name, f"directory {digest}")
            if name in seen:
                raise InvalidPath(f"directory {digest} lists {name!r} twice", path=name)
            seen.add(name)
            path = f"{prefix}{name}"
            files[path] = Input(to_digest(f.digest, f"input {path!r}"), bool(f.is_executable))
        for s in directory.symlinks:
            name = _name(s.name, f"directory {digest}")
            if name in seen:
                raise InvalidPath(f"directory {digest} lists {name!r} twice", path=name)
            seen.add(name)
            links[f"{prefix}{name}"] = s.target
        for sub in directory.directories:
            name = _name(sub.name, f"directory {digest}")
            if name in seen:
                raise InvalidPath(f"directory {digest} lists {name!r} twice", path=name)
            seen.add(name)
            path = f"{prefix}{name}"
            dirs.append(path)
            stack.append((f"{path}/", to_digest(sub.digest)))


# -- results --------------------------------------------------------------------------------


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return stamp


def metadata_of(result: ActionResult) -> pb.ExecutedActionMetadata:
    """The execution's timestamps, from the end of the run back through Triode's timings."""
    t = result.timings
    done = result.executed_at
    upload_start = done - t.uploading
    run_start = upload_start - t.running
    fetch_start = run_start - t.staging
    return pb.ExecutedActionMetadata(
        worker=result.node,
        queued_timestamp=_timestamp(fetch_start - t.queued),
        worker_start_timestamp=_timestamp(fetch_start),
        input_fetch_start_timestamp=_timestamp(fetch_start),
        input_fetch_completed_timestamp=_timestamp(run_start),
        execution_start_timestamp=_timestamp(run_start),
        execution_completed_timestamp=_timestamp(upload_start),
        output_upload_start_timestamp=_timestamp(upload_start),
        output_upload_completed_timestamp=_timestamp(done),
        worker_completed_timestamp=_timestamp(done),
    )


class _Node:
    """A directory being built into a Tree."""

    __slots__ = ("files", "dirs", "links")

    def __init__(self) -> None:
        self.files: dict[str, tuple[Digest, bool]] = {}
        self.dirs: dict[str, _Node] = {}
        self.links: dict[str, str] = {}

    def child(self, name: str) -> _Node:
        node = self.dirs.get(name)
        if node is None:
            node = self.dirs[name] = _Node()
        return node


def _directory(node: _Node, children: dict[Digest, pb.Directory]) -> pb.Directory:
    """The Directory message of ``node`` (entries sorted by name); its subdirectories' go to
    ``children``, once each."""
    subdirs = []
    for name in sorted(node.dirs):
        sub = _directory(node.dirs[name], children)
        raw = sub.SerializeToString(deterministic=True)
        digest = Digest.of(raw)
        children.setdefault(digest, sub)
        subdirs.append(pb.DirectoryNode(name=name, digest=from_digest(digest)))
    return pb.Directory(
        files=[pb.FileNode(name=name, digest=from_digest(d), is_executable=x)
               for name, (d, x) in sorted(node.files.items())],
        directories=subdirs,
        symlinks=[pb.SymlinkNode(name=name, target=t) for name, t in sorted(node.links.items())],
    )


def build_tree(prefix: str, result: ActionResult) -> pb.Tree:
    """The Tree of the output directory at ``prefix`` (relative to the input root)."""
    root = _Node()
    start = f"{prefix}/"

    def place(path: str) -> tuple[_Node, str]:
        parts = path[len(start):].split("/")
        node = root
        for part in parts[:-1]:
            node = node.child(part)
        return node, parts[-1]

    for d in result.output_directories:
        if d.path.startswith(start):
            node, name = place(d.path)
            node.child(name)
    for f in result.output_files:
        if f.path.startswith(start):
            node, name = place(f.path)
            node.files[name] = (f.digest, f.executable)
    for s in result.output_symlinks:
        if s.path.startswith(start):
            node, name = place(s.path)
            node.links[name] = s.target
    children: dict[Digest, pb.Directory] = {}
    top = _directory(root, children)
    return pb.Tree(root=top, children=list(children.values()))


async def to_reapi_result(cas: Any, prepared: Prepared, result: ActionResult) -> pb.ActionResult:
    """The REAPI ActionResult of a Triode result; output directories' Trees go to the CAS."""
    cwd = prepared.working_directory
    files = {f.path: f for f in result.output_files}
    links = {s.path: s.target for s in result.output_symlinks}
    dirs = {d.path for d in result.output_directories}
    out = pb.ActionResult(
        exit_code=result.exit_code,
        stdout_digest=from_digest(result.stdout.digest),
        stderr_digest=from_digest(result.stderr.digest),
        execution_metadata=metadata_of(result),
    )
    declared = [*((p, "path") for p in prepared.output_paths), *((p, "file") for p in prepared.output_files),
                *((p, "dir") for p in prepared.output_directories)]
    seen: set[str] = set()
    for path, kind in declared:
        if path in seen:
            continue
        seen.add(path)
        full = posixpath.join(cwd, path) if cwd else path
        if full in files:
            f = files[full]
            out.output_files.append(pb.OutputFile(path=path, digest=from_digest(f.digest),
                                                  is_executable=f.executable))
        elif full in links:
            # In the field the client's way of naming outputs reads: output_paths (REAPI 2.1)
            # output_symlinks; output_files and output_directories (2.0, Bazel 4) the older two.
            link = pb.OutputSymlink(path=path, target=links[full])
            if kind == "file":
                out.output_file_symlinks.append(link)
            elif kind == "dir":
                out.output_directory_symlinks.append(link)
            else:
                out.output_symlinks.append(link)
        elif full in dirs:
            tree = build_tree(full, result)
            raw = tree.SerializeToString(deterministic=True)
            digest = await cas.put(raw)
            out.output_directories.append(pb.OutputDirectory(path=path, tree_digest=from_digest(digest)))
    return out
