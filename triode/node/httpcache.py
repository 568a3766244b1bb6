"""The HTTP cache door (``--http``): bazel-remote's layout for Bazel, and ccache's remote storage.

Paths (an optional instance prefix ``/NAME/...``, one or more segments, comes first):

- ``/cas/HASH``: a blob of the node's CAS by its SHA-256. A PUT is verified against HASH
  as it streams into the store (400 on a mismatch, nothing stored).
- ``/ac/HASH``: the REAPI action cache (:class:`~triode.storage.reapi_ac.ReapiActionCache`):
  values are ``ActionResult`` protobufs, validated on PUT and answered on GET only while
  every blob they refer to is stored. The instance prefix does not split the CAS or the
  action cache: one store behind every door, as bazel-remote does.
- ccache's three layouts, its keys mapped to blobs in the key-value store, one namespace
  per instance (``ccache/NAME``): ``subdirs`` (``/NAME/d7/cblvnrht6k4gv2oka05qjnhs62nk94k``),
  ``flat`` (``/NAME/d7cblvnrht6k4gv2oka05qjnhs62nk94k``) and ``bazel``
  (``/NAME/ac/<64 hex>``). All three name the same 20-byte key, so they share entries.
- ``/metrics``: the node's Prometheus metrics.

**Which ``/ac/`` values are ccache's.** ccache's ``bazel`` layout writes its 20-byte key
as 40 hex digits and pads it to 64 by repeating its first 24 digits. A key whose last 24
hex digits repeat its first 24 is therefore a ccache entry (stored as it comes, in the
instance's ccache namespace); any other is an action hash, whose value must be an
ActionResult. The rule needs no configuration and cannot misfile a real action: the
SHA-256 of an Action ends with its own first 24 digits with probability 2^-96, and a
client that picks such a key on purpose only reaches the ccache namespace, which no
action lookup reads.

Auth, when the node has a token: ``Authorization: Bearer TOKEN``, or basic auth with the
token as the password (any user name). With ``allow_unauthenticated_reads`` a GET or HEAD
without credentials is served; wrong credentials are refused either way (401), and count
against the address in the node's wrong-token throttle (429 once it runs dry). The node's
other admission rules hold here too: ``--ac-writes executor`` refuses ``PUT /ac/`` (403),
and every download reserves its chunks in the node's byte budget before reading them.
Statuses and limits are listed in docs/protocol.md, "HTTP cache".

The routing and the auth check are pure functions (:func:`route`, :func:`auth_failure`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import math
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import trio

from ..chunks import INLINE_LIMIT, READ_CHUNK
from ..errors import (
    BlobNotFound,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TooLarge,
    TriodeError,
    Unavailable,
)
from ..model.digest import EMPTY, Digest, Hasher
from ..storage.cas import CAS, WRITE_BATCH
from ..storage.disk import DiskCAS
from ..storage.keyvalue import KeyValueStore
from ..storage.reapi_ac import MAX_RESULT_SIZE, ReapiActionCache
from .http import HttpExchange, HttpLimits, HttpServer, answer_metrics, bound_address, open_listeners

if TYPE_CHECKING:
    from .node import Node

__all__ = [
    "Route",
    "RouteError",
    "route",
    "ccache_key",
    "auth_failure",
    "credentials_match",
    "status_of",
    "HttpCache",
    "HttpDoor",
    "start_http_door",
    "CCACHE_NAMESPACE",
    "SIZE_NAMESPACE",
]

log = logging.getLogger("triode.node.httpcache")

OCTET = "application/octet-stream"
#: Key-value namespace of ccache entries (``ccache/NAME`` with an instance prefix).
CCACHE_NAMESPACE = "ccache"
#: Key-value namespace mapping a hash to its blob's digest, for a CAS that cannot look a
#: blob up by hash alone (a store in memory); a disk store is looked up on disk.
SIZE_NAMESPACE = "http.cas"
#: ccache values up to this size are read into memory; larger ones go to a temp file.
SMALL_VALUE = 1024 * 1024
#: The largest ccache value a node without a data dir takes (it has no temp dir to spool to).
MEMORY_VALUE_LIMIT = 64 * 1024 * 1024
#: Longest instance prefix, in characters.
MAX_INSTANCE = 256
#: Uploads over SMALL_VALUE in progress at once; the rest wait their turn (each may hold a
#: few CAS write batches of 4 MiB in memory while it is written).
LARGE_UPLOADS = 16

_HEX64 = re.compile(r"[0-9a-f]{64}")
_CCACHE_KEY = re.compile(r"[0-9a-f]{4}[0-9a-v]{29}")
_READS = ("GET", "HEAD")
_CHALLENGES = [("www-authenticate", 'Basic realm="triode", charset="UTF-8"'),
               ("www-authenticate", 'Bearer realm="triode"')]


# -- routing (sans-I/O) ------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    kind: Literal["cas", "ac", "ccache", "metrics"]
    #: The 64-hex hash (cas, ac), or ccache's key as 40 hex digits; "" for metrics.
    key: str = ""
    #: The instance prefix, "" when there is none.
    instance: str = ""

    @property
    def namespace(self) -> str:
        """The key-value namespace of a ccache route."""
        return f"{CCACHE_NAMESPACE}/{self.instance}" if self.instance else CCACHE_NAMESPACE


class RouteError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def ccache_key(text: str) -> str | None:
    """ccache's key as 40 hex digits, from its text form (4 hex digits, then 18 bytes in
    lowercase base32hex: ``d7cblvnrht6k4gv2oka05qjnhs62nk94k``); None when it is not one."""
    if not _CCACHE_KEY.fullmatch(text):
        return None
    try:
        tail = base64.b32hexdecode(text[4:].upper() + "===")
    except binascii.Error:
        return None
    return text[:4] + tail.hex()


def _is_ccache_bazel_key(h: str) -> bool:
    return h[40:] == h[:24]


def route(path: str) -> Route:
    """What ``path`` names; RouteError (404, or 400 for a bad hash) when nothing."""
    if path == "/metrics":
        return Route("metrics")
    if not path.startswith("/"):
        raise RouteError(400, f"expected an absolute path, got {path[:200]!r}")
    segments = path[1:].split("/")
    if any(s in ("", ".", "..") for s in segments):
        raise RouteError(404, f"no such path: {path[:200]!r} (empty, '.' or '..' segment)")

    def instance(n: int) -> str:
        prefix = "/".join(segments[:-n])
        if len(prefix) > MAX_INSTANCE:
            raise RouteError(404, f"the instance prefix is over {MAX_INSTANCE} characters")
        return prefix

    last = segments[-1]
    if len(segments) >= 2 and segments[-2] in ("cas", "ac"):
        if _HEX64.fullmatch(last):
            if segments[-2] == "ac" and _is_ccache_bazel_key(last):
                return Route("ccache", last[:40], instance(2))
            return Route("ac" if segments[-2] == "ac" else "cas", last, instance(2))
    if len(segments) >= 2 and len(segments[-2]) == 2:
        key = ccache_key(segments[-2] + last)
        if key is not None:
            return Route("ccache", key, instance(2))
    key = ccache_key(last)
    if key is not None:
        return Route("ccache", key, instance(1))
    if len(segments) >= 2 and segments[-2] in ("cas", "ac"):
        raise RouteError(400, f"/{segments[-2]}/ takes a SHA-256 in 64 lowercase hex digits, "
                              f"got {last[:80]!r}")
    raise RouteError(404, f"no such path: {path[:200]!r}; this node serves /cas/HASH, /ac/HASH (each with "
                          "an optional /NAME/ prefix), ccache's layouts and /metrics")


# -- auth (sans-I/O) ---------------------------------------------------------------------------


def credentials_match(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``token``: as a bearer token, or as the
    password of basic auth (any user)."""
    if header is None:
        return False
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    scheme = scheme.lower()
    expected = token.encode()
    if scheme == "bearer":
        return hmac.compare_digest(credentials.encode("utf-8", "surrogateescape"), expected)
    if scheme == "basic":
        try:
            decoded = base64.b64decode(credentials.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return False
        _, sep, password = decoded.partition(b":")
        return bool(sep) and hmac.compare_digest(password, expected)
    return False


def auth_failure(
    method: str, header: str | None, token: str | None, allow_unauthenticated_reads: bool
) -> str | None:
    """Why a request may not be served (the 401's message), or None when it may."""
    if token is None:
        return None
    if header is None:
        if allow_unauthenticated_reads and method in _READS:
            return None
        return ("this node needs credentials: Authorization: Bearer TOKEN, or basic auth with the "
                "token as the password")
    if not credentials_match(header, token):
        return "the credentials given are not this node's token"
    return None


# -- errors ------------------------------------------------------------------------------------


def status_of(exc: TriodeError) -> int:
    """The HTTP status for an error from the store."""
    if isinstance(exc, TooLarge):
        return 413
    if isinstance(exc, PermissionDenied):
        return 403
    if isinstance(exc, (InvalidArgument, FailedPrecondition)):
        return 400
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, (ResourceExhausted, Unavailable)):
        return 503
    if isinstance(exc, DeadlineExceeded):
        return 504
    return 500


