"""The storage part of a node: its CAS and action cache, their wire methods, their janitor.

``node.parts["storage"]`` has ``.cas`` (a :class:`DiskCAS` when the node has a data
dir, else a :class:`MemoryCAS`) and ``.ac``. Background work (sweeping stale
partial uploads, scanning the store, evicting past the high watermark, the link to
a backing node) runs in a nursery this part owns, so it ends with the node.

The ``cas.*`` and ``ac.*`` wire methods are thin handlers over the two stores: each
checks its arguments (a typed error naming what is wrong), then calls the store.
Streams: ``cas.put`` reads the upload and answers as soon as it can (at once when the
blob is already stored); ``cas.get`` streams the blob. Both speak ``identity`` or
``zstd`` (see :mod:`triode.wire.framing`). Described in full in docs/protocol.md,
"Methods: cas" and "Methods: ac".
"""


from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ..client import connect
from ..errors import InvalidArgument, TooLarge, TriodeError
from ..model.digest import Digest
from ..model.result import ActionResult
from ..storage.ac import ActionCache
from ..storage.cas import CAS
from ..storage.disk import DiskCAS
from ..storage.memory import MemoryCAS
from ..storage.tier import Backing
from ..wire.connection import IncomingCall
from ..wire.framing import IDENTITY, ZSTD, Decoder, Encoder, check_encoding, check_level
from ..wire.router import Router
from ..wire.transfer import BATCH_BYTES, DECODE_BATCH, ENCODE_LANES, decode, pump

