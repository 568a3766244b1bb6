"""``client.tools``: tool calls on a node, remote or embedded, with the same API."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..wire.connection import Connection

__all__ = ["ToolsClient"]


class ToolsClient:
    """Calls tools in the node's warm workers. Entrypoints are paths on the node's machine."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    async def call(
        self,
        entrypoint: str | os.PathLike[str],
        tool: str,
        input: Any = None,
        *,
        runtime: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - enforced on the node, which kills the worker
        one_shot: bool | None = None,
    ) -> Any:
        """Call ``tool`` of ``entrypoint`` with JSON ``input`` and return its JSON result.

        ``timeout`` is enforced by the node (the worker is killed and DeadlineExceeded
        raised); cancelling this call cancels it on the node, which kills the worker too.
        """
        args: dict[str, Any] = {"entrypoint": os.fspath(entrypoint), "tool": tool, "input": input}
        if runtime is not None:
            args["runtime"] = runtime
        if env:
            args["env"] = dict(env)
        if timeout is not None:
            args["timeout"] = timeout
        if one_shot is not None:
            args["one_shot"] = one_shot
        reply = await self._connection.call("tools.call", args)
        return reply["output"]

    async def list(
        self,
        entrypoint: str | os.PathLike[str],
        *,
        runtime: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> list[str]:
        """The names of the tools ``entrypoint`` exports."""
        args: dict[str, Any] = {"entrypoint": os.fspath(entrypoint)}
        if runtime is not None:
            args["runtime"] = runtime
        if env:
            args["env"] = dict(env)
        reply = await self._connection.call("tools.list", args)
        return list(reply["tools"])
