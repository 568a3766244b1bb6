"""JavaScript and TypeScript tools under bun or node, served by warm worker processes.

A tool is a named export (or a key of the default export object) of an entrypoint
file: called with JSON input, it returns JSON. :func:`open_tool_pool` keeps workers
warm per (runtime, entrypoint, env); the node part serves ``tools.call`` from one.
"""

from __future__ import annotations

from .pool import ToolPool, ToolPoolConfig, open_tool_pool
from .runtimes import Runtime, find_runtime
from .worker import Worker

__all__ = ["ToolPool", "ToolPoolConfig", "open_tool_pool", "Runtime", "find_runtime", "Worker"]
