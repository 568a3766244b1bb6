"""The trio idioms Triode repeats, in one place: nurseries that do not wrap their caller's
errors, and the rules for reading one error out of an exception group.

With strict exception groups, everything that leaves a nursery is a group. Callers want
the one error that says what went wrong, and each rule below says which one that is.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["open_service_nursery", "single_error", "sole_exception", "only_cancelled"]


@asynccontextmanager
async def open_service_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery for background tasks whose block's own exception comes out as itself.

    Context managers that run background tasks (a node, a connection, a tool pool) yield
    inside their nursery. With strict exception groups, whatever the caller's block
    raised would leave wrapped in an ExceptionGroup, so ``except BlobNotFound`` around a
    ``connect()`` block would never match. Here the block's exception is held while the
    background tasks are cancelled and joined, then raised again unwrapped. A background
    task's own failure still comes out as a group: that is a crash, not the caller's error.
    """
    raised: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        except BaseException as exc:
            raised = exc
            nursery.cancel_scope.cancel()
    if raised is not None:
        raise raised


def single_error(group: BaseExceptionGroup) -> BaseException:
    """The one error that matters in a group from a two-task pipeline: the real failure, if
    any (the other task was only cancelled because of it), else the Cancelled itself."""
    cancelled, others = group.split(trio.Cancelled)
    source: BaseException | None = others if others is not None else cancelled
    while isinstance(source, BaseExceptionGroup):
        source = source.exceptions[0]
    assert source is not None
    return source


def sole_exception(exc: BaseException) -> BaseException | None:
    """The exception a group of one (however deeply nested) wraps, or None when the group
    holds several: one failure is shown as itself, several stay a group."""
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc


def only_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is trio's Cancelled, alone or as all there is in a (nested) group."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)
