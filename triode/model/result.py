"""What an execution is asked for and what it returns, as typed values.

* :class:`ExecuteRequest`: the arguments of ``execute`` (and of its aliases and
  relatives, see :meth:`ExecuteRequest.from_wire`), parsed once.
* :class:`ActionResult` and its parts (:class:`CapturedStream`, :class:`OutputFile`,
  :class:`OutputDirectory`, :class:`OutputSymlink`, :class:`Timings`): an action's
  result, as the action cache stores it (docs/protocol.md, "Methods: ac").
* :class:`ExecuteOutcome`: the answer to an execute, the result plus the action's
  digest and whether it came from the cache.

Each ``to_wire()`` gives exactly the msgpack map of the protocol, keys in the order the
action cache has always stored them, so an entry encodes to the same bytes as before
these types existed. ``from_wire()`` is the one place a result from outside the process
(the wire, the disk) is checked: a bad field raises :class:`InvalidArgument` naming it
(``details.field``) and saying what it must be. Values built in Python (the executor
builds its results directly) are trusted, not checked again: build from a map with
``from_wire`` to have it checked.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import InvalidArgument, InvalidPath
from .action import Action, parse_wire_action
from .digest import EMPTY, Digest

__all__ = [
    "ActionResult",
    "CapturedStream",
    "OutputFile",
    "OutputDirectory",
    "OutputSymlink",
    "Timings",
    "ExecuteOutcome",
    "ExecuteRequest",
    "EMPTY_CAPTURE",
    "MAX_PRIORITY",
]

_T = TypeVar("_T")

#: The longest path a result may name.
_MAX_PATH = 4096
#: ``priority`` runs from -MAX_PRIORITY to MAX_PRIORITY.
MAX_PRIORITY = 1000


# -- checks (what from_wire uses) ---------------------------------------------------------


def _fail(field: str, want: str, got: Any) -> InvalidArgument:
    text = repr(got)
    if len(text) > 80:
        text = text[:77] + "..."
    return InvalidArgument(f"action result field {field!r} must be {want}, got {text}", field=field)


def _required(field: str) -> InvalidArgument:
    return InvalidArgument(f"action result field {field!r} is required", field=field)


# Each check takes the field's name in two pieces (``stdout``, ``truncated``), joined only
# when the check fails: the usual result is checked without formatting a string.


def _name(field: str, key: str) -> str:
    return f"{field}.{key}" if key else field


def _int(value: Any, field: str, key: str = "") -> int:
    if type(value) is not int:
        raise _fail(_name(field, key), "an integer", value)
    return value


def _bool(value: Any, field: str, key: str = "") -> bool:
    if type(value) is not bool:
        raise _fail(_name(field, key), "true or false", value)
    return value


def _seconds(value: Any, field: str, key: str = "") -> float:
    if type(value) is float:
        if 0.0 <= value < math.inf:  # (false for NaN)
            return value
    elif type(value) is int and 0 <= value < 2**63:
        return float(value)
    raise _fail(_name(field, key), "a non-negative number of seconds", value)


def _path(value: Any, field: str, key: str = "") -> str:
    if type(value) is not str or not value or len(value) > _MAX_PATH:
        raise _fail(_name(field, key), "a relative '/'-separated path", value)
    if value[0] == "/" or "\0" in value or not _BAD_PARTS.isdisjoint(value.split("/")):
        want = "a relative '/'-separated path without '.', '..' or empty parts"
        raise _fail(_name(field, key), want, value)
    return value


_BAD_PARTS = frozenset(("", ".", ".."))


def _digest(value: Any, field: str, key: str = "") -> Digest:
    try:
        return Digest.from_wire(value)
    except InvalidArgument as exc:
        name = _name(field, key)
        raise InvalidArgument(f"action result field {name!r}: {exc}", field=name) from None


def _str(value: Any, field: str, want: str) -> str:
    if type(value) is not str:
        raise _fail(field, want, value)
    return value


def _entries(m: dict[str, Any], field: str, parse: Callable[[Any, str], _T]) -> tuple[_T, ...]:
    """The list ``m[field]`` (absent: empty), each item parsed as ``field[i]``."""
    value = m.get(field, ())
    if type(value) is not list:
        if value == ():
            return ()
        raise _fail(field, "a list", value)
    return tuple([parse(item, f"{field}[{i}]") for i, item in enumerate(value)]) if value else ()


def _map(value: Any, field: str, keys: tuple[str, ...]) -> dict[str, Any]:
    if type(value) is not dict:
        raise _fail(field, f"a map with {', '.join(keys)}", value)
    allowed = _KEYSETS.get(keys)
    if allowed is None:
        allowed = _KEYSETS[keys] = frozenset(keys)
    if not value.keys() <= allowed:
        extra = sorted(map(str, value.keys() - allowed))
        raise InvalidArgument(f"action result field {field!r} has unknown keys {extra}", field=field)
    return value


_KEYSETS: dict[tuple[str, ...], frozenset[str]] = {}


# -- the parts of a result ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CapturedStream:
    """The command's stdout or stderr, stored in the CAS: only its head past the node's cap."""

    digest: Digest = EMPTY
    #: The stream was longer than the node's output cap: ``digest`` holds its head only.
    truncated: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"digest": self.digest.to_wire(), "truncated": self.truncated}

    @classmethod
    def from_wire(cls, value: Any, field: str = "stdout") -> CapturedStream:
        m = _map(value, field, ("digest", "truncated"))
        if "digest" not in m:
            raise _required(f"{field}.digest")
        truncated = _bool(m.get("truncated", False), field, "truncated")
        wire = m["digest"]
        if not truncated and wire == _EMPTY_WIRE:  # the usual stderr (and often stdout)
            return EMPTY_CAPTURE
        return cls(_digest(wire, field, "digest"), truncated)


#: Nothing captured.
EMPTY_CAPTURE = CapturedStream()
_EMPTY_WIRE = EMPTY.to_wire()


@dataclass(frozen=True, slots=True)
class OutputFile:
    """A file the action left at an output path (or below an output directory)."""

    path: str
    digest: Digest
    executable: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "digest": self.digest.to_wire(), "executable": self.executable}

    @classmethod
    def from_wire(cls, value: Any, field: str = "output_files[0]") -> OutputFile:
        m = _map(value, field, ("path", "digest", "executable"))
        for key in ("path", "digest"):
            if key not in m:
                raise _required(f"{field}.{key}")
        return cls(
            _path(m["path"], field, "path"),
            _digest(m["digest"], field, "digest"),
            _bool(m.get("executable", False), field, "executable"),
        )


@dataclass(frozen=True, slots=True)
class OutputDirectory:
    """A directory among the outputs (every one is listed, so empty ones come back)."""

    path: str

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path}

    @classmethod
    def from_wire(cls, value: Any, field: str = "output_directories[0]") -> OutputDirectory:
        m = _map(value, field, ("path",))
        return cls(_path(m.get("path"), field, "path"))


@dataclass(frozen=True, slots=True)
class OutputSymlink:
    """A symlink among the outputs, kept as a link (its ``target`` as the action wrote it)."""

    path: str
    target: str

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, "target": self.target}

    @classmethod
    def from_wire(cls, value: Any, field: str = "output_symlinks[0]") -> OutputSymlink:
        m = _map(value, field, ("path", "target"))
        target = m.get("target")
        if type(target) is not str or not target or "\0" in target:
            raise _fail(f"{field}.target", "a non-empty string without NUL", target)
        path = _path(m.get("path"), field, "path")
        # As execute collects them (model.paths.check_link_target): never out of the root.
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        if target[0] == "/" or joined == ".." or joined.startswith("../"):
            where = "is absolute" if target[0] == "/" else "points out of the input root"
            raise InvalidPath(
                f"action result field '{field}.target': the symlink {path!r} -> {target!r} {where}; "
                "an output symlink stays inside the input root",
                field=f"{field}.target", path=path, target=target,
            )
        return cls(path, target)


_TIMINGS = ("queued", "staging", "running", "uploading")


@dataclass(frozen=True, slots=True)
class Timings:
    """Seconds spent in each step of an execution."""

    #: Waiting for a slot (admission).
    queued: float = 0.0
    #: From the cache miss to the process start, inputs included.
    staging: float = 0.0
    #: The process itself.
    running: float = 0.0
    #: Storing the outputs and captured streams in the CAS.
    uploading: float = 0.0

    def to_wire(self) -> dict[str, float]:
        return {"queued": self.queued, "staging": self.staging, "running": self.running,
                "uploading": self.uploading}

    @classmethod
    def from_wire(cls, value: Any, field: str = "timings") -> Timings:
        m = _map(value, field, _TIMINGS)
        get = m.get
        return cls(_seconds(get("queued", 0.0), field, "queued"),
                   _seconds(get("staging", 0.0), field, "staging"),
                   _seconds(get("running", 0.0), field, "running"),
                   _seconds(get("uploading", 0.0), field, "uploading"))


NO_TIMINGS = Timings()


# -- the result ---------------------------------------------------------------------------

_FIELDS = ("exit_code", "signal", "timed_out", "stdout", "stderr", "output_files", "output_symlinks",
           "output_directories", "missing_outputs", "timings", "node", "executed_at")


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What running an action gave: how it ended, its captured streams, its outputs.

    Only ``exit_code`` is required; the rest defaults to nothing (no output, zero
    timings). Paths are relative and ``/``-separated, as in the action.
    """

    #: The exit status, or ``128 + signal`` when a signal ended the process.
    exit_code: int
    #: The signal that ended it (9 after a timeout's SIGKILL, 15 when SIGTERM was enough).
    signal: int | None = None
    timed_out: bool = False
    stdout: CapturedStream = EMPTY_CAPTURE
    stderr: CapturedStream = EMPTY_CAPTURE
    output_files: tuple[OutputFile, ...] = ()
    output_symlinks: tuple[OutputSymlink, ...] = ()
    output_directories: tuple[OutputDirectory, ...] = ()
    #: Output paths the action did not produce (or that are neither file, directory nor link).
    missing_outputs: tuple[str, ...] = ()
    timings: Timings = NO_TIMINGS
    #: The id of the node that ran it.
    node: str = ""
    #: When it ran, unix time.
    executed_at: float = 0.0

    @property
    def output_count(self) -> int:
        """Files, symlinks and directories among the outputs."""
        return len(self.output_files) + len(self.output_symlinks) + len(self.output_directories)

    def blobs(self) -> list[Digest]:
        """The blobs this result needs in the CAS, once each: stdout, stderr, every output file."""
        return list(dict.fromkeys([self.stdout.digest, self.stderr.digest,
                                   *[f.digest for f in self.output_files]]))

    def to_wire(self) -> dict[str, Any]:
        """The protocol's map (and the action cache's entry), fields in their stored order."""
        stdout, stderr, timings = self.stdout, self.stderr, self.timings
        return {
            "exit_code": self.exit_code,
            "signal": self.signal,
            "timed_out": self.timed_out,
            "stdout": {"digest": stdout.digest.to_wire(), "truncated": stdout.truncated},
            "stderr": {"digest": stderr.digest.to_wire(), "truncated": stderr.truncated},
            "output_files": [f.to_wire() for f in self.output_files],
            "output_symlinks": [s.to_wire() for s in self.output_symlinks],
            "output_directories": [{"path": d.path} for d in self.output_directories],
            "missing_outputs": list(self.missing_outputs),
            "timings": {"queued": timings.queued, "staging": timings.staging,
                        "running": timings.running, "uploading": timings.uploading},
            "node": self.node,
            "executed_at": self.executed_at,
        }

    @classmethod
    def from_wire(cls, value: Any) -> ActionResult:
        """Check a result map and build it; absent optional fields get their defaults.

        A wrong field raises :class:`InvalidArgument` naming it (``details.field``), as
        does an unknown key.
        """
        m = _map(value, "result", _FIELDS)
        if "exit_code" not in m:
            raise _required("exit_code")
        get = m.get
        sig = get("signal")
        return cls(  # positional, in field order: cheaper than keywords
            _int(m["exit_code"], "exit_code"),
            None if sig is None else _int(sig, "signal"),
            _bool(get("timed_out", False), "timed_out"),
            CapturedStream.from_wire(m["stdout"], "stdout") if "stdout" in m else EMPTY_CAPTURE,
            CapturedStream.from_wire(m["stderr"], "stderr") if "stderr" in m else EMPTY_CAPTURE,
            _entries(m, "output_files", OutputFile.from_wire),
            _entries(m, "output_symlinks", OutputSymlink.from_wire),
            _entries(m, "output_directories", OutputDirectory.from_wire),
            _entries(m, "missing_outputs", _path),
            Timings.from_wire(m["timings"]) if "timings" in m else NO_TIMINGS,
            _str(get("node", ""), "node", "a node id string"),
            _seconds(get("executed_at", 0.0), "executed_at"),
        )


