"""The ``execute`` wire method: a thin handler over :meth:`EnginePart.execute`.

Kept thin on purpose: the scheduler wraps the same call in admission control, so all
it changes is which function the handler calls.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import InvalidArgument
from ..wire.connection import IncomingCall
from .action import Action, parse_wire_action
from .execute import ExecuteOutcome

__all__ = ["parse_execute_args", "execute_handler"]

ExecuteFn = Callable[..., Awaitable[ExecuteOutcome]]


def parse_execute_args(args: Any) -> tuple[Action, bool]:
    """``{"action": {...}, "skip_cache": bool}`` to an Action and the flag, or InvalidArgument."""
    if not isinstance(args, dict) or "action" not in args:
        raise InvalidArgument("execute takes {action: {...}, skip_cache: bool}")
    unknown = set(args) - {"action", "skip_cache"}
    if unknown:
        raise InvalidArgument(f"execute got unknown arguments: {', '.join(sorted(map(str, unknown)))}")
    skip_cache = args.get("skip_cache", False)
    if not isinstance(skip_cache, bool):
        raise InvalidArgument(f"execute skip_cache must be a bool, got {skip_cache!r}")
    return parse_wire_action(args["action"]), skip_cache


def execute_handler(execute: ExecuteFn) -> Callable[[IncomingCall], Awaitable[dict[str, Any]]]:
    """The wire handler for ``execute``, calling ``execute(action, skip_cache=...)``."""

    async def handle(call: IncomingCall) -> dict[str, Any]:
        action, skip_cache = parse_execute_args(call.args)
        outcome = await execute(action, skip_cache=skip_cache)
        return outcome.to_wire()

    return handle
