"""The REAPI action cache: an action's hash to its ``ActionResult`` protobuf, hits only when complete.

Bazel and other REAPI clients (over HTTP, ``/ac/HASH``, or gRPC, ``GetActionResult``)
store the serialized ``build.bazel.remote.execution.v2.ActionResult`` of each action.
The bytes go into the CAS (verified and stored like any blob) and the action's hash
points at them in the key-value store (namespace :data:`NAMESPACE`), so every door
shares one cache, and an entry lasts as long as its bytes do.

An update is validated before anything is stored: the bytes parse as an
``ActionResult``, every digest in it is well formed, every output path is relative and
free of ``..``, and every blob it refers to (see :func:`referenced_digests`, and the
files inside each output directory's ``Tree``) is in the CAS. A get answers only when
all those blobs are still stored, so a client never gets a hit it cannot download,
as Triode's own action cache does.

Results are kept as their clients sent them; Triode's own action cache
(:mod:`.ac`) holds Triode's results, in Triode's shape: the two are separate caches.
"""

from __future__ import annotations

import re

import trio
from google.protobuf.message import DecodeError  # type: ignore[import-untyped]  # no stubs in the venv

from ..errors import BlobNotFound, FailedPrecondition, InvalidArgument, InvalidDigest, TooLarge
from ..model.digest import Digest
from ..proto import remote_execution_pb2 as pb
from .cas import CAS
from .keyvalue import KeyValueStore

__all__ = [
    "ReapiActionCache",
    "referenced_digests",
    "tree_file_digests",
    "parse_action_result",
    "check_action_hash",
    "NAMESPACE",
    "MAX_RESULT_SIZE",
    "MAX_TREE_SIZE",
]

#: The key-value namespace that maps action hashes to results.
NAMESPACE = "reapi.ac"
#: The largest serialized ActionResult stored.
MAX_RESULT_SIZE = 4 * 1024 * 1024
#: The largest output directory Tree read to check its files are stored.
MAX_TREE_SIZE = 64 * 1024 * 1024
#: Serialized messages up to this size are parsed on the event loop (a thread hop costs more).
_INLINE_PARSE = 256 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


def check_action_hash(action_hash: str) -> str:
    """``action_hash`` when it is a SHA-256 in lowercase hex, else InvalidDigest."""
    if not isinstance(action_hash, str) or not _HEX64.fullmatch(action_hash):
        raise InvalidDigest(
            f"an action hash is 64 lowercase hex characters (SHA-256), got {str(action_hash)[:80]!r}"
        )
    return action_hash


def _digest(message: pb.Digest, where: str) -> Digest:
    try:
        return Digest(message.hash, message.size_bytes)
    except InvalidDigest as exc:
        raise InvalidDigest(f"{where}: {exc.message}") from None


def _check_path(path: str, where: str) -> None:
    """An output path: relative, not empty, no ``..``, ``.`` or empty segment, no NUL."""
    if not path:
        raise InvalidArgument(f"{where}: the path is empty")
    if path.startswith("/") or "\0" in path or "\\" in path:
        raise InvalidArgument(f"{where}: {path[:200]!r} is not a relative path")
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidArgument(f"{where}: {path[:200]!r} has a {segment or 'empty'!r} segment")


def parse_action_result(raw: bytes) -> pb.ActionResult:
    """Parse and check an ActionResult (InvalidArgument saying what is wrong)."""
    if len(raw) > MAX_RESULT_SIZE:
        raise TooLarge(f"an action result is {len(raw)} bytes, over the limit of {MAX_RESULT_SIZE}",
                       size=len(raw), limit=MAX_RESULT_SIZE)
    result = pb.ActionResult()
    try:
        result.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"the value is not an ActionResult protobuf: {exc}") from None
    seen: set[str] = set()
    for kind, entries in (
        ("output_files", result.output_files),
        ("output_directories", result.output_directories),
        ("output_symlinks", result.output_symlinks),
        ("output_file_symlinks", result.output_file_symlinks),
        ("output_directory_symlinks", result.output_directory_symlinks),
    ):
        for i, entry in enumerate(entries):
            where = f"{kind}[{i}]"
            _check_path(entry.path, where)
            if entry.path in seen:
                raise InvalidArgument(f"{where}: output path {entry.path[:200]!r} appears twice")
            seen.add(entry.path)
    referenced_digests(result)  # every digest well formed
    return result