# -- execute ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExecuteOutcome:
    """The answer to an execute: the action's digest, whether it came from the cache, the result."""

    action_digest: Digest
    cached: bool
    result: ActionResult
    #: The scheduler's operation that answered (``NODE/NUMBER``), when one did.
    operation: str | None = None

    @property
    def exit_code(self) -> int:
        return self.result.exit_code

    @property
    def timed_out(self) -> bool:
        return self.result.timed_out

    def to_wire(self) -> dict[str, Any]:
        wire = {"action_digest": self.action_digest.to_wire(), "cached": self.cached,
                "result": self.result.to_wire()}
        if self.operation is not None:
            wire["operation"] = self.operation
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> ExecuteOutcome:
        """Check and build an ``execute`` reply. Other keys are ignored."""
        if type(value) is not dict or not {"action_digest", "cached", "result"} <= value.keys():
            text = repr(value)
            text = text if len(text) <= 80 else text[:77] + "..."
            raise InvalidArgument(f"an execute outcome is {{action_digest, cached, result}}, got {text}")
        cached = value["cached"]
        if type(cached) is not bool:
            raise InvalidArgument(f"execute outcome field 'cached' must be true or false, got {cached!r}",
                                  field="cached")
        operation = value.get("operation")
        if operation is not None and type(operation) is not str:
            raise InvalidArgument(f"execute outcome field 'operation' must be a string, got {operation!r}",
                                  field="operation")
        return cls(Digest.from_wire(value["action_digest"]), cached, ActionResult.from_wire(value["result"]),
                   operation)