# -- the handler -------------------------------------------------------------------------------


class Throttle(Protocol):
    """The node's count of wrong tokens per address (``TokenThrottle``)."""

    def take(self, address: str) -> float: ...

    def give_back(self, address: str) -> None: ...


class Budget(Protocol):
    """The node's bytes of blob data held for downloads at once (``ByteBudget``)."""

    async def acquire(self, n: int) -> None: ...

    def release(self, n: int) -> None: ...


class _Budgeted:
    """A blob's chunks, each read only once its bytes are reserved in the node's budget;
    a chunk's reservation is given back when the next is asked for (it has been sent)."""

    def __init__(self, chunks: AsyncIterator[bytes], budget: Budget, size: int) -> None:
        self._chunks = chunks
        self._budget = budget
        self._left = size
        self._held = 0

    def __aiter__(self) -> _Budgeted:
        return self

    async def __anext__(self) -> bytes:
        self.release()
        if self._left <= 0:
            raise StopAsyncIteration
        want = min(READ_CHUNK, self._left)
        await self._budget.acquire(want)
        self._held = want
        chunk = await self._chunks.__anext__()
        self._left -= len(chunk)
        return chunk

    def release(self) -> None:
        if self._held:
            self._budget.release(self._held)
            self._held = 0


class _Nothing:
    def __aiter__(self) -> _Nothing:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


