"""The action cache: action digest to action result, a hit only while its blobs exist.

Entries are msgpack maps of the shape :func:`validate_action_result` checks (see
docs/protocol.md). On disk they are records of one append-only log beside the CAS
(:mod:`.aclog`, which says why); without a data dir they live in a bounded dict.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
import trio

from ..chunks import INLINE_LIMIT
from ..errors import FailedPrecondition, InvalidArgument, TriodeError
from ..model.digest import Digest
from .aclog import EntryLog, Replaced, entry_key
from .cas import CAS

if TYPE_CHECKING:
    from .tier import Backing

__all__ = ["ActionCache", "validate_action_result", "referenced_blobs", "MAX_ENTRY_SIZE"]

#: The largest action result stored, encoded.
MAX_ENTRY_SIZE = 4 * 1024 * 1024
#: Bytes of log on disk past which the least recently used entries go (as past ``max_entries``).
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
_MAX_PATH = 4096


def _fail(field: str, want: str, got: Any) -> InvalidArgument:
    text = repr(got)
    if len(text) > 80:
        text = text[:77] + "..."
    return InvalidArgument(f"action result field {field!r} must be {want}, got {text}", field=field)


def _int(value: Any, field: str) -> int:
    if type(value) is not int:
        raise _fail(field, "an integer", value)
    return value


def _bool(value: Any, field: str) -> bool:
    if type(value) is not bool:
        raise _fail(field, "true or false", value)
    return value


def _seconds(value: Any, field: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise _fail(field, "a non-negative number of seconds", value)
    return float(value)


def _path(value: Any, field: str) -> str:
    if type(value) is not str or not value or len(value) > _MAX_PATH:
        raise _fail(field, "a relative '/'-separated path", value)
    parts = value.split("/")
    if value.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in value:
        raise _fail(field, "a relative '/'-separated path without '.', '..' or empty parts", value)
    return value


def _digest(value: Any, field: str) -> list[Any]:
    try:
        return Digest.from_wire(value).to_wire()
    except InvalidArgument as exc:
        raise InvalidArgument(f"action result field {field!r}: {exc}", field=field) from None


def _list(value: Any, field: str) -> list[Any]:
    if type(value) is not list:
        raise _fail(field, "a list", value)
    return value


def _map(value: Any, field: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if type(value) is not dict:
        raise _fail(field, f"a map with {', '.join(keys)}", value)
    extra = set(value) - set(keys)
    if extra:
        raise InvalidArgument(f"action result field {field!r} has unknown keys {sorted(map(str, extra))}",
                              field=field)
    return value


def _output(value: Any, field: str) -> dict[str, Any]:
    m = _map(value, field, ("digest", "truncated"))
    if "digest" not in m:
        raise InvalidArgument(f"action result field '{field}.digest' is required", field=f"{field}.digest")
    return {"digest": _digest(m["digest"], f"{field}.digest"),
            "truncated": _bool(m.get("truncated", False), f"{field}.truncated")}


_EMPTY_OUTPUT = {"digest": ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", 0],
                 "truncated": False}
_FIELDS = ("exit_code", "signal", "timed_out", "stdout", "stderr", "output_files", "output_symlinks",
           "output_directories", "missing_outputs", "timings", "node", "executed_at")


def validate_action_result(value: Any) -> dict[str, Any]:
    """Check an action result's shape; return it normalized (absent optional fields filled in).

    ``exit_code`` is required; every other field has a default (no output, zero
    timings). A wrong field raises :class:`InvalidArgument` naming it.
    """
    m = _map(value, "result", _FIELDS)
    if "exit_code" not in m:
        raise InvalidArgument("action result field 'exit_code' is required", field="exit_code")
    out: dict[str, Any] = {"exit_code": _int(m["exit_code"], "exit_code")}
    sig = m.get("signal")
    out["signal"] = None if sig is None else _int(sig, "signal")
    out["timed_out"] = _bool(m.get("timed_out", False), "timed_out")
    out["stdout"] = _output(m["stdout"], "stdout") if "stdout" in m else dict(_EMPTY_OUTPUT)
    out["stderr"] = _output(m["stderr"], "stderr") if "stderr" in m else dict(_EMPTY_OUTPUT)
    files = []
    for i, f in enumerate(_list(m.get("output_files", []), "output_files")):
        name = f"output_files[{i}]"
        f = _map(f, name, ("path", "digest", "executable"))
        for key in ("path", "digest"):
            if key not in f:
                raise InvalidArgument(f"action result field '{name}.{key}' is required",
                                      field=f"{name}.{key}")
        files.append({
            "path": _path(f["path"], f"{name}.path"),
            "digest": _digest(f["digest"], f"{name}.digest"),
            "executable": _bool(f.get("executable", False), f"{name}.executable"),
        })
    out["output_files"] = files
    links = []
    for i, s in enumerate(_list(m.get("output_symlinks", []), "output_symlinks")):
        name = f"output_symlinks[{i}]"
        s = _map(s, name, ("path", "target"))
        target = s.get("target")
        if type(target) is not str or not target:
            raise _fail(f"{name}.target", "a non-empty string", target)
        links.append({"path": _path(s.get("path"), f"{name}.path"), "target": target})
    out["output_symlinks"] = links
    dirs = []
    for i, d in enumerate(_list(m.get("output_directories", []), "output_directories")):
        name = f"output_directories[{i}]"
        d = _map(d, name, ("path",))
        dirs.append({"path": _path(d.get("path"), f"{name}.path")})
    out["output_directories"] = dirs
    missing = _list(m.get("missing_outputs", []), "missing_outputs")
    out["missing_outputs"] = [_path(p, f"missing_outputs[{i}]") for i, p in enumerate(missing)]
    timings = _map(m.get("timings", {}), "timings", ("queued", "staging", "running", "uploading"))
    out["timings"] = {k: _seconds(timings.get(k, 0.0), f"timings.{k}")
                      for k in ("queued", "staging", "running", "uploading")}
    node = m.get("node", "")
    if type(node) is not str:
        raise _fail("node", "a node id string", node)
    out["node"] = node
    out["executed_at"] = _seconds(m.get("executed_at", 0.0), "executed_at")
    return out


def referenced_blobs(result: dict[str, Any]) -> list[Digest]:
    """The blobs a (validated) result needs: stdout, stderr and every output file."""
    wire = [result["stdout"]["digest"], result["stderr"]["digest"]]
    wire += [f["digest"] for f in result["output_files"]]
    return list(dict.fromkeys(Digest.from_wire_list(wire)))


def _pack(result: dict[str, Any]) -> bytes:
    raw: bytes = msgpack.packb(result, use_bin_type=True)
    if len(raw) > MAX_ENTRY_SIZE:
        raise InvalidArgument(f"action result is {len(raw)} bytes encoded, over {MAX_ENTRY_SIZE}")
    return raw


def _blobs_missing(missing: list[Digest]) -> FailedPrecondition:
    return FailedPrecondition(
        f"action result refers to {len(missing)} blob(s) not in the CAS (upload them first): "
        + ", ".join(map(str, missing[:5])),
        missing=[str(d) for d in missing],
    )


class ActionCache:
    """``get``/``update`` of action results keyed by action digest, checked against ``cas``.

    With ``root`` entries are records of a log under ``root`` (durable once ``update``
    returns, shared with other processes on the same directory); without it they stay
    in memory. Either way at most ``max_entries`` are kept and the least recently used
    (written or hit) go first: in memory one by one; on disk once the log passes
    ``max_entries`` records or ``max_bytes``, until a tenth of the room is free again
    (one compaction).
    """

    def __init__(
        self, cas: CAS, root: Path | None = None, *, max_entries: int = 100_000,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.cas = cas
        self.root = Path(root) if root is not None else None
        self.max_entries = max_entries
        self._memory: OrderedDict[Digest, bytes] = OrderedDict()
        self._log = EntryLog(self.root, max_entries=max_entries, max_bytes=max_bytes) if self.root else None
        self._writing = trio.Lock()  # one append or compaction at a time
        #: A tier behind this one (set by the storage part when the node has ``--backing``).
        self.backing: Backing | None = None
        self.counters: Counter[str] = Counter()

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "disk" if self.root else "memory", **self.counters}
        out["entries"] = len(self._memory) if self._log is None else self._log.current.live
        out["max_entries"] = self.max_entries
        if self._log is not None:
            out["log_bytes"] = self._log.current.scanned
        return out

    def close(self) -> None:
        """Close the log's files (a cache on disk holds a few open)."""
        if self._log is not None:
            self._log.close()
            self._log = None

    async def _load(self, key: Digest) -> dict[str, Any] | None:
        if self._log is None:
            raw = self._memory.get(key)
            if raw is not None:
                self._memory.move_to_end(key)
            await trio.lowlevel.checkpoint()
        else:
            raw = await self._read(key)
        if raw is None:
            return None
        try:
            return validate_action_result(msgpack.unpackb(raw, raw=False))
        except (ValueError, InvalidArgument, msgpack.ExtraData, msgpack.FormatError):
            return None  # a damaged entry is a miss, and the next update replaces it

    async def _read(self, key: Digest) -> bytes | None:
        """An entry's bytes from the log. A usual one (a few hundred bytes) is read on the
        event loop: a thread hop costs more CPU than the ``pread``."""
        log = self._log
        assert log is not None
        k = entry_key(key)
        await trio.lowlevel.checkpoint()
        while True:
            try:
                loc = log.locate(k)
                break
            except Replaced:
                await self._reload()
        if loc is None or loc & 0xFFFFFFFF <= INLINE_LIMIT:
            return None if loc is None else log.read(log.current, k, loc)
        loaded = log.pin()
        try:
            return await trio.to_thread.run_sync(log.read, loaded, k, loc)
        finally:
            log.unpin(loaded)

    async def _reload(self) -> None:
        """Another process compacted the log: load the new one (once, for every waiter)."""
        log = self._log
        assert log is not None
        stale = log.current
        async with self._writing:
            if log.current is stale:
                log.swap(await trio.to_thread.run_sync(log.reload))

    async def _store(self, key: Digest, result: dict[str, Any]) -> None:
        await self._write([(key, _pack(result))])

    async def _write(self, entries: Sequence[tuple[Digest, bytes]]) -> None:
        """Store encoded entries (an empty one removes); on disk, all in one thread hop."""
        if self._log is None:
            for key, raw in entries:
                if raw:
                    self._memory[key] = raw
                    self._memory.move_to_end(key)
                else:
                    self._memory.pop(key, None)
            while len(self._memory) > self.max_entries:
                self._memory.popitem(last=False)
            await trio.lowlevel.checkpoint()
            return
        if not entries:
            await trio.lowlevel.checkpoint()
            return
        log = self._log
        records = [(entry_key(key), raw) for key, raw in entries]
        async with self._writing:
            while True:
                loaded = log.pin()
                try:
                    written = await trio.to_thread.run_sync(log.append, loaded, records)
                    break
                except Replaced:
                    log.swap(await trio.to_thread.run_sync(log.reload))
                finally:
                    log.unpin(loaded)
            log.applied(loaded, *written)
            if log.over_limits():
                log.swap(await trio.to_thread.run_sync(log.compact, log.use_order()))
                self.counters["compactions"] += 1

    async def get(self, action_digest: Digest) -> dict[str, Any] | None:
        """The result stored for ``action_digest``, or None (also when one of its blobs is gone)."""
        result = await self._load(action_digest)
        if result is None and self.backing is not None:
            result = await self.backing.ac_get(action_digest)
            if result is not None:
                try:
                    result = validate_action_result(result)
                except InvalidArgument:
                    result = None
            if result is not None:
                await self._store(action_digest, result)
        if result is None:
            self.counters["misses"] += 1
            return None
        if await self.cas.find_missing(referenced_blobs(result)):
            self.counters["misses_blobs_gone"] += 1
            return None
        self.counters["hits"] += 1
        return result

    async def update(self, action_digest: Digest, result: dict[str, Any]) -> None:
        """Store ``result`` (validated; every blob it references must already be in the CAS)."""
        (error,) = await self.update_many([(action_digest, result)])
        if error is not None:
            raise error

    async def update_many(
        self, entries: Sequence[tuple[Digest, dict[str, Any]]], *, built_here: bool = False
    ) -> list[TriodeError | None]:
        """:meth:`update` for many entries at once: one lookup of their blobs, one thread hop.

        A node's engine writes its results this way, in batches behind their answers: on
        a virtual machine the thread hop costs more than the write it carries. Returns,
        per entry, None when it was stored or the error that kept it out (the others are
        stored all the same); a failing disk raises for the whole batch. ``built_here``
        says the results were made by this process's executor, in the validated shape, so
        the shape is not checked again (their blobs still are).
        """
        errors: list[TriodeError | None] = [None] * len(entries)
        checked: list[tuple[int, Digest, dict[str, Any], bytes, list[Digest]]] = []
        for i, (key, result) in enumerate(entries):
            try:
                if not built_here:
                    result = validate_action_result(result)
                checked.append((i, key, result, _pack(result), referenced_blobs(result)))
            except InvalidArgument as exc:
                errors[i] = exc
        needed = list({blob for *_, blobs in checked for blob in blobs})
        gone = set(await self.cas.find_missing(needed)) if needed else set()
        ready = []
        for i, key, result, raw, blobs in checked:
            missing = [blob for blob in blobs if blob in gone]
            if missing:
                errors[i] = _blobs_missing(missing)
            else:
                ready.append((i, key, result, raw))
        await self._write([(key, raw) for _, key, _, raw in ready])
        self.counters["updates"] += len(ready)
        if self.backing is not None:
            for i, key, result, _ in ready:
                try:
                    await self.backing.ac_update(key, result)
                except TriodeError as exc:
                    errors[i] = exc
        return errors

    async def remove(self, action_digest: Digest) -> None:
        await self._write([(action_digest, b"")])