#: Arguments each execute method takes besides ``action`` and ``skip_cache``.
_EXTRA_ARGS: dict[str, tuple[str, ...]] = {
    "engine.execute": (),
    "sched.forward": ("priority", "origin"),
}
_SCHEDULED_ARGS = ("priority",)  # execute, sched.execute, sched.submit


@dataclass(frozen=True, slots=True)
class ExecuteRequest:
    """What an execute call asks for: the action, and how to treat it."""

    action: Action
    #: Do not look the action up (its result is still stored when it is cacheable).
    skip_cache: bool = False
    #: Higher runs first, -1000..1000 (the scheduler's methods only).
    priority: int = 0
    #: The id of the node that forwarded it (``sched.forward`` only).
    origin: str | None = None
    #: The action as it came on the wire, to forward it unchanged (None: ``action.to_wire()``).
    action_wire: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def from_wire(cls, args: Any, *, method: str = "execute") -> ExecuteRequest:
        """Parse the arguments of ``method``: ``{action, skip_cache?}`` plus, for the
        scheduler's ``execute``/``sched.execute``/``sched.submit``, ``priority?``, and for
        ``sched.forward`` also ``origin``. Anything else is :class:`InvalidArgument`; a bad
        action raises what :meth:`Action.from_wire` raises (``INVALID_PATH`` …)."""
        extra = _EXTRA_ARGS.get(method, _SCHEDULED_ARGS)
        if type(args) is not dict or "action" not in args:
            shape = "".join(f", {k}?: {'int' if k == 'priority' else 'str'}" for k in extra)
            raise InvalidArgument(f"{method} takes {{action: {{...}}, skip_cache?: bool{shape}}}")
        unknown = args.keys() - {"action", "skip_cache", *extra}
        if unknown:
            raise InvalidArgument(f"{method} got unknown arguments: {', '.join(sorted(map(str, unknown)))}")
        priority = args.get("priority", 0)
        if type(priority) is not int or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise InvalidArgument(
                f"priority must be an integer from {-MAX_PRIORITY} to {MAX_PRIORITY}, got {priority!r}"
            )
        origin = args.get("origin")
        if origin is not None and type(origin) is not str:
            raise InvalidArgument(f"{method} origin must be a node id (a string), got {origin!r}")
        skip_cache = args.get("skip_cache", False)
        if type(skip_cache) is not bool:
            raise InvalidArgument(f"{method} skip_cache must be a bool, got {skip_cache!r}")
        wire = args["action"]
        return cls(parse_wire_action(wire), skip_cache, priority, origin, wire)