def referenced_digests(result: pb.ActionResult) -> list[Digest]:
    """The blobs ``result`` refers to directly: output files, output directories' ``Tree``
    messages, stdout and stderr (when given by digest). InvalidDigest for a bad one.

    A client that gets the result downloads these, then the files listed in each
    ``Tree`` (:func:`tree_file_digests`).
    """
    out: list[Digest] = []
    for i, f in enumerate(result.output_files):
        if not f.HasField("digest"):
            raise InvalidDigest(f"output_files[{i}] ({f.path[:200]!r}) has no digest")
        out.append(_digest(f.digest, f"output_files[{i}].digest"))
    for i, d in enumerate(result.output_directories):
        if not d.HasField("tree_digest"):
            raise InvalidDigest(f"output_directories[{i}] ({d.path[:200]!r}) has no tree_digest")
        out.append(_digest(d.tree_digest, f"output_directories[{i}].tree_digest"))
    if result.HasField("stdout_digest"):
        out.append(_digest(result.stdout_digest, "stdout_digest"))
    if result.HasField("stderr_digest"):
        out.append(_digest(result.stderr_digest, "stderr_digest"))
    return list(dict.fromkeys(out))


def tree_file_digests(raw: bytes, where: str = "tree") -> list[Digest]:
    """The file blobs a serialized ``Tree`` lists (its root and children); InvalidArgument
    when it does not parse or names a bad digest."""
    tree = pb.Tree()
    try:
        tree.ParseFromString(raw)
    except DecodeError as exc:
        raise InvalidArgument(f"{where} is not a Tree protobuf: {exc}") from None
    out: list[Digest] = []
    for n, directory in enumerate([tree.root, *tree.children]):
        for f in directory.files:
            out.append(_digest(f.digest, f"{where}: directory {n}, file {f.name[:200]!r}"))
    return list(dict.fromkeys(out))


async def _parse_tree(raw: bytes, where: str) -> list[Digest]:
    if len(raw) <= _INLINE_PARSE:
        await trio.lowlevel.checkpoint()
        return tree_file_digests(raw, where)
    return await trio.to_thread.run_sync(tree_file_digests, raw, where)


class ReapiActionCache:
    """``get``/``update`` of serialized ActionResults by action hash, over ``cas`` and ``kv``."""

    def __init__(self, cas: CAS, kv: KeyValueStore, *, namespace: str = NAMESPACE) -> None:
        self.cas = cas
        self.kv = kv
        self.namespace = namespace
        self.counters: dict[str, int] = {"hits": 0, "misses": 0, "misses_incomplete": 0, "updates": 0}

    def info(self) -> dict[str, int]:
        return dict(self.counters)

    async def get(self, action_hash: str) -> bytes | None:
        """The serialized ActionResult stored for ``action_hash``, or None: never stored, or
        one of the blobs it refers to (a Tree's files included) is no longer stored."""
        check_action_hash(action_hash)
        digest = await self.kv.get(self.namespace, action_hash)
        raw = None
        if digest is not None and digest.size <= MAX_RESULT_SIZE:
            try:
                raw = await self.cas.get(digest)
            except BlobNotFound:  # evicted since the key-value store looked
                raw = None
        if raw is None:
            self.counters["misses"] += 1
            return None
        try:
            result = parse_action_result(raw)
            if await self.missing(result):
                self.counters["misses_incomplete"] += 1
                return None
        except InvalidArgument:  # stored before a rule tightened, or a Tree that is not one
            self.counters["misses_incomplete"] += 1
            return None
        self.counters["hits"] += 1
        return raw

    async def update(self, action_hash: str, result: bytes) -> None:
        """Store ``result`` for ``action_hash``. InvalidArgument (saying what is wrong) when it
        is not a well-formed ActionResult; FailedPrecondition (listing them) when blobs it
        refers to are not in the CAS: upload those first."""
        check_action_hash(action_hash)
        result = bytes(result)
        parsed = parse_action_result(result)
        missing = await self.missing(parsed)
        if missing:
            raise FailedPrecondition(
                f"action result refers to {len(missing)} blob(s) not in the CAS (upload them first): "
                + ", ".join(map(str, missing[:5])),
                missing=[str(d) for d in missing],
            )
        digest = await self.cas.put(result)
        await self.kv.put(self.namespace, action_hash, digest)
        self.counters["updates"] += 1

    async def missing(self, result: pb.ActionResult) -> list[Digest]:
        """The blobs ``result`` needs that the CAS lacks: those it refers to, then the files
        of its output directories' Trees (a Tree too large to check counts as missing)."""
        direct = referenced_digests(result)
        missing = await self.cas.find_missing(direct)
        if missing:
            return missing
        files: list[Digest] = []
        for i, d in enumerate(result.output_directories):
            tree = _digest(d.tree_digest, f"output_directories[{i}].tree_digest")
            if tree.size > MAX_TREE_SIZE:
                return [tree]
            try:
                raw = await self.cas.get(tree)
            except BlobNotFound:  # evicted since find_missing
                return [tree]
            files.extend(await _parse_tree(raw, f"output_directories[{i}] tree"))
        return await self.cas.find_missing(files) if files else []
