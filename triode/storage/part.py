"""The storage part of a node: its CAS and action cache, their wire methods, their janitor.

``node.parts["storage"]`` has ``.cas`` (a :class:`DiskCAS` when the node has a data
dir, else a :class:`MemoryCAS`) and ``.ac``. Background work (sweeping stale
partial uploads, scanning the store, evicting past the high watermark, the link to
a backing node) runs in a nursery this part owns, so it ends with the node.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from .ac import ActionCache
from .cas import CAS
from .disk import DiskCAS
from .memory import MemoryCAS
from .service import register
from .tier import Backing

if TYPE_CHECKING:
    from ..node import Node

__all__ = ["StoragePart", "open_storage", "DEFAULT_MEMORY_LIMIT", "SWEEP_INTERVAL"]

log = logging.getLogger("triode.storage")

#: What a node without a data dir (or a cache size) keeps in memory.
DEFAULT_MEMORY_LIMIT = 1024**3
#: How long a starting node waits for its backing node before serving without it.
BACKING_START_WAIT = 3.0
#: Each attempt to reach the backing node gives up after this long.
BACKING_CONNECT_TIMEOUT = 3.0
#: Seconds the janitor waits after an eviction failed (a disk error) before trying again.
JANITOR_RETRY = 5.0
#: How often stale partial uploads are looked for.
SWEEP_INTERVAL = 30.0


class StoragePart:
    name = "storage"

    def __init__(self, cas: CAS, ac: ActionCache) -> None:
        self.cas = cas
        self.ac = ac
        self.link: Any = None  # the backing link, when there is one

    def info(self) -> dict[str, Any]:
        return {"cas": self.cas.info(), "ac": self.ac.info()}


async def _sweep_uploads(cas: CAS) -> None:
    while True:
        await trio.sleep(SWEEP_INTERVAL)
        cas.uploads.sweep()


async def _janitor(cas: DiskCAS) -> None:
    """Index the store, then evict down to the low watermark whenever it passes the high one."""
    try:
        await cas.scan()
    except OSError as exc:  # the index then covers what this run stores and touches
        log.error("indexing %s failed: %s; eviction sees only blobs used since start", cas.root, exc)
    while True:
        await cas.wait_over_high_watermark()
        try:
            await cas.evict()
        except OSError as exc:  # keep serving; writes past the limit are refused meanwhile
            log.error("eviction in %s failed: %s; retrying", cas.root, exc)
            await trio.sleep(JANITOR_RETRY)
        await trio.lowlevel.checkpoint()


@asynccontextmanager
async def open_storage(node: Node) -> AsyncIterator[StoragePart]:
    config = node.config
    cas: CAS
    if config.data is not None:
        cas = DiskCAS(config.data, limit=config.cache_size)
        ac = ActionCache(cas, config.data / "ac")
    else:
        cas = MemoryCAS(limit=config.cache_size or DEFAULT_MEMORY_LIMIT)
        ac = ActionCache(cas)
    part = StoragePart(cas, ac)
    register(node.router, cas, ac)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sweep_uploads, cas)
            if isinstance(cas, DiskCAS):
                nursery.start_soon(_janitor, cas)
            if config.backing is not None:
                from ..client import connect

                backing = Backing(
                    config.backing,
                    lambda: connect(config.backing, token=config.token, ssl_context=node.client_ssl_context(),
                                    connect_timeout=BACKING_CONNECT_TIMEOUT),
                    nursery,
                )
                cas.backing = ac.backing = part.link = backing
                nursery.start_soon(backing.run)
                with trio.move_on_after(BACKING_START_WAIT):  # start serving either way
                    await backing.wait_connected()
            yield part
            nursery.cancel_scope.cancel()
    finally:
        ac.close()
        with trio.CancelScope(shield=True):
            await cas.aclose()
