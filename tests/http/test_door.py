"""The HTTP cache door of an in-process node, driven over raw sockets: layouts, bad input, limits."""

from __future__ import annotations

import hashlib
import os
import ssl
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trustme

import triode
from triode.concurrency import sole_exception
from triode.errors import InvalidArgument
from triode.model.digest import Digest
from triode.node.http import HttpLimits, HttpServer
from triode.node.httpcache import HttpCache
from triode.proto import remote_execution_pb2 as pb
from triode.testing import no_leaks

from .raw import Raw, put_head

CCACHE_FLAT = "a7750f919mrb75p5n9390jr6hcfrtmdkg"
CCACHE_HEX40 = "a77503d214db6b39725ba46904f668b1fbed9b48"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@asynccontextmanager
async def http_node(tmp_path, **options) -> AsyncIterator[triode.Node]:
    options.setdefault("data", tmp_path / "data")
    async with no_leaks(), triode.open_node(listen="127.0.0.1:0", http="127.0.0.1:0", **options) as node:
        yield node


@asynccontextmanager
async def door_with(node: triode.Node, limits: HttpLimits, **options) -> AsyncIterator[str]:
    """The node's stores behind an HTTP server with ``limits`` (short deadlines, few slots)."""
    storage = node.parts["storage"]
    server = HttpServer(HttpCache(storage.cas, storage.kv, storage.reapi_ac, **options).handle, limits=limits)
    async with trio.open_nursery() as nursery:
        yield await nursery.start(server.serve, "127.0.0.1:0")
        nursery.cancel_scope.cancel()


async def stored(node: triode.Node, data: bytes) -> bool:
    return await node.parts["storage"].cas.contains(Digest.of(data))


async def test_cas_put_get_head_on_one_kept_alive_connection(tmp_path):
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        data = b"hello http"
        h = sha(data)
        assert (await c.request("GET", f"/cas/{h}")).status == 404
        assert (await c.request("HEAD", f"/cas/{h}")).status == 404
        assert (await c.request("PUT", f"/cas/{h}", data)).status == 200
        got = await c.request("GET", f"/cas/{h}")
        assert (got.status, got.body, got.header("content-type")) == (200, data, "application/octet-stream")
        head = await c.request("HEAD", f"/cas/{h}")
        assert (head.status, head.header("content-length"), head.body) == (200, str(len(data)), b"")
        assert (await c.request("GET", f"/some/instance/cas/{h}")).body == data  # one CAS for every prefix
        assert (await c.request("PUT", f"/cas/{h}", data)).status == 200  # again: already there
        empty = await c.request("GET", f"/cas/{sha(b'')}")
        assert (empty.status, empty.body) == (200, b"")
        assert node.parts["storage"].cas.info()["puts"] >= 1


async def test_one_store_behind_every_door(tmp_path):
    async with http_node(tmp_path) as node, node.connect() as client:
        async with await Raw.connect(node.http_address) as c:
            digest = await client.cas.put(b"put through the wire")
            assert (await c.request("GET", f"/cas/{digest.hash}")).body == b"put through the wire"
            data = b"put through http"
            assert (await c.request("PUT", f"/cas/{sha(data)}", data)).status == 200
            assert await client.cas.get(Digest.of(data)) == data


async def test_a_node_in_memory_finds_blobs_put_over_http(tmp_path):
    async with http_node(tmp_path, data=None) as node, await Raw.connect(node.http_address) as c:
        data = b"kept in memory"
        assert (await c.request("PUT", f"/cas/{sha(data)}", data)).status == 200
        assert (await c.request("GET", f"/cas/{sha(data)}")).body == data


async def test_expect_100_continue(tmp_path):
    async with http_node(tmp_path) as node:
        data = b"sent after a 100 Continue"
        async with await Raw.connect(node.http_address) as c:
            await c.send(f"PUT /cas/{sha(data)} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}\r\n"
                         "Expect: 100-continue\r\n\r\n".encode())
            with trio.fail_after(5):
                while b"\r\n\r\n" not in c.buf:
                    await c._fill()
            assert bytes(c.buf).startswith(b"HTTP/1.1 100 Continue\r\n")
            await c.send(data)
            assert (await c.response()).status == 200
            # Already stored: answered at once, without asking for the body.
            await c.send(f"PUT /cas/{sha(data)} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(data)}\r\n"
                         "Expect: 100-continue\r\n\r\n".encode())
            response = await c.response()
            assert (response.status, response.header("connection")) == (200, "close")
            assert await c.closed()


