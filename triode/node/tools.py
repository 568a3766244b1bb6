"""The node's tools part: a tool pool owned by the node, served as ``tools.call`` and ``tools.list``.

Entrypoints are paths on the node's machine. The caller's deadline and cancellation
arrive through the wire layer as this handler's cancel scope, so a client that gives up
gets the worker killed here exactly as a local caller would.

Workers run in the sandbox the node's actions run in (the engine's, decided when it
started): without it, an action could write a script anywhere the node can and a
``tools.call`` would run it outside every sandbox, store and all within its reach.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from ..engine.sandbox import Sandbox
from ..errors import InvalidArgument
from ..tools.pool import ToolPool, ToolPoolConfig, open_tool_pool
from ..wire.connection import IncomingCall

if TYPE_CHECKING:
    from .node import Node

__all__ = ["ToolsPart", "open_tools", "pool_config_from_env"]


def pool_config_from_env() -> ToolPoolConfig:
    """Pool settings a node operator can change without code: TRIODE_TOOL_POOL_SIZE, TRIODE_TOOL_RUNTIME."""
    options: dict[str, Any] = {}
    if size := os.environ.get("TRIODE_TOOL_POOL_SIZE"):
        if not size.isdigit() or int(size) < 1:
            raise InvalidArgument(f"TRIODE_TOOL_POOL_SIZE must be a whole number of workers, got {size!r}")
        options["size"] = int(size)
    if os.environ.get("TRIODE_TOOL_RUNTIME"):
        options["runtime"] = os.environ["TRIODE_TOOL_RUNTIME"]
    return ToolPoolConfig(**options)


def _args(call: IncomingCall, allowed: set[str]) -> dict[str, Any]:
    args = call.args
    if not isinstance(args, dict):
        raise InvalidArgument(f"{call.method} takes a map of arguments, got {type(args).__name__}")
    unknown = set(args) - allowed
    if unknown:
        raise InvalidArgument(f"{call.method} does not take {', '.join(sorted(map(str, unknown)))}")
    if "entrypoint" not in args:
        raise InvalidArgument(f"{call.method} needs an entrypoint (a path on the node's machine)")
    return args


class ToolsPart:
    name = "tools"

    def __init__(self, pool: ToolPool) -> None:
        self.pool = pool

    def info(self) -> dict[str, Any]:
        return self.pool.info()

    async def handle_call(self, call: IncomingCall) -> dict[str, Any]:
        args = _args(call, {"entrypoint", "tool", "input", "runtime", "env", "timeout", "one_shot"})
        one_shot = args.get("one_shot")
        if one_shot is not None and not isinstance(one_shot, bool):
            raise InvalidArgument("one_shot must be true or false")
        output = await self.pool.call(
            args["entrypoint"],
            args.get("tool"),  # type: ignore[arg-type]  # validated by the pool
            args.get("input"),
            runtime=args.get("runtime"),
            env=args.get("env"),
            timeout=args.get("timeout"),
            one_shot=one_shot,
        )
        return {"output": output}

    async def handle_list(self, call: IncomingCall) -> dict[str, Any]:
        args = _args(call, {"entrypoint", "runtime", "env"})
        tools = await self.pool.list_tools(
            args["entrypoint"], runtime=args.get("runtime"), env=args.get("env")
        )
        return {"tools": tools}


def _sandboxed(config: ToolPoolConfig, node: Node) -> ToolPoolConfig:
    """``config`` with the workers in the engine's sandbox, when it has one."""
    engine = node.parts.get("engine")
    sandbox = getattr(getattr(engine, "executor", None), "sandbox", None)
    if not isinstance(sandbox, Sandbox):
        return dataclasses.replace(config, isolation="none: this node has no engine to take a sandbox from")
    if not sandbox.isolated:
        return dataclasses.replace(config, isolation=f"the actions' sandbox, which is none: {sandbox.detail}")
    return dataclasses.replace(config, sandbox=sandbox.around,
                               isolation=f"the actions' sandbox: {sandbox.detail}")


@asynccontextmanager
async def open_tools(node: Node) -> AsyncIterator[ToolsPart]:
    """The node part: its pool closes (every worker stopped) when the node does."""
    async with open_tool_pool(_sandboxed(pool_config_from_env(), node)) as pool:
        part = ToolsPart(pool)
        node.router.add("tools.call", part.handle_call)
        node.router.add("tools.list", part.handle_list)
        yield part
