"""Bazel's Remote Execution API (REAPI v2) over the node's parts: the gRPC door's services.

One store behind every door: the CAS and ByteStream services read and write
``node.parts["storage"].cas`` (a blob put through any door is visible through every door);
the ActionCache service is ``node.parts["storage"].reapi_ac``, shared with the HTTP cache's
``/ac/`` (REAPI ``ActionResult`` protobufs by action hash); Execution goes through the
scheduler (``triode.node.reapi_exec``). Instance names are accepted and ignored: a node
has one store.

* **Capabilities**: SHA-256 only; action cache updates allowed; batches up to
  :data:`MAX_BATCH` bytes; zstd for ByteStream and batches; absolute symlinks refused;
  execution (when the node has an engine) with priorities -1000..1000.
* **ContentAddressableStorage**: FindMissingBlobs, BatchUpdateBlobs and BatchReadBlobs
  (identity or zstd, each blob verified against its digest before it is stored), GetTree
  (pages of at most ``page_size`` directories, resumable with the page token).
* **ByteStream**: ``{instance}/blobs/{hash}/{size}`` and
  ``{instance}/compressed-blobs/zstd/{hash}/{size}`` reads;
  ``{instance}/uploads/{uuid}/blobs/{hash}/{size}`` and the ``compressed-blobs/zstd``
  writes. A write of a blob already stored answers at once; an uncompressed write cut off
  (cancelled, connection lost) keeps its bytes under its uuid, and QueryWriteStatus tells
  where to resume.
* **ActionCache**: GetActionResult (NOT_FOUND on a miss, stdout/stderr inlined on
  request) and UpdateActionResult (validated: every blob it names must be stored).
"""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
import zstandard

from ..chunks import INLINE_LIMIT
from ..errors import (
    BlobNotFound,
    DigestMismatch,
    InvalidArgument,
    InvalidDigest,
    NotFound,
    PermissionDenied,
    TooLarge,
)
from ..model.digest import Digest
from ..proto import bytestream_pb2 as bs
from ..proto import remote_execution_pb2 as pb
from ..proto import semver_pb2
from ..wire.grpc import Code, GrpcError, make_status, status_of
from .grpc import GrpcCall, Method

if TYPE_CHECKING:
    from .node import Node

__all__ = ["reapi_services", "to_digest", "from_digest", "parse_read_resource", "parse_write_resource",
           "MAX_BATCH", "READ_MESSAGE", "ZSTD", "IDENTITY"]

#: The largest total of blob bytes in one BatchUpdateBlobs or BatchReadBlobs.
MAX_BATCH = 4 * 1024 * 1024
#: Bytes of blob per ByteStream ReadResponse.
READ_MESSAGE = 1024 * 1024
#: Directories per GetTree page when the client does not say, and the most it may ask for.
TREE_PAGE = 1000
MAX_TREE_PAGE = 10_000
#: The most directories one GetTree walks.
MAX_TREE_DIRECTORIES = 1_000_000
#: Blobs inlined into one GetActionResult answer (stdout, stderr, files asked for).
MAX_INLINE = 1024 * 1024
#: Compressed input at most this long is decompressed on the event loop; longer in a thread.
INLINE_DECOMPRESS = 64 * 1024
#: zstd frames with windows past this are refused (memory per decompression).
MAX_ZSTD_WINDOW = 1 << 25
#: Blobs of at least this size are offered zstd in BatchReadBlobs (smaller rarely shrink).
BATCH_COMPRESS_MIN = 1024
ZSTD_LEVEL = 1

IDENTITY = pb.Compressor.IDENTITY
ZSTD = pb.Compressor.ZSTD
_PREFIX = "/build.bazel.remote.execution.v2."
_SIZE = re.compile(r"0|[1-9][0-9]{0,18}")


# -- digests and resource names -----------------------------------------------------------


def to_digest(message: pb.Digest, where: str = "digest") -> Digest:
    """A Triode digest from a REAPI one; InvalidDigest naming ``where`` when it is malformed."""
    try:
        return Digest(message.hash, message.size_bytes)
    except InvalidDigest as exc:
        raise InvalidDigest(f"{where}: {exc.message}", field=where) from None