if TYPE_CHECKING:
    from .node import Node

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
                address = config.backing
                backing = Backing(
                    address,
                    lambda: connect(address, token=config.token, ssl_context=node.client_ssl_context(),
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


#: Digests in one ``cas.find_missing`` or ``cas.batch_read`` call.
MAX_DIGESTS = 100_000


def _args(call: IncomingCall, *required: str) -> dict[str, Any]:
    args = call.args
    if not isinstance(args, dict):
        raise InvalidArgument(f"{call.method} takes a map of arguments, got {type(args).__name__}")
    for key in required:
        if key not in args:
            raise InvalidArgument(f"{call.method} needs argument {key!r}")
    return args


def _digest_list(call: IncomingCall, value: Any, name: str = "digests") -> list[Digest]:
    if not isinstance(value, list):
        raise InvalidArgument(f"{call.method}: {name!r} must be a list of [hash, size]")
    if len(value) > MAX_DIGESTS:
        raise TooLarge(
            f"{call.method}: {len(value)} digests in one call, over {MAX_DIGESTS}; split the batch"
        )
    return Digest.from_wire_list(value)


def _int_arg(args: dict[str, Any], key: str, default: int = 0) -> int:
    value = args.get(key, default)
    if type(value) is not int or value < 0:
        raise InvalidArgument(f"argument {key!r} must be a non-negative integer, got {value!r}")
    return value


class Upload:
    """The raw bytes of an upload: DATA chunks as they come, or decoded from zstd framing.

    A plain class rather than an async generator, so a reader that stops early
    (the blob was already there) leaves nothing to finalize.
    """

    def __init__(self, call: IncomingCall, encoding: str, limit: int) -> None:
        self._call = call
        self._decoder = Decoder(limit) if encoding == ZSTD else None
        self._ready: deque[bytes] = deque()

    def __aiter__(self) -> Upload:
        return self

    async def __anext__(self) -> bytes:
        if self._decoder is None:
            chunk = await self._call.receive()
            if chunk is None:
                raise StopAsyncIteration
            return chunk
        while not self._ready:
            framed = await self._call.receive_many(DECODE_BATCH)
            if framed is None:
                self._decoder.close()
                raise StopAsyncIteration
            self._ready.extend(await decode(self._decoder, framed))
        return self._ready.popleft()


def _encoding(call: IncomingCall, args: dict[str, Any]) -> str:
    encoding = check_encoding(args.get("encoding", IDENTITY))
    if encoding == ZSTD and ZSTD not in call.connection.features:
        raise InvalidArgument("zstd was asked for on a connection that did not negotiate it")
    return encoding


def register(router: Router, cas: CAS, ac: ActionCache) -> None:
    """Add the ``cas.*`` and ``ac.*`` methods to a node's router."""

    async def find_missing(call: IncomingCall) -> dict[str, Any]:
        digests = _digest_list(call, _args(call, "digests")["digests"])
        return {"missing": [d.to_wire() for d in await cas.find_missing(digests)]}

    async def put(call: IncomingCall) -> dict[str, Any]:
        args = _args(call, "digest")
        digest = Digest.from_wire(args["digest"])
        offset = _int_arg(args, "offset")
        upload_id = args.get("upload_id")
        if upload_id is not None and (type(upload_id) is not str or not 8 <= len(upload_id) <= 128):
            raise InvalidArgument("upload_id must be a string of 8 to 128 characters (a random uuid)")
        encoding = _encoding(call, args)
        cas.check_size(digest)
        upload = Upload(call, encoding, max(digest.size - offset, 0))
        await cas.put_stream(upload, digest, upload_id=upload_id, offset=offset)
        return {"digest": digest.to_wire()}

    async def get(call: IncomingCall) -> dict[str, Any]:
        args = _args(call, "digest")
        digest = Digest.from_wire(args["digest"])
        offset = _int_arg(args, "offset")
        encoding = _encoding(call, args)
        encoder = Encoder(check_level(args.get("level", 1)), lanes=ENCODE_LANES) if encoding == ZSTD else None
        async with cas.open_read(digest, offset) as chunks:
            sent = await pump(chunks, encoder, call.send)
        return {"size": sent}

    async def batch_read(call: IncomingCall) -> dict[str, Any]:
        digests = _digest_list(call, _args(call, "digests")["digests"])
        total = sum(d.size for d in dict.fromkeys(digests))
        if total > BATCH_BYTES:
            raise TooLarge(f"cas.batch_read of {total} bytes is over {BATCH_BYTES}; read large blobs "
                           "with cas.get or split the batch", size=total, limit=BATCH_BYTES)
        found = await cas.batch_read(digests)
        return {"blobs": [[d.to_wire(), data] for d, data in found.items()]}

    async def batch_update(call: IncomingCall) -> dict[str, Any]:
        blobs = _args(call, "blobs")["blobs"]
        if not isinstance(blobs, list) or not all(
            isinstance(b, list) and len(b) == 2 and isinstance(b[1], bytes) for b in blobs
        ):
            raise InvalidArgument("cas.batch_update: 'blobs' must be a list of [[hash, size], bytes]")
        total = sum(len(b[1]) for b in blobs)
        if total > BATCH_BYTES:
            raise TooLarge(f"cas.batch_update of {total} bytes is over {BATCH_BYTES}; upload large blobs "
                           "with cas.put or split the batch", size=total, limit=BATCH_BYTES)
        errors = []
        for wire_digest, data in blobs:
            try:
                digest = Digest.from_wire(wire_digest)
                await cas.put(data, digest)
            except TriodeError as exc:
                errors.append([wire_digest, exc.code, exc.message])
        return {"errors": errors}

    async def upload_status(call: IncomingCall) -> dict[str, Any]:
        upload_id = _args(call, "upload_id")["upload_id"]
        if type(upload_id) is not str:
            raise InvalidArgument("upload_id must be a string")
        status = cas.uploads.status(upload_id)
        if status is None:
            return {"digest": None, "committed": 0, "active": False}
        digest, committed, active = status
        return {"digest": digest.to_wire(), "committed": committed, "active": active}

    async def ac_get(call: IncomingCall) -> dict[str, Any]:
        key = Digest.from_wire(_args(call, "action_digest")["action_digest"])
        result = await ac.get(key)
        return {"result": None if result is None else result.to_wire()}

    async def ac_update(call: IncomingCall) -> None:
        args = _args(call, "action_digest", "result")
        key = Digest.from_wire(args["action_digest"])
        await ac.update(key, ActionResult.from_wire(args["result"]))  # checked here, at the edge

    router.add("cas.find_missing", find_missing)
    router.add("cas.put", put)
    router.add("cas.get", get)
    router.add("cas.batch_read", batch_read)
    router.add("cas.batch_update", batch_update)
    router.add("cas.upload_status", upload_status)
    router.add("ac.get", ac_get)
    router.add("ac.update", ac_update)
