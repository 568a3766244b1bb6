"""The table of methods a node serves: name to handler."""

from __future__ import annotations

from collections.abc import Iterator

from .connection import Handler

__all__ = ["Router"]


class Router:
    """Maps method names (``"cas.put"``) to handlers. Each part of a node adds its own."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._uploads: set[str] = set()

    def add(self, name: str, handler: Handler, *, upload: bool = False) -> None:
        """Serve ``name`` with ``handler``; ``upload``: it reads an upload (a call to any
        other method that says it will send one is refused, so no bytes wait unread)."""
        if name in self._handlers:
            raise ValueError(f"method {name!r} is registered twice")
        self._handlers[name] = handler
        if upload:
            self._uploads.add(name)

    def takes_upload(self, name: str) -> bool:
        return name in self._uploads

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._handlers))