async def test_a_wrong_hash_is_400_stores_nothing_and_the_connection_goes_on(tmp_path):
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        data = b"these bytes"
        wrong = sha(b"other bytes")
        response = await c.request("PUT", f"/cas/{wrong}", data)
        assert response.status == 400 and b"hash to" in response.body
        assert not await stored(node, data)
        assert (await c.request("GET", f"/cas/{wrong}")).status == 404
        assert (await c.request("PUT", f"/cas/{sha(data)}", data)).status == 200


async def test_a_body_cut_short_stores_nothing(tmp_path):
    async with http_node(tmp_path) as node:
        data = os.urandom(300_000)
        async with await Raw.connect(node.http_address) as c:
            await c.send(put_head(f"/cas/{sha(data)}", len(data)) + data[:100_000])
        async with await Raw.connect(node.http_address) as c:  # still serving
            assert (await c.request("GET", f"/cas/{sha(data)}")).status == 404
            assert (await c.request("PUT", f"/cas/{sha(data)}", data)).status == 200
        assert not list((tmp_path / "data" / "tmp").iterdir())  # no temp file left behind


async def test_a_body_longer_than_its_content_length(tmp_path):
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        data = b"0123456789" * 9 + b"junk\r\n\r\n"  # what follows the 90 bytes is read as a request
        await c.send(put_head(f"/cas/{sha(data)}", 90) + data)
        first = await c.response()
        assert first.status == 400  # the first 90 bytes are not the blob named
        second = await c.response()
        assert second.status == 400 and b"bad request" in second.body  # the rest is no request
        assert await c.closed()
        assert not await stored(node, data) and not await stored(node, data[:90])


async def test_a_huge_content_length_is_refused_up_front(tmp_path):
    ten_gib = 10 * 1024**3
    async with http_node(tmp_path, cache_size=1024**3) as node:
        for path in (f"/cas/{sha(b'x')}", f"/ns/{CCACHE_FLAT}", f"/ac/{sha(b'action')}"):
            async with await Raw.connect(node.http_address) as c:
                await c.send(put_head(path, ten_gib))
                response = await c.response()  # without a byte of the body
                assert response.status == 413, path
                assert response.header("connection") == "close"
                assert await c.closed()
        async with await Raw.connect(node.http_address) as c:
            assert (await c.request("PUT", f"/cas/{sha(b'x')}", b"x")).status == 200


async def test_a_large_content_length_under_the_limit_is_streamed_not_buffered(tmp_path):
    ten_gib = 10 * 1024**3
    async with http_node(tmp_path) as node:  # no cache size: blobs up to 64 GiB
        async with await Raw.connect(node.http_address) as c:
            await c.send(put_head(f"/cas/{sha(b'x')}", ten_gib))
            for _ in range(16):
                await c.send(b"\0" * (1 << 20))
        async with await Raw.connect(node.http_address) as c:
            assert (await c.request("HEAD", f"/cas/{sha(b'x')}")).status == 404
        with trio.fail_after(10):
            while list((tmp_path / "data" / "tmp").iterdir()):  # noqa: ASYNC110 - the partial upload goes
                await trio.sleep(0.05)


