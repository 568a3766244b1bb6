"""The storage part of a node: its CAS and action cache, their wire methods, their janitor.

``node.parts["storage"]`` has ``.cas`` (a :class:`DiskCAS` when the node has a data
dir, else a :class:`MemoryCAS`), ``.ac``, ``.kv`` (a :class:`KeyValueStore`) and
``.reapi_ac`` (a :class:`ReapiActionCache` over the two). Background work (sweeping stale
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
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import trio

from ..client import connect
from ..errors import InvalidArgument, PermissionDenied, TooLarge, TriodeError
from ..model.digest import Digest
from ..model.result import ActionResult
from ..storage.ac import ActionCache
from ..storage.cas import CAS
from ..storage.disk import DiskCAS
from ..storage.keyvalue import KeyValueStore
from ..storage.memory import MemoryCAS
from ..storage.reapi_ac import ReapiActionCache
from ..storage.tier import Backing
from ..wire.connection import IncomingCall
from ..wire.framing import IDENTITY, ZSTD, Decoder, Encoder, check_encoding, check_level
from ..wire.router import Router
from ..wire.transfer import (
    BATCH_BYTES,
    DECODE_BATCH,
    ENCODE_LANES,
    ChunkReader,
    FileReader,
    decode,
    send_blob,
)

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
    #: Who may write the action cache over the wire (``--ac-writes``): "any" client, or
    #: only this node's own executions ("executor": ac.update is PERMISSION_DENIED).
    ac_writes: str = "any"
    #: The engine's results answered but not yet written to the cache (set by open_node once
    #: the engine is up), so that ac.get reads the node's own writes.
    pending: Callable[[Digest], ActionResult | None] | None = None

    def __init__(self, cas: CAS, ac: ActionCache, kv: KeyValueStore) -> None:
        self.cas = cas
        self.ac = ac
        #: Named keys to blobs (ccache's keys, the REAPI action cache's index).
        self.kv = kv
        #: The REAPI action cache (ActionResult protobufs by action hash), over ``cas`` and ``kv``.
        self.reapi_ac = ReapiActionCache(cas, kv)
        self.link: Any = None  # the backing link, when there is one

    def info(self) -> dict[str, Any]:
        return {"cas": self.cas.info(), "ac": self.ac.info(), "kv": self.kv.info(),
                "reapi_ac": self.reapi_ac.info()}


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
        kv = KeyValueStore(cas, config.data / "kv")
    else:
        cas = MemoryCAS(limit=config.cache_size or DEFAULT_MEMORY_LIMIT)
        ac = ActionCache(cas)
        kv = KeyValueStore(cas)
    part = StoragePart(cas, ac, kv)
    part.ac_writes = config.ac_writes
    register(node.router, cas, ac, part)
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
        kv.close()
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


def register(router: Router, cas: CAS, ac: ActionCache, part: StoragePart) -> None:
    """Add the ``cas.*`` and ``ac.*`` methods to a node's router."""

    async def find_missing(call: IncomingCall) -> dict[str, Any]:
        digests = _digest_list(call, _args(call, "digests")["digests"])
        return {"missing": [d.to_wire() for d in await cas.find_missing(digests)]}

    async def put(call: IncomingCall) -> dict[str, Any]:
        if not call.upload:
            raise InvalidArgument(
                "cas.put takes the blob as an upload: call it with meta.up = true, then send "
                "the bytes in DATA frames and an END"
            )
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
        if not call.download:
            raise InvalidArgument(
                "cas.get sends the blob back as a download: call it with meta.down = true and "
                "read the DATA frames before the REPLY (cas.batch_read reads small blobs without one)"
            )
        args = _args(call, "digest")
        digest = Digest.from_wire(args["digest"])
        offset = _int_arg(args, "offset")
        encoding = _encoding(call, args)
        encoder = Encoder(check_level(args.get("level", 1)), lanes=ENCODE_LANES) if encoding == ZSTD else None
        size = digest.size - offset
        async with cas.open_read(digest, offset) as chunks:
            # Nothing is read ahead of the caller's credit (send_blob): from the blob's file
            # in reads of the size wanted when the store has one, else cut from its chunks.
            path = cas.path_of(digest) if isinstance(cas, DiskCAS) and size else None
            if path is None:
                sent = await send_blob(call, ChunkReader(call, chunks, size), size, encoder)
            else:
                reader = FileReader(call, path, offset)
                try:
                    sent = await send_blob(call, reader, size, encoder)
                finally:
                    reader.close()
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
        valid: list[tuple[Digest, bytes]] = []
        wire_of: dict[Digest, Any] = {}
        for wire_digest, data in blobs:
            try:
                digest = Digest.from_wire(wire_digest)
            except TriodeError as exc:
                errors.append([wire_digest, exc.code, exc.message])
                continue
            valid.append((digest, data))
            wire_of[digest] = wire_digest
        for digest, error in (await cas.batch_update(valid)).items():
            if isinstance(error, TriodeError):
                errors.append([wire_of[digest], error.code, error.message])
            elif error is not None:
                raise error
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

    async def verify(call: IncomingCall) -> dict[str, Any]:
        args = call.args if call.args is not None else {}
        if not isinstance(args, dict):
            raise InvalidArgument(f"{call.method} takes a map of arguments, got {type(args).__name__}")
        digests = _digest_list(call, args["digests"]) if args.get("digests") is not None else None
        return (await cas.verify(digests)).to_wire()

    async def ac_get(call: IncomingCall) -> dict[str, Any]:
        key = Digest.from_wire(_args(call, "action_digest")["action_digest"])
        # The engine writes a result to the cache just behind its answer: until it lands,
        # it is served from memory, so the node reads its own writes.
        result = part.pending(key) if part.pending is not None else None
        if result is None:
            result = await ac.get(key)
        return {"result": None if result is None else result.to_wire()}

    async def ac_update(call: IncomingCall) -> None:
        if part.ac_writes != "any":
            raise PermissionDenied(
                "this node writes its action cache only with results of actions it ran itself "
                "(it runs with --ac-writes executor): call execute instead"
            )
        args = _args(call, "action_digest", "result")
        key = Digest.from_wire(args["action_digest"])
        await ac.update(key, ActionResult.from_wire(args["result"]))  # checked here, at the edge

    router.add("cas.find_missing", find_missing)
    router.add("cas.put", put, upload=True)
    router.add("cas.get", get)
    router.add("cas.batch_read", batch_read)
    router.add("cas.batch_update", batch_update)
    router.add("cas.upload_status", upload_status)
    router.add("cas.verify", verify)
    router.add("ac.get", ac_get)
    router.add("ac.update", ac_update)
