"""An action: a command, the input tree it sees, and the outputs it leaves, named by a digest.

The digest is the SHA-256 of a canonical msgpack encoding (a fixed-order list, maps as
sorted pairs, paths normalized, timeout as a float), so the same action gives the same
digest on every machine and in every Python: it is the action cache's key. Anything
that can change what the command does is in it: argv, environment, working directory,
every input's digest and executable bit, the output paths, the timeout, the platform
and ``do_not_cache``. Input symlinks (``symlinks``) are encoded only when there are any,
so the digest of every action without them is what it always was.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import msgpack

from ..errors import InvalidArgument, InvalidDigest, InvalidPath
from .digest import Digest
from .paths import check_link_target, check_relative, parents

__all__ = ["Action", "Input", "ACTION_VERSION", "parse_wire_action"]

#: Bumped whenever the canonical encoding changes, so old cache entries stop matching.
ACTION_VERSION = 1


class Input(NamedTuple):
    """One input file: its content and whether it is executable."""

    digest: Digest
    executable: bool = False


def _str_map(value: object, what: str) -> dict[str, str]:
    if not value and type(value) is dict:  # the common case, without the ABC check
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(
            f"action {what} must be a map of strings to strings, got {type(value).__name__}"
        )
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise InvalidArgument(f"action {what} must map strings to strings, got {k!r}: {v!r}")
        if "\0" in k or "\0" in v:
            raise InvalidArgument(f"action {what} entry {k!r} contains a NUL byte")
        out[k] = v
    return dict(sorted(out.items()))


def _paths(value: object, what: str) -> tuple[str, ...]:
    if not value and type(value) in (tuple, list):  # the common case, without the ABC check
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise InvalidArgument(f"action {what} must be a list of paths, got {value!r}")
    return tuple(sorted({check_relative(p, f"{what[:-1]}") for p in value}))


@dataclass(frozen=True)
class Action:
    """What to run and on what. Build one directly or with :meth:`from_wire`; it validates itself."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    #: Working directory, relative to the input root ("" is the root itself).
    cwd: str = ""
    inputs: Mapping[str, Input] = field(default_factory=dict)
    #: Directories to create even when no input lives in them.
    directories: tuple[str, ...] = ()
    #: Paths to collect after the run: files, directories (recursively) or symlinks.
    outputs: tuple[str, ...] = ()
    #: Seconds before the process group is stopped; None for no limit.
    timeout: float | None = None
    platform: Mapping[str, str] = field(default_factory=dict)
    do_not_cache: bool = False
    #: Symlinks in the input tree: path to target, a relative target that stays inside the
    #: root (an REAPI input tree has them). Kept as links when staged.
    symlinks: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        argv = self.argv
        if type(argv) is not tuple:
            if isinstance(argv, (str, bytes)) or not isinstance(argv, Iterable):
                raise InvalidArgument(f"action argv must be a list of strings, got {argv!r}")
            argv = tuple(argv)
        if not argv:
            raise InvalidArgument("action argv is empty: give the program to run and its arguments")
        for arg in argv:
            if not isinstance(arg, str) or "\0" in arg:
                raise InvalidArgument(f"action argv entries must be strings without NUL, got {arg!r}")
        set_(self, "argv", argv)
        env = _str_map(self.env, "env")
        for k in env:
            if not k or "=" in k:
                raise InvalidArgument(f"action env name {k!r} is not a valid variable name")
        set_(self, "env", env)
        set_(self, "platform", _str_map(self.platform, "platform"))
        set_(self, "cwd", check_relative(self.cwd, "action cwd", allow_root=True))
        inputs: dict[str, Input] = {}
        if type(self.inputs) is not dict and not isinstance(self.inputs, Mapping):
            raise InvalidArgument("action inputs must map paths to (digest, executable)")
        for path, entry in self.inputs.items():
            check_relative(path, "input")
            if isinstance(entry, Digest):
                entry = Input(entry)
            elif not isinstance(entry, Input):
                if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                    raise InvalidArgument(f"input {path!r} must be (digest, executable), got {entry!r}")
                entry = Input(*entry)
            if not isinstance(entry.digest, Digest) or not isinstance(entry.executable, bool):
                raise InvalidArgument(f"input {path!r} must be (Digest, bool), got {entry!r}")
            inputs[path] = entry
        set_(self, "inputs", dict(sorted(inputs.items())))
        set_(self, "directories", _paths(self.directories, "directories"))
        set_(self, "outputs", _paths(self.outputs, "outputs"))
        if self.timeout is not None:
            if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)):
                raise InvalidArgument(
                    f"action timeout must be seconds (a number) or None, got {self.timeout!r}"
                )
            if math.isnan(self.timeout) or self.timeout <= 0 or math.isinf(self.timeout):
                raise InvalidArgument(
                    f"action timeout must be a positive finite number, got {self.timeout!r}"
                )
            set_(self, "timeout", float(self.timeout))
        if not isinstance(self.do_not_cache, bool):
            raise InvalidArgument(f"action do_not_cache must be a bool, got {self.do_not_cache!r}")
        if self.symlinks or type(self.symlinks) is not dict:
            set_(self, "symlinks", _symlinks(self.symlinks))
        self._check_tree()

    def _check_tree(self) -> None:
        """A path cannot be both a file and a directory of the input tree (or a symlink)."""
        if not self.inputs and not self.symlinks:
            return  # no file, so no clash
        dirs = set(self.directories)
        for path in self.inputs:
            dirs.update(parents(path))
        if self.cwd:
            dirs.add(self.cwd)
            dirs.update(parents(self.cwd))
        for path in self.directories:
            dirs.update(parents(path))
        for path in self.symlinks:
            dirs.update(parents(path))
        clash = dirs.intersection(self.inputs)
        if clash:
            path = min(clash)
            raise InvalidPath(f"input {path!r} is a file but other paths put it as a directory", path=path)
        if self.symlinks:
            clash = dirs.intersection(self.symlinks) | set(self.inputs).intersection(self.symlinks)
            if clash:
                path = min(clash)
                raise InvalidPath(f"input symlink {path!r} is also a file or a directory of the input tree",
                                  path=path)

    # -- wire and digest -------------------------------------------------------------------

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "argv": list(self.argv),
            "env": dict(self.env),
            "cwd": self.cwd,
            "inputs": [[p, i.digest.to_wire(), i.executable] for p, i in self.inputs.items()],
            "directories": list(self.directories),
            "outputs": list(self.outputs),
            "timeout": self.timeout,
            "platform": dict(self.platform),
            "do_not_cache": self.do_not_cache,
        }
        if self.symlinks:
            wire["symlinks"] = [[p, t] for p, t in self.symlinks.items()]
        return wire

    @classmethod
    def from_wire(cls, value: Any) -> Action:
        if type(value) is not dict and not isinstance(value, Mapping):
            raise InvalidArgument(f"an action is a map, got {type(value).__name__}")
        unknown = value.keys() - _FIELDS
        if unknown:
            raise InvalidArgument(f"unknown action fields: {', '.join(sorted(map(str, unknown)))}")
        if "argv" not in value:
            raise InvalidArgument("action has no argv: give the program to run and its arguments")
        raw_inputs = value.get("inputs", [])
        if not isinstance(raw_inputs, (list, tuple)):
            raise InvalidArgument("action inputs must be a list of [path, [hash, size], executable]")
        inputs: dict[str, Input] = {}
        for entry in raw_inputs:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise InvalidArgument(f"an action input is [path, [hash, size], executable], got {entry!r}")
            path, digest, executable = entry
            check_relative(path, "input")
            if path in inputs:
                raise InvalidPath(f"input {path!r} is listed twice", path=path)
            try:
                inputs[path] = Input(Digest.from_wire(digest), executable)
            except InvalidDigest as exc:
                raise InvalidDigest(f"input {path!r}: {exc}") from None
        return cls(
            argv=value["argv"],
            env=value.get("env", {}),
            cwd=value.get("cwd", ""),
            inputs=inputs,
            directories=value.get("directories", ()),
            outputs=value.get("outputs", ()),
            timeout=value.get("timeout"),
            platform=value.get("platform", {}),
            do_not_cache=value.get("do_not_cache", False),
            symlinks=_wire_symlinks(value.get("symlinks", [])),
        )

    def canonical(self) -> bytes:
        """The bytes the digest is taken of: a fixed-order list, maps as sorted pairs (input
        symlinks last, and only when there are any)."""
        fields = [
            ACTION_VERSION,
            list(self.argv),
            [[k, v] for k, v in self.env.items()],
            self.cwd,
            [[p, i.digest.hash, i.digest.size, i.executable] for p, i in self.inputs.items()],
            list(self.directories),
            list(self.outputs),
            self.timeout,
            [[k, v] for k, v in self.platform.items()],
            self.do_not_cache,
        ]
        if self.symlinks:
            fields.append([[p, t] for p, t in self.symlinks.items()])
        return msgpack.packb(fields, use_bin_type=True, use_single_float=False)

    def digest(self) -> Digest:
        """SHA-256 of :meth:`canonical`: the action's name in the action cache."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            cached = Digest.of(self.canonical())
            object.__setattr__(self, "_digest", cached)
        return cached

    def __hash__(self) -> int:
        return hash(self.digest())

    def input_digests(self) -> frozenset[Digest]:
        """Every blob the inputs name, once each (worked out once per action)."""
        cached = self.__dict__.get("_input_digests")
        if cached is None:
            cached = frozenset(i.digest for i in self.inputs.values())
            object.__setattr__(self, "_input_digests", cached)
        return cached


_FIELDS = {"argv", "env", "cwd", "inputs", "directories", "outputs", "timeout", "platform", "do_not_cache",
           "symlinks"}

#: The longest input symlink target.
MAX_LINK_TARGET = 4096


def _symlinks(value: object) -> dict[str, str]:
    """Input symlinks, checked: relative paths, and targets that stay inside the input root."""
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"action symlinks must map paths to targets, got {type(value).__name__}")
    out: dict[str, str] = {}
    for path, target in value.items():
        check_relative(path, "input symlink")
        if type(target) is not str or not target or "\0" in target or len(target) > MAX_LINK_TARGET:
            raise InvalidPath(f"input symlink {path!r} needs a target: a non-empty string without NUL, "
                              f"at most {MAX_LINK_TARGET} characters", path=path)
        check_link_target(Path("."), path, target, "input symlink")
        out[path] = target
    return dict(sorted(out.items()))


def _wire_symlinks(value: Any) -> dict[str, str]:
    if not isinstance(value, (list, tuple)):
        raise InvalidArgument("action symlinks must be a list of [path, target]")
    out: dict[str, str] = {}
    for entry in value:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise InvalidArgument(f"an action symlink is [path, target], got {entry!r}")
        path, target = entry
        if path in out:
            raise InvalidPath(f"input symlink {path!r} is listed twice", path=path)
        out[path] = target
    return out


#: Parsed actions kept by their wire encoding (see parse_wire_action), and the largest
#: encoding kept: at most PARSED_ACTIONS * PARSED_MAX_BYTES bytes of keys.
PARSED_ACTIONS = 256
PARSED_MAX_BYTES = 16 * 1024
_parsed: OrderedDict[bytes, Action] = OrderedDict()


def parse_wire_action(value: Any) -> Action:
    """:meth:`Action.from_wire`, remembered for the actions seen last.

    A build asks for the same actions again and again (every cache hit is one), and
    validating one and taking its digest costs more than encoding its wire form once
    more: equal encodings are equal values, so they parse to the same (immutable)
    Action, digest included. Bounded in entries and in key size.
    """
    try:
        key = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return Action.from_wire(value)  # not plain msgpack data: from_wire says what is wrong
    action = _parsed.get(key)
    if action is not None:
        _parsed.move_to_end(key)
        return action
    action = Action.from_wire(value)
    if len(key) <= PARSED_MAX_BYTES:
        action.digest()  # worked out once, here, for every later use
        _parsed[key] = action
        if len(_parsed) > PARSED_ACTIONS:
            _parsed.popitem(last=False)
    return action