async def test_put_and_get_stream_with_bounded_memory(tmp_path):
    size = 96 * 1024 * 1024
    block = os.urandom(1 << 20)
    hasher = hashlib.sha256()
    for _ in range(size >> 20):
        hasher.update(block)
    h = hasher.hexdigest()
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        tracemalloc.start()
        try:
            await c.send(put_head(f"/cas/{h}", size))
            for _ in range(size >> 20):
                await c.send(block)
            assert (await c.response()).status == 200
            await c.send(f"GET /cas/{h} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            received = hashlib.sha256()
            total = 0
            while b"\r\n\r\n" not in c.buf:
                await c._fill()
            _, _, rest = bytes(c.buf).partition(b"\r\n\r\n")
            received.update(rest)
            total = len(rest)
            while total < size:
                chunk = await c.stream.receive_some(1 << 20)
                received.update(chunk)
                total += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert received.hexdigest() == h
        assert peak < 40 * 1024 * 1024, f"peak {peak / 2**20:.0f} MiB for a {size >> 20} MiB put and get"


async def _reapi_result(c: Raw) -> bytes:
    out, err = b"compiled output", b"a warning"
    for blob in (out, err):
        assert (await c.request("PUT", f"/cas/{sha(blob)}", blob)).status == 200
    result = pb.ActionResult(
        output_files=[pb.OutputFile(path="bazel-out/k8/bin/a.o",
                                    digest=pb.Digest(hash=sha(out), size_bytes=len(out)))],
        stderr_digest=pb.Digest(hash=sha(err), size_bytes=len(err)),
        exit_code=0,
    )
    return result.SerializeToString()


async def test_action_results_round_trip_and_are_checked(tmp_path):
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        action = sha(b"an action")
        assert (await c.request("GET", f"/ac/{action}")).status == 404
        raw = await _reapi_result(c)
        assert (await c.request("PUT", f"/ac/{action}", raw)).status == 200
        got = await c.request("GET", f"/ac/{action}")
        assert (got.status, got.body) == (200, raw)
        assert (await c.request("HEAD", f"/main/ac/{action}")).status == 200
        assert await node.parts["storage"].reapi_ac.get(action) == raw  # what the gRPC door reads

        other = sha(b"another action")
        bad = await c.request("PUT", f"/ac/{other}", b"\xff\xfe not a protobuf")
        assert bad.status == 400 and b"not an ActionResult" in bad.body
        escaping = pb.ActionResult(output_files=[pb.OutputFile(
            path="../../etc/passwd", digest=pb.Digest(hash=sha(b"x"), size_bytes=1))]).SerializeToString()
        bad = await c.request("PUT", f"/ac/{other}", escaping)
        assert bad.status == 400 and b"'..'" in bad.body
        missing = pb.ActionResult(output_files=[pb.OutputFile(
            path="a", digest=pb.Digest(hash=sha(b"never uploaded"), size_bytes=14))]).SerializeToString()
        bad = await c.request("PUT", f"/ac/{other}", missing)
        assert bad.status == 400 and b"not in the CAS" in bad.body
        assert (await c.request("GET", f"/ac/{other}")).status == 404
        assert (await c.request("GET", "/ac/not-a-hash")).status == 400


async def test_an_action_result_whose_blob_is_gone_is_a_miss(tmp_path):
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        action = sha(b"an action")
        assert (await c.request("PUT", f"/ac/{action}", await _reapi_result(c))).status == 200
        cas = node.parts["storage"].cas
        gone = Digest.of(b"compiled output")
        assert cas.drop_damaged(gone, os.stat(cas.path_of(gone)).st_ino)
        assert (await c.request("GET", f"/ac/{action}")).status == 404
        assert (await c.request("GET", f"/cas/{gone.hash}")).status == 404


async def test_ccache_layouts_share_entries_per_namespace(tmp_path):
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        value = b"\xcc\xac\x01\x00 a ccache entry"
        assert (await c.request("GET", f"/team/{CCACHE_FLAT}")).status == 404
        assert (await c.request("PUT", f"/team/{CCACHE_FLAT[:2]}/{CCACHE_FLAT[2:]}", value)).status == 200
        for path in (f"/team/{CCACHE_FLAT}", f"/team/{CCACHE_FLAT[:2]}/{CCACHE_FLAT[2:]}",
                     f"/team/ac/{CCACHE_HEX40}{CCACHE_HEX40[:24]}"):
            got = await c.request("GET", path)
            assert (got.status, got.body) == (200, value), path
        assert (await c.request("HEAD", f"/team/{CCACHE_FLAT}")).header("content-length") == str(len(value))
        assert (await c.request("GET", f"/other/{CCACHE_FLAT}")).status == 404  # namespaces are apart
        assert (await c.request("GET", f"/{CCACHE_FLAT}")).status == 404
        # A ccache value is a blob of the one CAS, too.
        assert (await c.request("GET", f"/cas/{sha(value)}")).body == value
        assert await node.parts["storage"].kv.get("ccache/team", CCACHE_HEX40) == Digest.of(value)


async def test_a_large_ccache_value_goes_through_a_temp_file(tmp_path):
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        value = os.urandom(5 * 1024 * 1024 + 3)
        assert (await c.request("PUT", f"/team/ac/{CCACHE_HEX40}{CCACHE_HEX40[:24]}", value)).status == 200
        assert (await c.request("GET", f"/team/{CCACHE_FLAT}")).body == value
        assert not list((tmp_path / "data" / "tmp").iterdir())
        assert await stored(node, value)


async def test_methods_and_framing_that_are_refused(tmp_path):
    async with http_node(tmp_path) as node:
        async with await Raw.connect(node.http_address) as c:
            response = await c.request("DELETE", f"/cas/{sha(b'x')}")
            assert response.status == 405 and response.header("allow") == "GET, HEAD, PUT"
            response = await c.request("POST", "/metrics")
            assert response.status == 405
            assert (await c.request("GET", "/nowhere")).status == 404
            await c.send(f"PUT /cas/{sha(b'x')} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                         "1\r\nx\r\n0\r\n\r\n".encode())
            assert (await c.response()).status == 411
        for garbage in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: t\r\nbad header line\r\n\r\n"):
            async with await Raw.connect(node.http_address) as c:
                await c.send(garbage)
                assert (await c.response()).status == 400
                assert await c.closed()
        async with await Raw.connect(node.http_address) as c:
            await c.send(b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
            assert (await c.response()).status == 431
            assert await c.closed()
        async with await Raw.connect(node.http_address) as c:
            assert (await c.request("GET", f"/cas/{sha(b'')}")).status == 200  # still serving


async def test_metrics_are_served_on_the_http_listener(tmp_path):
    async with http_node(tmp_path) as node, await Raw.connect(node.http_address) as c:
        assert (await c.request("GET", f"/cas/{sha(b'absent')}")).status == 404
        response = await c.request("GET", "/metrics")
        assert response.status == 200 and b"triode_sched_capacity" in response.body
        assert response.header("content-type").startswith("text/plain; version=0.0.4")
        assert b"triode_http_cas_misses 1" in response.body  # the door's own figures
        info = node.info()["http"]
        assert info["address"] == node.http_address and info["requests"] == 2


async def test_an_address_in_use_is_a_clear_error(tmp_path):
    async with no_leaks():
        listener = trio.socket.socket()
        with listener:
            await listener.bind(("127.0.0.1", 0))
            listener.listen()
            taken = f"127.0.0.1:{listener.getsockname()[1]}"
            # Like a wire listen address in use: the one error, in the group of the nursery
            # the node was starting in (the command shows it alone).
            with pytest.raises(BaseException) as info:
                async with triode.open_node(listen=None, http=taken):
                    pass
            error = sole_exception(info.value)
            assert isinstance(error, InvalidArgument)
            assert f"cannot serve the HTTP cache on {taken}" in error.message


async def test_auth_with_a_token(tmp_path):
    import base64

    def basic(password: str) -> str:
        return "Basic " + base64.b64encode(f"ccache:{password}".encode()).decode()

    data = b"secret stuff"
    async with http_node(tmp_path, token="s3cret") as node, await Raw.connect(node.http_address) as c:
        refused = await c.request("PUT", f"/cas/{sha(data)}", data)
        assert refused.status == 401
        assert any(v.startswith("Basic") for v in refused.headers["www-authenticate"])
        assert not await stored(node, data)
        assert (await c.request("GET", f"/cas/{sha(data)}")).status == 401
        assert (await c.request("GET", "/metrics")).status == 401
        path = f"/cas/{sha(data)}"
        assert (await c.request("PUT", path, data, {"Authorization": "Bearer wrong"})).status == 401
        assert (await c.request("PUT", path, data, {"Authorization": basic("wrong")})).status == 401
        assert (await c.request("PUT", path, data, {"Authorization": "Bearer s3cret"})).status == 200
        assert (await c.request("GET", path, headers={"Authorization": basic("s3cret")})).body == data


async def test_unauthenticated_reads_when_allowed(tmp_path):
    data = b"public stuff"
    async with http_node(tmp_path, token="s3cret", allow_unauthenticated_reads=True) as node:
        async with await Raw.connect(node.http_address) as c:
            path = f"/cas/{sha(data)}"
            assert (await c.request("PUT", path, data)).status == 401
            assert (await c.request("PUT", path, data, {"Authorization": "Bearer s3cret"})).status == 200
            assert (await c.request("GET", path)).body == data
            assert (await c.request("HEAD", path)).status == 200
            assert (await c.request("GET", path, headers={"Authorization": "Bearer no"})).status == 401


async def test_wrong_tokens_are_throttled_per_address(tmp_path):
    async with http_node(tmp_path, token="s3cret") as node, await Raw.connect(node.http_address) as c:
        statuses = [(await c.request("GET", "/metrics", headers={"Authorization": "Bearer guess"})).status
                    for _ in range(12)]
        assert statuses[0] == 401 and statuses[-1] == 429, statuses
        throttled = await c.request("GET", "/metrics", headers={"Authorization": "Bearer s3cret"})
        assert throttled.status == 429 and int(throttled.header("retry-after")) >= 1


async def test_action_results_only_from_the_nodes_own_executions(tmp_path):
    async with http_node(tmp_path, ac_writes="executor") as node, await Raw.connect(node.http_address) as c:
        response = await c.request("PUT", f"/ac/{sha(b'an action')}", await _reapi_result(c))
        assert response.status == 403 and b"--ac-writes executor" in response.body
        value = b"\xcc\xac a ccache entry"  # ccache's entries are not action results
        assert (await c.request("PUT", f"/ns/ac/{CCACHE_HEX40}{CCACHE_HEX40[:24]}", value)).status == 200


async def test_slow_heads_stalled_bodies_and_idle_connections_are_cut(tmp_path):
    limits = HttpLimits(head_timeout=0.5, idle_timeout=0.5, io_timeout=0.5)
    async with no_leaks(), triode.open_node(data=tmp_path / "data", listen=None) as node:
        async with door_with(node, limits) as address:
            async with await Raw.connect(address) as c:  # a head that never ends
                await c.send(b"GET /cas/")
                response = await c.response()
                assert response.status == 408 and b"did not arrive" in response.body
                assert await c.closed()
            async with await Raw.connect(address) as c:  # a body that stalls
                data = b"x" * 1000
                await c.send(put_head(f"/cas/{sha(data)}", 1000) + data[:10])
                response = await c.response()
                assert response.status == 408 and b"stalled" in response.body
                assert await c.closed()
                assert not await stored(node, data)
            async with await Raw.connect(address) as c:  # idle: closed without a word
                start = trio.current_time()
                assert await c.closed(within=5)
                assert 0.4 < trio.current_time() - start < 3 and not c.buf
            async with await Raw.connect(address) as c:  # idle after a request
                assert (await c.request("GET", f"/cas/{sha(b'')}")).status == 200
                assert await c.closed(within=5)


async def test_connections_are_bounded(tmp_path):
    limits = HttpLimits(max_connections=2)
    async with no_leaks(), triode.open_node(data=tmp_path / "data", listen=None) as node:
        async with door_with(node, limits) as address:
            first, second = await Raw.connect(address), await Raw.connect(address)
            try:
                assert (await first.request("GET", f"/cas/{sha(b'')}")).status == 200
                assert (await second.request("GET", f"/cas/{sha(b'')}")).status == 200
                async with await Raw.connect(address) as third:  # in the kernel's backlog
                    await third.send(f"GET /cas/{sha(b'')} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                    with trio.move_on_after(0.5) as waited:
                        await third.response()
                    assert waited.cancelled_caught  # not served while two are open
                    await first.aclose()
                    assert (await third.response()).status == 200
            finally:
                await first.aclose()
                await second.aclose()


async def test_tls_with_the_nodes_certificate(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    async with http_node(tmp_path, tls_cert=cert_file, tls_key=key_file) as node:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        host, port = node.http_address.rsplit(":", 1)
        tcp = await trio.open_tcp_stream(host, int(port))
        async with Raw(trio.SSLStream(tcp, context, server_hostname="127.0.0.1")) as c:
            data = b"over tls"
            assert (await c.request("PUT", f"/cas/{sha(data)}", data)).status == 200
            assert (await c.request("GET", f"/cas/{sha(data)}")).body == data
        async with await Raw.connect(node.http_address) as plain:  # plain HTTP gets nowhere
            await plain.send(f"GET /cas/{sha(data)} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            with pytest.raises((EOFError, trio.BrokenResourceError, ValueError)):
                await plain.response()


async def test_shutdown_closes_kept_alive_connections(tmp_path):
    async with no_leaks():
        async with triode.open_node(listen=None, http="127.0.0.1:0", shutdown_grace=5) as node:
            c = await Raw.connect(node.http_address)
            assert (await c.request("GET", f"/cas/{sha(b'')}")).status == 200
            start = trio.current_time()
        assert trio.current_time() - start < 3  # the idle connection did not hold the shutdown
        assert await c.closed(within=1)
        await c.aclose()