def to_digests(messages: Any, field: str) -> list[Digest]:
    """Many REAPI digests at once (the bulk check of ``Digest.from_wire_list``); a bad one is
    named by its place, ``field[i]``."""
    try:
        return Digest.from_wire_list([[m.hash, m.size_bytes] for m in messages])
    except InvalidDigest:
        return [to_digest(m, f"{field}[{i}]") for i, m in enumerate(messages)]


def from_digest(digest: Digest) -> pb.Digest:
    return pb.Digest(hash=digest.hash, size_bytes=digest.size)


def _digest_at(parts: list[str], i: int, name: str) -> Digest:
    if len(parts) < i + 2 or not _SIZE.fullmatch(parts[i + 1]):
        raise InvalidArgument(f"resource {name[:300]!r} does not end in HASH/SIZE")
    try:
        return Digest(parts[i], int(parts[i + 1]))
    except InvalidDigest as exc:
        raise InvalidDigest(f"resource {name[:300]!r}: {exc.message}") from None


def _compressor(parts: list[str], i: int, name: str) -> None:
    if len(parts) <= i or parts[i] != "zstd":
        got = parts[i] if len(parts) > i else ""
        raise InvalidArgument(f"resource {name[:300]!r}: compressor {got[:40]!r} is not offered; "
                              "zstd is the one this node speaks")


def parse_read_resource(name: str) -> tuple[str, bool, Digest]:
    """``{instance}/blobs/{hash}/{size}`` or ``{instance}/compressed-blobs/zstd/{hash}/{size}``:
    (instance, compressed, digest)."""
    parts = name.split("/")
    for i, part in enumerate(parts):
        if part == "blobs" and len(parts) == i + 3:
            return "/".join(parts[:i]), False, _digest_at(parts, i + 1, name)
        if part == "compressed-blobs" and len(parts) == i + 4:
            _compressor(parts, i + 1, name)
            return "/".join(parts[:i]), True, _digest_at(parts, i + 2, name)
    raise InvalidArgument(f"resource {name[:300]!r} is not {{instance}}/blobs/HASH/SIZE or "
                          "{instance}/compressed-blobs/zstd/HASH/SIZE")


def parse_write_resource(name: str) -> tuple[str, str, bool, Digest]:
    """``{instance}/uploads/{uuid}/blobs/{hash}/{size}[/...]`` or its ``compressed-blobs/zstd``
    form: (instance, upload id, compressed, digest)."""
    parts = name.split("/")
    for i, part in enumerate(parts):
        if part != "uploads" or len(parts) < i + 5:
            continue
        upload = parts[i + 1]
        if not 1 <= len(upload) <= 128:
            raise InvalidArgument(f"resource {name[:300]!r}: the upload id must be 1 to 128 characters")
        kind = parts[i + 2]
        if kind == "blobs":
            return "/".join(parts[:i]), upload, False, _digest_at(parts, i + 3, name)
        if kind == "compressed-blobs":
            _compressor(parts, i + 3, name)
            return "/".join(parts[:i]), upload, True, _digest_at(parts, i + 4, name)
    raise InvalidArgument(f"resource {name[:300]!r} is not {{instance}}/uploads/UUID/blobs/HASH/SIZE or "
                          "{instance}/uploads/UUID/compressed-blobs/zstd/HASH/SIZE")


def _upload_key(upload: str) -> str:
    return f"reapi:{upload}"


# -- zstd -----------------------------------------------------------------------------------


class _Sink:
    """Where a bounded decompression writes: fails as soon as it passes ``limit`` bytes."""

    def __init__(self, limit: int, digest: Digest) -> None:
        self.limit = limit
        self.digest = digest
        self.out: list[bytes] = []
        self.total = 0

    def write(self, data: bytes) -> int:
        self.total += len(data)
        if self.total > self.limit:
            raise DigestMismatch(f"the zstd data expands past the {self.digest.size} bytes of {self.digest}",
                                 expected=str(self.digest))
        self.out.append(bytes(data))
        return len(data)

    def take(self) -> list[bytes]:
        out, self.out = self.out, []
        return out