class HttpCache:
    """Answers one request of the HTTP cache door (see the module's doc)."""

    def __init__(
        self,
        cas: CAS,
        kv: KeyValueStore,
        reapi_ac: ReapiActionCache,
        *,
        token: str | None = None,
        allow_unauthenticated_reads: bool = False,
        metrics: Callable[[], str] | None = None,
        ac_writes: str = "any",
        throttle: Throttle | None = None,
        budget: Budget | None = None,
    ) -> None:
        self.cas = cas
        self.kv = kv
        self.reapi_ac = reapi_ac
        self.token = token
        self.allow_unauthenticated_reads = allow_unauthenticated_reads
        self.metrics = metrics
        #: "executor": action results are taken only from the node's own executions (PUT /ac/ is 403).
        self.ac_writes = ac_writes
        self.throttle = throttle
        self.budget = budget
        self._large_uploads = trio.CapacityLimiter(LARGE_UPLOADS)
        self.spool_dir: Path | None = cas.tmp_dir if isinstance(cas, DiskCAS) else None
        self.counters: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def handle(self, ex: HttpExchange) -> None:
        request = ex.request
        header = request.headers.get("authorization")
        throttled = self.token is not None and header is not None and self.throttle is not None
        if throttled:
            assert self.throttle is not None
            wait = self.throttle.take(ex.peer)  # before the token is even compared
            if wait:
                self._count("throttled")
                await ex.respond(429, f"too many wrong tokens from {ex.peer}: wait {wait:.1f}s\n",
                                 headers=[("retry-after", str(max(1, math.ceil(wait))))])
                return
        refusal = auth_failure(request.method, header, self.token, self.allow_unauthenticated_reads)
        if throttled and refusal is None:
            assert self.throttle is not None
            self.throttle.give_back(ex.peer)  # only wrong tokens count
        if refusal is not None:
            self._count("unauthenticated")
            await ex.respond(401, refusal + "\n", headers=_CHALLENGES)
            return
        try:
            where = route(request.path)
        except RouteError as exc:
            await ex.respond(exc.status, exc.message + "\n")
            return
        if where.kind == "metrics":
            await answer_metrics(ex, self.metrics)
            return
        if request.method not in ("GET", "HEAD", "PUT"):
            await ex.respond(405, f"{request.method} is not served here: GET, HEAD or PUT\n",
                             headers=[("allow", "GET, HEAD, PUT")])
            return
        try:
            if request.method == "PUT":
                await self._put(ex, where)
            else:
                await self._get(ex, where)
        except TriodeError as exc:
            if ex.responded:
                raise
            status = status_of(exc)
            self._count(f"status_{status}")
            headers = []
            retry = exc.details.get("retry_after")
            if status == 503 and isinstance(retry, (int, float)):
                headers.append(("retry-after", str(max(1, round(retry)))))
            await ex.respond(status, f"{exc.message or exc.code}\n", headers=headers)

    # -- reads -----------------------------------------------------------------------------

    async def _get(self, ex: HttpExchange, where: Route) -> None:
        if where.kind == "ac":
            raw = await self.reapi_ac.get(where.key)
            if raw is None:
                self._count("ac_misses")
                await ex.respond(404, f"no complete action result for {where.key}\n")
                return
            self._count("ac_hits")
            await ex.respond(200, raw, content_type=OCTET)
            return
        if where.kind == "cas":
            digest = await self._find_blob(where.key)
            what = f"blob {where.key}"
        else:
            digest = await self.kv.get(where.namespace, where.key)
            what = f"ccache entry {where.key} in {where.namespace}"
        if digest is None:
            self._count(f"{where.kind}_misses")
            await ex.respond(404, f"no {what}\n")
            return
        if ex.request.method == "HEAD":
            self._count(f"{where.kind}_hits")
            await ex.respond_stream(200, digest.size, _Nothing(), content_type=OCTET)
            return
        try:
            if digest.size <= INLINE_LIMIT:  # one read, on the event loop
                data = await self.cas.get(digest)
                self._count(f"{where.kind}_hits")
                await ex.respond(200, data, content_type=OCTET)
                return
            async with self.cas.open_read(digest) as chunks:
                self._count(f"{where.kind}_hits")
                if self.budget is None:
                    await ex.respond_stream(200, digest.size, chunks, content_type=OCTET)
                else:
                    budgeted = _Budgeted(chunks, self.budget, digest.size)
                    try:
                        await ex.respond_stream(200, digest.size, budgeted, content_type=OCTET)
                    finally:
                        budgeted.release()
        except BlobNotFound:
            if ex.responded:
                raise
            self._count(f"{where.kind}_misses")
            await ex.respond(404, f"no {what} (evicted just now)\n")

    async def _find_blob(self, h: str) -> Digest | None:
        """The digest of the stored blob whose hash is ``h`` (the path gives no size)."""
        if h == EMPTY.hash:
            return EMPTY
        if isinstance(self.cas, DiskCAS):
            # One stat of the file the disk store keeps the blob in; the read that
            # follows checks it again.
            await trio.lowlevel.checkpoint()
            try:
                size = os.stat(self.cas.blob_file(h)).st_size
            except FileNotFoundError:
                size = None
            if size is not None:
                return Digest(h, size)
        return await self.kv.get(SIZE_NAMESPACE, h)

    # -- writes ----------------------------------------------------------------------------

    def _length(self, ex: HttpExchange, limit: int) -> int:
        length = ex.request.content_length
        if length is None:
            if ex.request.has_body:
                raise _LengthRequired()
            length = 0
        if length > limit:
            raise TooLarge(f"the body is {length} bytes, over this node's limit of {limit}",
                           size=length, limit=limit)
        return length

    async def _put(self, ex: HttpExchange, where: Route) -> None:
        limit = MAX_RESULT_SIZE if where.kind == "ac" else self.cas.max_blob_size
        if where.kind == "ccache" and self.spool_dir is None:
            limit = min(limit, MEMORY_VALUE_LIMIT)
        try:
            length = self._length(ex, limit)
        except _LengthRequired:
            await ex.respond(411, "a PUT needs a Content-Length (chunked uploads are not taken)\n")
            return
        if where.kind == "ac" and self.ac_writes != "any":
            raise PermissionDenied(
                "this node takes action results only from actions it ran itself (--ac-writes executor)"
            )
        if length > SMALL_VALUE:
            async with self._large_uploads:
                await self._store(ex, where, length)
        else:
            await self._store(ex, where, length)
        self._count(f"{where.kind}_puts")
        await ex.respond(200, b"")

    async def _store(self, ex: HttpExchange, where: Route, length: int) -> None:
        if where.kind == "cas":
            digest = Digest(where.key, length)
            await self.cas.put_stream(ex.body(), digest)
            if not isinstance(self.cas, DiskCAS):
                await self.kv.put(SIZE_NAMESPACE, where.key, digest)
        elif where.kind == "ac":
            await self.reapi_ac.update(where.key, await ex.read_body(length))
        else:
            digest = await self._store_value(ex, length)
            await self.kv.put(where.namespace, where.key, digest)

    async def _store_value(self, ex: HttpExchange, length: int) -> Digest:
        """Store a body whose hash is not known ahead (a ccache value): small ones from
        memory; larger ones through a temp file, hashed as they are written."""
        if length <= SMALL_VALUE or self.spool_dir is None:
            return await self.cas.put(await ex.read_body(length))
        path = self.spool_dir / f"{os.getpid()}.http.{os.urandom(6).hex()}"
        hasher = Hasher()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                batch: list[bytes] = []
                held = 0
                async for chunk in ex.body():
                    batch.append(chunk)
                    held += len(chunk)
                    if held >= WRITE_BATCH:
                        await trio.to_thread.run_sync(_write_hashed, fd, batch, hasher)
                        batch, held = [], 0
                if batch:
                    if held <= INLINE_LIMIT:
                        _write_hashed(fd, batch, hasher)
                    else:
                        await trio.to_thread.run_sync(_write_hashed, fd, batch, hasher)
            finally:
                os.close(fd)
            return await self.cas.put_file(path, hasher.digest())
        finally:
            path.unlink(missing_ok=True)


