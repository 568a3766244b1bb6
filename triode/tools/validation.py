"""What a tool call may ask for: checked before any process starts.

A tool call names code and an environment for a process on this machine, often on
behalf of someone else (an agent, a remote client). So tool ids must be plain
identifiers, the entrypoint an existing script file, and env keys and values must be
unable to smuggle in a second variable (CR/LF/NUL) or to change how the runtime
itself loads code (LD_PRELOAD, NODE_OPTIONS, BUN_*…). Each refusal says what to fix.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import InvalidArgument, InvalidPath, TooLarge

__all__ = [
    "TOOL_ID",
    "ENV_KEY",
    "DENIED_ENV",
    "DENIED_ENV_PREFIXES",
    "ENTRYPOINT_SUFFIXES",
    "RUNTIMES",
    "validate_tool_id",
    "validate_env",
    "validate_entrypoint",
    "validate_runtime",
    "validate_timeout",
    "encode_input",
]

#: A JavaScript identifier in ASCII: what a named export can be called.
TOOL_ID = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$]{0,127}$")
ENV_KEY = re.compile(r"^[A-Z0-9_]{1,128}$")
#: Variables that change what code the runtime or the dynamic linker loads, beyond the
#: families in DENIED_ENV_PREFIXES (LD_PRELOAD, LD_LIBRARY_PATH, NODE_OPTIONS, BUN_*...).
DENIED_ENV = frozenset({
    "BASH_ENV", "ENV", "SHELLOPTS", "PS4", "IFS", "GLIBC_TUNABLES", "MALLOC_CONF", "PYTHONPATH",
    "UV_THREADPOOL_SIZE", "GCONV_PATH", "LOCPATH", "HOSTALIASES", "RESOLV_HOST_CONF", "NLSPATH",
    "SSL_CERT_FILE", "SSL_CERT_DIR",
})  # fmt: skip
#: OPENSSL_CONF and OPENSSL_MODULES make node load a config that can load shared libraries.
DENIED_ENV_PREFIXES = ("LD_", "DYLD_", "BUN_", "NODE_", "NPM_CONFIG_", "TRIODE_", "OPENSSL_")
ENTRYPOINT_SUFFIXES = (".js", ".mjs", ".cjs", ".ts", ".mts", ".cts")
RUNTIMES = ("bun", "node")
MAX_ENV_VALUE = 32 * 1024
MAX_ENV_ITEMS = 256


def validate_tool_id(tool: Any) -> str:
    if not isinstance(tool, str) or not TOOL_ID.match(tool):
        raise InvalidArgument(
            f"tool id {tool!r} is not valid: use the name of an export, a JavaScript identifier "
            "of letters, digits, _ and $ (not starting with a digit, at most 128 characters)",
            field="tool",
        )
    return tool


def validate_env(env: Mapping[str, Any] | None) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidArgument(f"env must be a map of names to strings, got {type(env).__name__}", field="env")
    if len(env) > MAX_ENV_ITEMS:
        raise InvalidArgument(
            f"env has {len(env)} variables; at most {MAX_ENV_ITEMS} are allowed", field="env"
        )
    clean: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_KEY.match(key):
            raise InvalidArgument(
                f"env key {key!r} is not valid: use upper-case letters, digits and _ (^[A-Z0-9_]+$)",
                field="env",
            )
        if key in DENIED_ENV or key.startswith(DENIED_ENV_PREFIXES):
            raise InvalidArgument(
                f"env key {key} is not allowed for tools: it changes how the runtime loads code "
                f"(denied: {', '.join(p + '*' for p in DENIED_ENV_PREFIXES)}, "
                f"{', '.join(sorted(DENIED_ENV))})",
                field="env",
                key=key,
            )
        if not isinstance(value, str):
            raise InvalidArgument(
                f"env value of {key} must be a string, got {type(value).__name__}", field="env"
            )
        if any(c in value for c in "\r\n\0"):
            raise InvalidArgument(
                f"env value of {key} holds a CR, LF or NUL character; remove it", field="env"
            )
        if len(value) > MAX_ENV_VALUE:
            raise InvalidArgument(f"env value of {key} is over {MAX_ENV_VALUE} characters", field="env")
        clean[key] = value
    return clean


def validate_entrypoint(entrypoint: Any) -> Path:
    """The entrypoint as an absolute, resolved path to an existing script file."""
    if not isinstance(entrypoint, (str, os.PathLike)):
        raise InvalidArgument("entrypoint must be a path to a .js or .ts file", field="entrypoint")
    text = os.fspath(entrypoint)
    if not text or "\0" in text:
        raise InvalidPath(f"entrypoint {text!r} is not a usable path", field="entrypoint")
    path = Path(text)
    if not path.is_absolute():
        raise InvalidPath(
            f"entrypoint {text!r} must be an absolute path on the node's machine", field="entrypoint"
        )
    if path.suffix not in ENTRYPOINT_SUFFIXES:
        raise InvalidPath(
            f"entrypoint {text} must end in one of {', '.join(ENTRYPOINT_SUFFIXES)}", field="entrypoint"
        )
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise InvalidPath(f"entrypoint {text} does not exist", field="entrypoint") from None
    if not resolved.is_file():
        raise InvalidPath(f"entrypoint {text} is not a regular file", field="entrypoint")
    return resolved


def validate_runtime(runtime: Any) -> str:
    if runtime not in RUNTIMES:
        raise InvalidArgument(
            f"runtime {runtime!r} is not known: use one of {', '.join(RUNTIMES)}", field="runtime"
        )
    return runtime


def validate_timeout(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or math.isnan(timeout)
        or timeout <= 0
    ):
        raise InvalidArgument(
            f"timeout must be a positive number of seconds, got {timeout!r}", field="timeout"
        )
    return float(timeout)


def encode_input(value: Any, limit: int) -> bytes:
    """The call's input as compact JSON, refused when it is not JSON or over ``limit`` bytes."""
    try:
        data = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"tool input must be a JSON value: {exc}", field="input") from None
    if len(data) > limit:
        raise TooLarge(
            f"tool input is {len(data)} bytes of JSON; the limit is {limit}", size=len(data), limit=limit
        )
    return data