class ZstdStream:
    """Decompresses a zstd stream piece by piece, never past the digest's size."""

    def __init__(self, digest: Digest, offset: int = 0) -> None:
        self.sink = _Sink(digest.size - offset, digest)
        dctx = zstandard.ZstdDecompressor(max_window_size=MAX_ZSTD_WINDOW)
        self._writer = dctx.stream_writer(self.sink, write_size=READ_MESSAGE,  # type: ignore[arg-type]
                                          write_return_read=True)

    def _feed(self, data: bytes) -> list[bytes]:
        try:
            self._writer.write(data)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(f"the data is not valid zstd: {exc}") from None
        return self.sink.take()

    async def feed(self, data: bytes) -> list[bytes]:
        if len(data) <= INLINE_DECOMPRESS:
            await trio.lowlevel.checkpoint_if_cancelled()
            return self._feed(data)
        return await trio.to_thread.run_sync(self._feed, data)


def decompress_blob(data: bytes, digest: Digest) -> bytes:
    """A whole zstd-compressed blob (BatchUpdateBlobs), bounded by its digest's size."""
    stream = ZstdStream(digest)
    out = stream._feed(data)
    return b"".join(out)


def compress_if_smaller(data: bytes) -> bytes | None:
    packed = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    return packed if len(packed) < len(data) - len(data) // 32 else None


# -- the services ---------------------------------------------------------------------------