class _LengthRequired(Exception):
    pass


def _write_hashed(fd: int, chunks: list[bytes], hasher: Hasher) -> None:
    for chunk in chunks:
        hasher.update(chunk)
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


# -- the door in a node ------------------------------------------------------------------------


class HttpDoor:
    """The ``--http`` listener of a node: its server, and the scope of its accept loops.

    It reports its figures as ``node.info()["http"]`` (and so in the metrics)."""

    name = "http"

    def __init__(self, server: HttpServer, cache: HttpCache, address: str) -> None:
        self.server = server
        self.cache = cache
        self.address = address
        self._accepting = trio.CancelScope()

    def info(self) -> dict[str, object]:
        return {"address": self.address, **self.server.info(), **self.cache.counters}

    async def _accept_all(self, listeners: list[trio.SocketListener], serving: trio.Nursery) -> None:
        with self._accepting:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    accepting.start_soon(self.server.accept, listener, serving)

    def stop_accepting(self) -> None:
        self._accepting.cancel()

    async def drain(self, grace: float) -> None:
        self.stop_accepting()
        await self.server.drain(grace)


async def start_http_door(node: Node, serving: trio.Nursery, *, limits: HttpLimits | None = None) -> HttpDoor:
    """Listen on ``node.config.http``; connections are served in ``serving`` (the nursery of
    the node's connections, closed before its parts)."""
    config = node.config
    assert config.http is not None
    storage = node.parts["storage"]
    sched = node.parts.get("sched")
    cache = HttpCache(
        storage.cas,  # type: ignore[attr-defined]
        storage.kv,  # type: ignore[attr-defined]
        storage.reapi_ac,  # type: ignore[attr-defined]
        token=config.token,
        allow_unauthenticated_reads=config.allow_unauthenticated_reads,
        metrics=getattr(sched, "render_metrics", None),
        # The node's admission rules, where it has them: who may write the action cache,
        # wrong tokens per address, and the bytes all downloads may hold at once.
        ac_writes=getattr(config, "ac_writes", "any"),
        throttle=getattr(node, "_throttle", None),
        budget=getattr(node, "budget", None),
    )
    if limits is None:
        limits = HttpLimits(max_connections=config.max_connections)
    server = HttpServer(cache.handle, limits=limits, tls=node._tls, name="http")
    listeners = await open_listeners(config.http, "serve the HTTP cache")
    door = HttpDoor(server, cache, bound_address(listeners))
    serving.start_soon(door._accept_all, listeners, serving)
    node.parts.setdefault(door.name, door)  # for node.info() and the metrics; closed by the caller
    return door