class Reapi:
    """The REAPI handlers of one node (Execution is added by ``reapi_exec``)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        storage = node.parts.get("storage")
        if storage is None:
            raise RuntimeError("the REAPI services need the storage part")
        self.cas: Any = storage.cas  # type: ignore[attr-defined]
        self.reapi_ac: Any = getattr(storage, "reapi_ac", None)
        #: Clients may store results (``--ac-writes any``), or only the node's own runs may.
        self.ac_writable = getattr(storage, "ac_writes", "any") == "any"
        self.exec_enabled = "engine" in node.parts and "sched" in node.parts

    # -- Capabilities ----------------------------------------------------------------

    async def get_capabilities(
        self, request: pb.GetCapabilitiesRequest, call: GrpcCall
    ) -> pb.ServerCapabilities:
        await trio.lowlevel.checkpoint()
        priorities = pb.PriorityCapabilities(priorities=[
            pb.PriorityCapabilities.PriorityRange(min_priority=-1000, max_priority=1000)])
        return pb.ServerCapabilities(
            cache_capabilities=pb.CacheCapabilities(
                digest_function=[pb.DigestFunction.SHA256],
                action_cache_update_capabilities=pb.ActionCacheUpdateCapabilities(
                    update_enabled=self.reapi_ac is not None and self.ac_writable),
                max_batch_total_size_bytes=MAX_BATCH,
                symlink_absolute_path_strategy=pb.SymlinkAbsolutePathStrategy.DISALLOWED,
                supported_compressors=[ZSTD],
                supported_batch_update_compressors=[ZSTD],
            ),
            execution_capabilities=pb.ExecutionCapabilities(
                digest_function=pb.DigestFunction.SHA256,
                exec_enabled=self.exec_enabled,
                execution_priority_capabilities=priorities,
            ),
            low_api_version=semver_pb2.SemVer(major=2, minor=0),
            high_api_version=semver_pb2.SemVer(major=2, minor=3),
        )

    # -- ContentAddressableStorage ---------------------------------------------------

    async def find_missing_blobs(
        self, request: pb.FindMissingBlobsRequest, call: GrpcCall
    ) -> pb.FindMissingBlobsResponse:
        digests = to_digests(request.blob_digests, "blob_digests")
        missing = await self.cas.find_missing(digests)
        return pb.FindMissingBlobsResponse(missing_blob_digests=[from_digest(d) for d in missing])

    async def batch_update_blobs(
        self, request: pb.BatchUpdateBlobsRequest, call: GrpcCall
    ) -> pb.BatchUpdateBlobsResponse:
        total = sum(len(r.data) for r in request.requests)
        if total > MAX_BATCH:
            raise TooLarge(f"BatchUpdateBlobs of {total} bytes is over the limit of {MAX_BATCH}; "
                           "split the batch or use ByteStream.Write", size=total, limit=MAX_BATCH)
        statuses: list[Any] = []
        blobs: list[tuple[Digest, bytes]] = []
        for i, r in enumerate(request.requests):
            try:
                digest = to_digest(r.digest, f"requests[{i}].digest")
                data = r.data
                if r.compressor == ZSTD:
                    if digest.size > MAX_BATCH:
                        raise TooLarge(f"blob {digest} is over the batch limit of {MAX_BATCH}")
                    data = await trio.to_thread.run_sync(decompress_blob, data, digest) \
                        if len(data) > INLINE_DECOMPRESS else decompress_blob(data, digest)
                elif r.compressor != IDENTITY:
                    raise InvalidArgument(f"requests[{i}]: compressor {r.compressor} is not offered "
                                          "(identity and zstd are)")
                if len(data) != digest.size:
                    raise DigestMismatch(f"blob {digest}: {len(data)} bytes were sent, not {digest.size}",
                                         expected=str(digest))
            except InvalidArgument as exc:
                statuses.append(status_of(exc))
                continue
            statuses.append(digest)
            blobs.append((digest, data))
        stored = await self.cas.batch_update(blobs) if blobs else {}
        out = pb.BatchUpdateBlobsResponse()
        add = out.responses.add
        for r, entry in zip(request.requests, statuses, strict=True):
            if isinstance(entry, Digest):
                error = stored.get(entry)
                if error is None:
                    add(digest=r.digest)  # an unset status is OK (code 0)
                    continue
                entry = status_of(error)
            add(digest=r.digest, status=entry)
        return out

    async def batch_read_blobs(
        self, request: pb.BatchReadBlobsRequest, call: GrpcCall
    ) -> pb.BatchReadBlobsResponse:
        digests = to_digests(request.digests, "digests")
        total = sum(d.size for d in dict.fromkeys(digests))
        if total > MAX_BATCH:
            raise TooLarge(f"BatchReadBlobs of {total} bytes is over the limit of {MAX_BATCH}; "
                           "split the batch or use ByteStream.Read", size=total, limit=MAX_BATCH)
        zstd = ZSTD in request.acceptable_compressors
        found = await self.cas.batch_read(digests)
        out = pb.BatchReadBlobsResponse()
        add = out.responses.add
        for message, d in zip(request.digests, digests, strict=True):
            data = found.get(d)
            if data is None:
                add(digest=message, status=make_status(Code.NOT_FOUND, f"blob {d} is not in the CAS"))
                continue
            packed = compress_if_smaller(data) if zstd and len(data) >= BATCH_COMPRESS_MIN else None
            if packed is not None:
                add(digest=message, data=packed, compressor=ZSTD)
            else:
                add(digest=message, data=data)  # an unset status is OK (code 0)
        return out

    async def get_tree(self, request: pb.GetTreeRequest, call: GrpcCall) -> None:
        root = to_digest(request.root_digest, "root_digest")
        if request.page_size < 0:
            raise InvalidArgument(f"page_size must not be negative, got {request.page_size}")
        page_size = min(request.page_size or TREE_PAGE, MAX_TREE_PAGE)
        skip = 0
        if request.page_token:
            if not request.page_token.isdigit() or len(request.page_token) > 9:
                raise InvalidArgument(f"page_token {request.page_token[:40]!r} is not one this node gave")
            skip = int(request.page_token)
        if not await self.cas.contains(root):
            raise BlobNotFound(f"the root directory {root} is not in the CAS", digest=str(root))
        sent = 0
        page: list[pb.Directory] = []
        page_bytes = 0
        async for directory, size in self._walk(root):
            if sent < skip:
                sent += 1
                continue
            page.append(directory)
            page_bytes += size
            sent += 1
            if len(page) >= page_size or page_bytes >= MAX_BATCH:
                await call.send(pb.GetTreeResponse(directories=page, next_page_token=str(sent)))
                page, page_bytes = [], 0
        await call.send(pb.GetTreeResponse(directories=page))

    async def _walk(self, root: Digest) -> AsyncIterator[tuple[pb.Directory, int]]:
        """Breadth first, each directory once; parts missing from the CAS are left out."""
        seen = {root}
        level = [root]
        while level:
            found = await self._read_many(level)
            following: list[Digest] = []
            for digest in level:
                data = found.get(digest)
                if data is None:
                    continue
                directory = pb.Directory()
                try:
                    directory.ParseFromString(data)
                except Exception:  # noqa: BLE001 - protobuf's DecodeError: not a Directory, left out
                    continue
                yield directory, len(data)
                for child in directory.directories:
                    try:
                        d = to_digest(child.digest)
                    except InvalidDigest:
                        continue
                    if d not in seen:
                        if len(seen) >= MAX_TREE_DIRECTORIES:
                            raise TooLarge(f"the tree under {root} has over {MAX_TREE_DIRECTORIES} "
                                           "directories")
                        seen.add(d)
                        following.append(d)
            level = following

    async def _read_many(self, digests: list[Digest]) -> dict[Digest, bytes | None]:
        out: dict[Digest, bytes | None] = {}
        batch: list[Digest] = []
        held = 0
        for d in digests:
            if d.size > MAX_BATCH:
                try:
                    out[d] = await self.cas.get(d, limit=64 * 1024 * 1024)
                except (BlobNotFound, TooLarge):
                    out[d] = None
                continue
            if held + d.size > MAX_BATCH and batch:
                out.update(await self.cas.batch_read(batch))
                batch, held = [], 0
            batch.append(d)
            held += d.size
        if batch:
            out.update(await self.cas.batch_read(batch))
        return out

    # -- ByteStream ------------------------------------------------------------------

    async def read(self, request: bs.ReadRequest, call: GrpcCall) -> None:
        _, compressed, digest = parse_read_resource(request.resource_name)
        offset, limit = request.read_offset, request.read_limit
        if offset < 0 or offset > digest.size:
            raise GrpcError(Code.OUT_OF_RANGE, f"read_offset {offset} is outside blob {digest}")
        if limit < 0:
            raise InvalidArgument(f"read_limit must not be negative, got {limit}")
        if compressed and limit:
            raise InvalidArgument("a compressed-blobs read takes no read_limit")
        left = digest.size - offset if not limit else min(limit, digest.size - offset)
        if compressed:
            await self._read_compressed(digest, offset, call)
            return
        if not left:
            return
        if digest.size <= READ_MESSAGE:  # the usual small blob: one read, one message
            data = await self.cas.get(digest)
            await call.send(bs.ReadResponse(data=data[offset : offset + left]))
            return

        async def produce(send: trio.MemorySendChannel[list[Message]]) -> None:
            nonlocal left
            async with send, self.cas.open_read(digest, offset) as chunks:
                async for chunk in chunks:
                    n = min(len(chunk), left)
                    await send.send(_responses(chunk, n))
                    left -= n
                    if not left:
                        return

        await _pipe(produce, call)

    async def _read_compressed(self, digest: Digest, offset: int, call: GrpcCall) -> None:
        chunker = zstandard.ZstdCompressor(level=ZSTD_LEVEL).chunker(size=digest.size - offset,
                                                                      chunk_size=READ_MESSAGE)

        def compress(data: bytes | None) -> list[Message]:
            out = chunker.finish() if data is None else chunker.compress(data)  # type: ignore[no-untyped-call]
            return [(_read_response_head(len(piece)), piece) for piece in out]

        async def produce(send: trio.MemorySendChannel[list[Message]]) -> None:
            async with send, self.cas.open_read(digest, offset) as chunks:
                async for chunk in chunks:
                    if len(chunk) <= INLINE_LIMIT:
                        await send.send(compress(chunk))
                    else:
                        await send.send(await trio.to_thread.run_sync(compress, chunk))
                await send.send(compress(None))

        await _pipe(produce, call)

    async def write(self, requests: AsyncIterator[bs.WriteRequest], call: GrpcCall) -> bs.WriteResponse:
        first = await anext(requests, None)
        if first is None:
            raise InvalidArgument("a ByteStream Write needs at least one request")
        _, upload, compressed, digest = parse_write_resource(first.resource_name)
        self.cas.check_size(digest)
        offset = first.write_offset
        if offset < 0 or offset > digest.size:
            raise GrpcError(Code.OUT_OF_RANGE, f"write_offset {offset} is outside blob {digest}")
        if compressed:
            if offset:
                raise InvalidArgument("compressed uploads cannot be resumed here: write from offset 0")
            if await self.cas.contains(digest):
                return bs.WriteResponse(committed_size=-1)  # REAPI: -1 for a compressed blob already there
            source = _WriteData(first, requests, first.resource_name, ZstdStream(digest))
            await self.cas.put_stream(source, digest)
            return bs.WriteResponse(committed_size=source.received)
        source = _WriteData(first, requests, first.resource_name, None)
        await self.cas.put_stream(source, digest, upload_id=_upload_key(upload), offset=offset)
        return bs.WriteResponse(committed_size=digest.size)

    async def query_write_status(
        self, request: bs.QueryWriteStatusRequest, call: GrpcCall
    ) -> bs.QueryWriteStatusResponse:
        _, upload, compressed, digest = parse_write_resource(request.resource_name)
        if await self.cas.contains(digest):
            committed = -1 if compressed else digest.size
            return bs.QueryWriteStatusResponse(committed_size=committed, complete=True)
        status = None if compressed else self.cas.uploads.status(_upload_key(upload))
        if status is None or status[0] != digest:
            return bs.QueryWriteStatusResponse(committed_size=0, complete=False)
        return bs.QueryWriteStatusResponse(committed_size=status[1], complete=False)

    # -- ActionCache -----------------------------------------------------------------

    def _ac(self) -> Any:
        if self.reapi_ac is None:
            raise GrpcError(Code.UNIMPLEMENTED, "this node has no REAPI action cache")
        return self.reapi_ac

    async def get_action_result(self, request: pb.GetActionResultRequest, call: GrpcCall) -> Any:
        digest = to_digest(request.action_digest, "action_digest")
        raw = await self._ac().get(digest.hash)
        if raw is None:
            raise NotFound(f"no result is cached for action {digest}", digest=str(digest))
        if not (request.inline_stdout or request.inline_stderr or request.inline_output_files):
            return _Raw(raw)
        result = pb.ActionResult.FromString(raw)
        await self._inline(result, request)
        return result

    async def _inline(self, result: pb.ActionResult, request: pb.GetActionResultRequest) -> None:
        budget = MAX_INLINE
        wanted = set(request.inline_output_files)

        async def fetch(digest: pb.Digest) -> bytes | None:
            nonlocal budget
            d = to_digest(digest)
            if d.size > budget:
                return None
            try:
                data: bytes = await self.cas.get(d)
            except BlobNotFound:
                return None
            budget -= d.size
            return data

        if request.inline_stdout and result.HasField("stdout_digest"):
            data = await fetch(result.stdout_digest)
            if data is not None:
                result.stdout_raw = data
        if request.inline_stderr and result.HasField("stderr_digest"):
            data = await fetch(result.stderr_digest)
            if data is not None:
                result.stderr_raw = data
        for f in result.output_files:
            if f.path in wanted:
                data = await fetch(f.digest)
                if data is not None:
                    f.contents = data

    async def update_action_result(
        self, request: pb.UpdateActionResultRequest, call: GrpcCall
    ) -> pb.ActionResult:
        digest = to_digest(request.action_digest, "action_digest")
        ac = self._ac()
        if not self.ac_writable:
            raise PermissionDenied("this node takes action results only from actions it ran itself "
                                   "(--ac-writes executor): use Execute")
        await ac.update(digest.hash, request.action_result.SerializeToString())
        return request.action_result


#: A serialized message in two parts: its head, and a body sent uncopied after it.
Message = tuple[bytes, "bytes | memoryview"]


def _responses(data: bytes, limit: int) -> list[Message]:
    """ReadResponses of the first ``limit`` bytes of ``data``, READ_MESSAGE each, as the
    protobuf runtime's head of each and a view of its bytes.

    A ReadResponse has one field, its ``data``, so it serializes as a head (the field's tag
    and length, which depend on the length alone) followed by the bytes: the head is taken
    from the runtime's own serialization of a message of that length
    (:func:`_read_response_head`), and the bytes are not copied at all. Building each
    message (the slice, the field, the serialization) copied every byte three times, half
    of the node's work in a large download."""
    view = memoryview(data)[:limit]
    return [(_read_response_head(len(piece)), piece)
            for piece in (view[i : i + READ_MESSAGE] for i in range(0, len(view), READ_MESSAGE))]


@functools.lru_cache(maxsize=16)
def _read_response_head(size: int) -> bytes:
    """What the protobuf runtime puts before ``size`` bytes of data in a ReadResponse."""
    whole = bs.ReadResponse(data=bytes(size)).SerializeToString()
    return whole[: len(whole) - size]


async def _pipe(
    produce: Callable[[trio.MemorySendChannel[list[Message]]], Awaitable[None]], call: GrpcCall
) -> None:
    """Send what ``produce`` makes, the next batch being made while one is sent."""
    send, receive = trio.open_memory_channel[list[Message]](1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce, send)
        async with receive:
            async for messages in receive:
                for head, body in messages:
                    await call.send_raw(head, body)


class _Raw:
    """A response already serialized (an ActionResult as the cache holds it)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - the protobuf method's name
        return self.data


class _WriteData:
    """The bytes of a ByteStream Write, message after message: checks each ``write_offset``,
    stops at ``finish_write``, decompresses a compressed upload as it comes."""

    def __init__(
        self,
        first: bs.WriteRequest,
        rest: AsyncIterator[bs.WriteRequest],
        resource: str,
        zstd: ZstdStream | None,
    ) -> None:
        self._next: bs.WriteRequest | None = first
        self._rest = rest
        self._resource = resource
        self._zstd = zstd
        self._ready: list[bytes] = []
        self._done = False
        self._expected = first.write_offset
        #: Bytes received (compressed bytes for a compressed upload).
        self.received = 0

    def __aiter__(self) -> _WriteData:
        return self

    async def __anext__(self) -> bytes:
        while not self._ready:
            if self._done:
                raise StopAsyncIteration
            request = self._next if self._next is not None else await anext(self._rest, None)
            self._next = None
            if request is None:
                raise InvalidArgument("the Write ended without finish_write")
            if request.resource_name and request.resource_name != self._resource:
                raise InvalidArgument("every request of one Write names the same resource (or none)")
            if request.write_offset != self._expected:
                raise InvalidArgument(f"write_offset {request.write_offset} does not follow the bytes sent "
                                      f"(expected {self._expected})")
            data = request.data
            self._expected += len(data)
            self.received += len(data)
            self._done = request.finish_write
            if self._zstd is None:
                if data:
                    return data
                continue
            if data:
                self._ready.extend(await self._zstd.feed(data))
        return self._ready.pop(0)


def reapi_services(
    node: Node, extra: Callable[[Reapi], dict[str, Method]] | None = None
) -> dict[str, Method]:
    """The gRPC method table of the REAPI services (plus ``extra``'s, given the handlers)."""
    r = Reapi(node)
    services = {
        f"{_PREFIX}Capabilities/GetCapabilities": Method(pb.GetCapabilitiesRequest, r.get_capabilities),
        f"{_PREFIX}ContentAddressableStorage/FindMissingBlobs": Method(
            pb.FindMissingBlobsRequest, r.find_missing_blobs),
        f"{_PREFIX}ContentAddressableStorage/BatchUpdateBlobs": Method(
            pb.BatchUpdateBlobsRequest, r.batch_update_blobs),
        f"{_PREFIX}ContentAddressableStorage/BatchReadBlobs": Method(
            pb.BatchReadBlobsRequest, r.batch_read_blobs),
        f"{_PREFIX}ContentAddressableStorage/GetTree": Method(pb.GetTreeRequest, r.get_tree),
        f"{_PREFIX}ActionCache/GetActionResult": Method(pb.GetActionResultRequest, r.get_action_result),
        f"{_PREFIX}ActionCache/UpdateActionResult": Method(
            pb.UpdateActionResultRequest, r.update_action_result),
        "/google.bytestream.ByteStream/Read": Method(bs.ReadRequest, r.read),
        "/google.bytestream.ByteStream/Write": Method(bs.WriteRequest, r.write, client_streaming=True),
        "/google.bytestream.ByteStream/QueryWriteStatus": Method(
            bs.QueryWriteStatusRequest, r.query_write_status),
    }
    if extra is not None:
        services.update(extra(r))
    return services
