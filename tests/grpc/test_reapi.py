"""grpcio drives every cache method of the gRPC door and its error paths: Capabilities, CAS,
ByteStream, ActionCache; auth and TLS."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import uuid
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.settings
import pytest
import trio
import trustme
import zstandard

import triode
from triode.model.digest import Digest
from triode.node import grpc as grpc_door
from triode.proto import bytestream_pb2 as bs
from triode.proto import error_details_pb2
from triode.proto import remote_execution_pb2 as pb
from triode.testing import no_leaks

from .conftest import BYTESTREAM, REAPI, Rpc, status_of

CAS = REAPI + "ContentAddressableStorage/"
AC = REAPI + "ActionCache/"


def digest_of(data: bytes) -> pb.Digest:
    return pb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def name_of(d: pb.Digest) -> str:
    return f"{d.hash}/{d.size_bytes}"


async def put(rpc: Rpc, *blobs: bytes) -> list[pb.Digest]:
    request = pb.BatchUpdateBlobsRequest(
        requests=[pb.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b) for b in blobs]
    )
    response = await rpc.unary(CAS + "BatchUpdateBlobs", request, pb.BatchUpdateBlobsResponse)
    assert [r.status.code for r in response.responses] == [0] * len(blobs)
    return [digest_of(b) for b in blobs]


async def write(
    rpc: Rpc,
    data: bytes,
    *,
    chunk: int = 64 * 1024,
    upload: str | None = None,
    offset: int = 0,
    compressed: bool = False,
) -> bs.WriteResponse:
    d = digest_of(data)
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    resource = f"uploads/{upload or uuid.uuid4()}/{kind}/{name_of(d)}"
    payload = zstandard.ZstdCompressor().compress(data) if compressed else data[offset:]
    requests = []
    pos = 0
    while True:
        piece = payload[pos : pos + chunk]
        requests.append(
            bs.WriteRequest(
                resource_name=resource if not requests else "",
                write_offset=offset + pos,
                data=piece,
                finish_write=pos + len(piece) >= len(payload),
            )
        )
        pos += len(piece)
        if pos >= len(payload):
            break
    return await rpc.upload(BYTESTREAM + "Write", requests, bs.WriteResponse)


async def read(rpc: Rpc, d: pb.Digest, *, offset: int = 0, limit: int = 0, compressed: bool = False) -> bytes:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    parts = await rpc.stream(
        BYTESTREAM + "Read",
        bs.ReadRequest(resource_name=f"instance/a/{kind}/{name_of(d)}", read_offset=offset, read_limit=limit),
        bs.ReadResponse,
    )
    data = b"".join(p.data for p in parts)
    return zstandard.ZstdDecompressor().decompressobj().decompress(data) if compressed else data


async def fails(code: grpc.StatusCode, call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


# -- Capabilities ----------------------------------------------------------------------------


async def test_capabilities(rpc: Rpc) -> None:
    caps = await rpc.unary(
        REAPI + "Capabilities/GetCapabilities",
        pb.GetCapabilitiesRequest(instance_name="x"),
        pb.ServerCapabilities,
    )
    cache = caps.cache_capabilities
    assert list(cache.digest_function) == [pb.DigestFunction.SHA256]
    assert cache.action_cache_update_capabilities.update_enabled
    assert cache.max_batch_total_size_bytes == 4 * 1024 * 1024
    assert list(cache.supported_compressors) == [pb.Compressor.ZSTD]
    assert list(cache.supported_batch_update_compressors) == [pb.Compressor.ZSTD]
    assert cache.symlink_absolute_path_strategy == pb.SymlinkAbsolutePathStrategy.DISALLOWED
    assert caps.execution_capabilities.exec_enabled
    assert caps.execution_capabilities.digest_function == pb.DigestFunction.SHA256
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert caps.high_api_version.major == 2


# -- CAS -----------------------------------------------------------------------------------


async def test_find_missing_then_batch_update_and_read(rpc: Rpc) -> None:
    blobs = [os.urandom(100), b"", b"x" * 5000]
    digests = [digest_of(b) for b in blobs]
    missing = await rpc.unary(
        CAS + "FindMissingBlobs",
        pb.FindMissingBlobsRequest(blob_digests=digests),
        pb.FindMissingBlobsResponse,
    )
    assert [name_of(d) for d in missing.missing_blob_digests] == [name_of(digests[0]), name_of(digests[2])]
    await put(rpc, *blobs)
    missing = await rpc.unary(
        CAS + "FindMissingBlobs",
        pb.FindMissingBlobsRequest(blob_digests=digests),
        pb.FindMissingBlobsResponse,
    )
    assert not missing.missing_blob_digests
    absent = digest_of(b"never stored")
    got = await rpc.unary(
        CAS + "BatchReadBlobs",
        pb.BatchReadBlobsRequest(digests=[*digests, absent]),
        pb.BatchReadBlobsResponse,
    )
    assert [r.data for r in got.responses[:3]] == blobs
    assert [r.status.code for r in got.responses] == [0, 0, 0, grpc.StatusCode.NOT_FOUND.value[0]]


async def test_batch_update_checks_each_blob(rpc: Rpc) -> None:
    good = b"good blob"
    wrong = pb.BatchUpdateBlobsRequest.Request(digest=digest_of(b"something else"), data=b"not that")
    bad_hash = pb.BatchUpdateBlobsRequest.Request(digest=pb.Digest(hash="XYZ", size_bytes=3), data=b"abc")
    odd = pb.BatchUpdateBlobsRequest.Request(
        digest=digest_of(good), data=good, compressor=pb.Compressor.BROTLI
    )
    response = await rpc.unary(
        CAS + "BatchUpdateBlobs",
        pb.BatchUpdateBlobsRequest(
            requests=[
                pb.BatchUpdateBlobsRequest.Request(digest=digest_of(good), data=good),
                wrong,
                bad_hash,
                odd,
            ]
        ),
        pb.BatchUpdateBlobsResponse,
    )
    invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert [r.status.code for r in response.responses] == [0, invalid, invalid, invalid]
    missing = await rpc.unary(
        CAS + "FindMissingBlobs",
        pb.FindMissingBlobsRequest(
            blob_digests=[digest_of(good), digest_of(b"not that"), digest_of(b"something else")]
        ),
        pb.FindMissingBlobsResponse,
    )
    assert len(missing.missing_blob_digests) == 2  # only the good one was stored


async def test_batches_speak_zstd(rpc: Rpc) -> None:
    data = b"compressible " * 1000
    packed = zstandard.ZstdCompressor().compress(data)
    response = await rpc.unary(
        CAS + "BatchUpdateBlobs",
        pb.BatchUpdateBlobsRequest(
            requests=[
                pb.BatchUpdateBlobsRequest.Request(
                    digest=digest_of(data), data=packed, compressor=pb.Compressor.ZSTD
                )
            ]
        ),
        pb.BatchUpdateBlobsResponse,
    )
    assert response.responses[0].status.code == 0
    got = await rpc.unary(
        CAS + "BatchReadBlobs",
        pb.BatchReadBlobsRequest(digests=[digest_of(data)], acceptable_compressors=[pb.Compressor.ZSTD]),
        pb.BatchReadBlobsResponse,
    )
    (entry,) = got.responses
    assert entry.compressor == pb.Compressor.ZSTD and len(entry.data) < len(data)
    assert zstandard.ZstdDecompressor().decompress(entry.data) == data
    plain = await rpc.unary(
        CAS + "BatchReadBlobs", pb.BatchReadBlobsRequest(digests=[digest_of(data)]), pb.BatchReadBlobsResponse
    )
    assert plain.responses[0].compressor == pb.Compressor.IDENTITY and plain.responses[0].data == data
    # A "compressed" blob that expands past its digest's size is refused, not decompressed whole.
    bomb = zstandard.ZstdCompressor().compress(bytes(10 * 1024 * 1024))
    response = await rpc.unary(
        CAS + "BatchUpdateBlobs",
        pb.BatchUpdateBlobsRequest(
            requests=[
                pb.BatchUpdateBlobsRequest.Request(
                    digest=digest_of(b"tiny"), data=bomb, compressor=pb.Compressor.ZSTD
                )
            ]
        ),
        pb.BatchUpdateBlobsResponse,
    )
    assert response.responses[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_batches_over_the_limit_are_refused(rpc: Rpc) -> None:
    big = [os.urandom(1024 * 1024 + 1) for _ in range(4)]
    request = pb.BatchUpdateBlobsRequest(
        requests=[pb.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b) for b in big]
    )
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.unary(CAS + "BatchUpdateBlobs", request, pb.BatchUpdateBlobsResponse),
    )
    read_request = pb.BatchReadBlobsRequest(digests=[digest_of(b) for b in big])
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.unary(CAS + "BatchReadBlobs", read_request, pb.BatchReadBlobsResponse),
    )


async def test_a_message_over_the_size_limit_is_resource_exhausted(rpc: Rpc) -> None:
    request = pb.FindMissingBlobsRequest(instance_name="x" * (6 * 1024 * 1024))
    await fails(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        rpc.unary(CAS + "FindMissingBlobs", request, pb.FindMissingBlobsResponse),
    )
    # The connection goes on serving.
    await rpc.unary(CAS + "FindMissingBlobs", pb.FindMissingBlobsRequest(), pb.FindMissingBlobsResponse)


async def test_bad_digests_and_bad_requests(rpc: Rpc) -> None:
    bad = pb.FindMissingBlobsRequest(blob_digests=[pb.Digest(hash="abc", size_bytes=1)])
    error = await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.unary(CAS + "FindMissingBlobs", bad, pb.FindMissingBlobsResponse),
    )
    assert "blob_digests[0]" in (error.details() or "")
    negative = pb.FindMissingBlobsRequest(blob_digests=[pb.Digest(hash="a" * 64, size_bytes=-1)])
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.unary(CAS + "FindMissingBlobs", negative, pb.FindMissingBlobsResponse),
    )
    garbage = rpc.channel.unary_unary(
        CAS + "FindMissingBlobs",
        request_serializer=lambda b: b,
        response_deserializer=pb.FindMissingBlobsResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        await trio.to_thread.run_sync(lambda: garbage(b"\xff\xff\xff", timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await fails(
        grpc.StatusCode.UNIMPLEMENTED,
        rpc.unary(
            REAPI + "ContentAddressableStorage/NoSuchMethod",
            pb.FindMissingBlobsRequest(),
            pb.FindMissingBlobsResponse,
        ),
    )


async def test_get_tree_pages_and_resumes(rpc: Rpc) -> None:
    leaf = pb.Directory(files=[pb.FileNode(name="f", digest=digest_of(b"f"))])
    leaf_raw = leaf.SerializeToString()
    mid = pb.Directory(directories=[pb.DirectoryNode(name="leaf", digest=digest_of(leaf_raw))])
    mid_raw = mid.SerializeToString()
    other = pb.Directory(symlinks=[pb.SymlinkNode(name="l", target="x")])
    other_raw = other.SerializeToString()
    root = pb.Directory(
        directories=[
            pb.DirectoryNode(name="a", digest=digest_of(mid_raw)),
            pb.DirectoryNode(name="b", digest=digest_of(other_raw)),
            pb.DirectoryNode(name="gone", digest=digest_of(b"not stored")),
        ]
    )
    root_raw = root.SerializeToString()
    await put(rpc, leaf_raw, mid_raw, other_raw, root_raw)
    pages = await rpc.stream(
        CAS + "GetTree", pb.GetTreeRequest(root_digest=digest_of(root_raw), page_size=2), pb.GetTreeResponse
    )
    got = [d for page in pages for d in page.directories]
    assert got == [root, mid, other, leaf]  # breadth first; the missing one left out
    assert [len(p.directories) for p in pages][:2] == [2, 2]
    assert pages[0].next_page_token
    rest = await rpc.stream(
        CAS + "GetTree",
        pb.GetTreeRequest(root_digest=digest_of(root_raw), page_size=10, page_token=pages[0].next_page_token),
        pb.GetTreeResponse,
    )
    assert [d for page in rest for d in page.directories] == [other, leaf]
    await fails(
        grpc.StatusCode.NOT_FOUND,
        rpc.stream(CAS + "GetTree", pb.GetTreeRequest(root_digest=digest_of(b"no root")), pb.GetTreeResponse),
    )
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.stream(
            CAS + "GetTree",
            pb.GetTreeRequest(root_digest=digest_of(root_raw), page_token="bogus"),
            pb.GetTreeResponse,
        ),
    )


# -- ByteStream ------------------------------------------------------------------------------


async def test_bytestream_round_trip(rpc: Rpc) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    d = digest_of(data)
    assert (await write(rpc, data)).committed_size == len(data)
    assert await read(rpc, d) == data
    assert await read(rpc, d, offset=1000, limit=5000) == data[1000:6000]
    assert await read(rpc, d, offset=len(data)) == b""
    # Writing a blob that is already stored answers at once with its whole size.
    assert (await write(rpc, data, chunk=1024)).committed_size == len(data)


async def test_bytestream_errors(rpc: Rpc) -> None:
    data = b"some bytes" * 100
    d = digest_of(data)
    await fails(grpc.StatusCode.NOT_FOUND, read(rpc, d))
    await write(rpc, data)
    await fails(grpc.StatusCode.OUT_OF_RANGE, read(rpc, d, offset=len(data) + 1))
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.stream(BYTESTREAM + "Read", bs.ReadRequest(resource_name="blobs/nothex/12"), bs.ReadResponse),
    )
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.stream(
            BYTESTREAM + "Read",
            bs.ReadRequest(resource_name=f"compressed-blobs/brotli/{name_of(d)}"),
            bs.ReadResponse,
        ),
    )
    other = b"other bytes"
    wrong = bs.WriteRequest(
        resource_name=f"uploads/{uuid.uuid4()}/blobs/{name_of(digest_of(other))}",
        data=b"not the bytes",
        finish_write=True,
    )
    await fails(grpc.StatusCode.INVALID_ARGUMENT, rpc.upload(BYTESTREAM + "Write", [wrong], bs.WriteResponse))
    gap = [
        bs.WriteRequest(
            resource_name=f"uploads/{uuid.uuid4()}/blobs/{name_of(digest_of(other))}", data=other[:3]
        ),
        bs.WriteRequest(write_offset=5, data=other[5:], finish_write=True),
    ]
    await fails(grpc.StatusCode.INVALID_ARGUMENT, rpc.upload(BYTESTREAM + "Write", gap, bs.WriteResponse))
    unfinished = [
        bs.WriteRequest(resource_name=f"uploads/{uuid.uuid4()}/blobs/{name_of(digest_of(other))}", data=other)
    ]
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT, rpc.upload(BYTESTREAM + "Write", unfinished, bs.WriteResponse)
    )
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.upload(
            BYTESTREAM + "Write",
            [bs.WriteRequest(resource_name="blobs/x/1", data=b"x", finish_write=True)],
            bs.WriteResponse,
        ),
    )
    await fails(grpc.StatusCode.NOT_FOUND, read(rpc, digest_of(other)))  # nothing half-stored


async def test_bytestream_zstd(rpc: Rpc) -> None:
    data = b"zstd on the wire " * 200_000
    d = digest_of(data)
    response = await write(rpc, data, compressed=True, chunk=16 * 1024)
    assert 0 < response.committed_size < len(data)
    assert await read(rpc, d) == data
    assert await read(rpc, d, compressed=True) == data
    assert await read(rpc, d, compressed=True, offset=100) == data[100:]
    # Already there: a compressed write answers -1 at once.
    assert (await write(rpc, data, compressed=True)).committed_size == -1
    await fails(grpc.StatusCode.INVALID_ARGUMENT, read(rpc, d, compressed=True, limit=10))
    junk = bs.WriteRequest(
        resource_name=f"uploads/{uuid.uuid4()}/compressed-blobs/zstd/{name_of(digest_of(b'other'))}",
        data=b"not zstd",
        finish_write=True,
    )
    await fails(grpc.StatusCode.INVALID_ARGUMENT, rpc.upload(BYTESTREAM + "Write", [junk], bs.WriteResponse))


async def test_bytestream_write_resumes_after_a_cut(rpc: Rpc) -> None:
    data = os.urandom(12 * 1024 * 1024)
    d = digest_of(data)
    upload = str(uuid.uuid4())
    resource = f"uploads/{upload}/blobs/{name_of(d)}"
    chunk = 1024 * 1024
    release = threading.Event()

    def first_part() -> Any:
        for i in range(9):
            yield bs.WriteRequest(
                resource_name=resource if i == 0 else "",
                write_offset=i * chunk,
                data=data[i * chunk : (i + 1) * chunk],
            )
        release.wait(30)

    method = rpc.channel.stream_unary(
        BYTESTREAM + "Write",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=bs.WriteResponse.FromString,
    )
    future = method.future(first_part(), timeout=60)
    status = bs.QueryWriteStatusResponse()
    with trio.fail_after(20):
        while status.committed_size < 8 * 1024 * 1024:
            await trio.sleep(0.05)
            status = await rpc.unary(
                BYTESTREAM + "QueryWriteStatus",
                bs.QueryWriteStatusRequest(resource_name=resource),
                bs.QueryWriteStatusResponse,
            )
    future.cancel()
    release.set()
    await trio.sleep(0.3)
    status = await rpc.unary(
        BYTESTREAM + "QueryWriteStatus",
        bs.QueryWriteStatusRequest(resource_name=resource),
        bs.QueryWriteStatusResponse,
    )
    committed = status.committed_size
    assert not status.complete and 0 < committed < len(data)
    # Resuming from elsewhere than the committed offset is refused; from it, it completes.
    await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        write(rpc, data, upload=upload, offset=committed - 1, chunk=chunk),
    )
    assert (await write(rpc, data, upload=upload, offset=committed, chunk=chunk)).committed_size == len(data)
    status = await rpc.unary(
        BYTESTREAM + "QueryWriteStatus",
        bs.QueryWriteStatusRequest(resource_name=resource),
        bs.QueryWriteStatusResponse,
    )
    assert status.complete and status.committed_size == len(data)
    assert await read(rpc, d) == data


async def test_one_store_behind_both_doors(rnode: triode.Node, rpc: Rpc) -> None:
    async with triode.connect(rnode.address) as client:
        via_msgpack = await client.cas.put(b"put through the msgpack door")
        d = pb.Digest(hash=via_msgpack.hash, size_bytes=via_msgpack.size)
        assert await read(rpc, d) == b"put through the msgpack door"
        (via_grpc,) = await put(rpc, b"put through the gRPC door")
        assert (
            await client.cas.get(Digest(via_grpc.hash, via_grpc.size_bytes)) == b"put through the gRPC door"
        )


# -- ActionCache -----------------------------------------------------------------------------


async def test_action_cache(rpc: Rpc) -> None:
    action = digest_of(b"an action")
    await fails(
        grpc.StatusCode.NOT_FOUND,
        rpc.unary(AC + "GetActionResult", pb.GetActionResultRequest(action_digest=action), pb.ActionResult),
    )
    out, stdout = b"output file", b"hello on stdout\n"
    result = pb.ActionResult(
        exit_code=0,
        output_files=[pb.OutputFile(path="out/x", digest=digest_of(out))],
        stdout_digest=digest_of(stdout),
    )
    error = await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        rpc.unary(
            AC + "UpdateActionResult",
            pb.UpdateActionResultRequest(action_digest=action, action_result=result),
            pb.ActionResult,
        ),
    )
    failure = error_details_pb2.PreconditionFailure()
    status = status_of(error)
    assert status.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert status.details[0].Unpack(failure)
    assert {(v.type, v.subject) for v in failure.violations} == {
        ("MISSING", f"blobs/{name_of(digest_of(out))}"),
        ("MISSING", f"blobs/{name_of(digest_of(stdout))}"),
    }
    await put(rpc, out, stdout)
    stored = await rpc.unary(
        AC + "UpdateActionResult",
        pb.UpdateActionResultRequest(action_digest=action, action_result=result),
        pb.ActionResult,
    )
    assert stored == result
    got = await rpc.unary(
        AC + "GetActionResult", pb.GetActionResultRequest(action_digest=action), pb.ActionResult
    )
    assert got == result
    inlined = await rpc.unary(
        AC + "GetActionResult",
        pb.GetActionResultRequest(action_digest=action, inline_stdout=True, inline_output_files=["out/x"]),
        pb.ActionResult,
    )
    assert inlined.stdout_raw == stdout and inlined.output_files[0].contents == out
    bad = pb.ActionResult(output_files=[pb.OutputFile(path="../escape", digest=digest_of(out))])
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.unary(
            AC + "UpdateActionResult",
            pb.UpdateActionResultRequest(action_digest=action, action_result=bad),
            pb.ActionResult,
        ),
    )
    await fails(
        grpc.StatusCode.INVALID_ARGUMENT,
        rpc.unary(
            AC + "GetActionResult",
            pb.GetActionResultRequest(action_digest=pb.Digest(hash="short", size_bytes=1)),
            pb.ActionResult,
        ),
    )


# -- auth and TLS ------------------------------------------------------------------------------


async def test_token_is_required(tmp_path: Any) -> None:
    async with no_leaks(grace=5.0):
        async with triode.open_node(
            listen=None, grpc="127.0.0.1:0", data=tmp_path / "d", token="s3cret"
        ) as node:
            assert node.grpc_address is not None
            rpc = Rpc(node.grpc_address)
            try:
                request = pb.GetCapabilitiesRequest()
                path = REAPI + "Capabilities/GetCapabilities"
                await fails(grpc.StatusCode.UNAUTHENTICATED, rpc.unary(path, request, pb.ServerCapabilities))
                await fails(
                    grpc.StatusCode.UNAUTHENTICATED,
                    rpc.unary(
                        path, request, pb.ServerCapabilities, metadata=[("authorization", "Bearer wrong")]
                    ),
                )
                right = [("authorization", "Bearer s3cret")]
                caps = await rpc.unary(path, request, pb.ServerCapabilities, metadata=right)
                assert caps.cache_capabilities.max_batch_total_size_bytes
                for _ in range(20):  # the right token many times costs nothing
                    await rpc.unary(path, request, pb.ServerCapabilities, metadata=right)
                # Wrong tokens from one address run its bucket dry (10 of them, as for hellos,
                # two spent above): then even the right one is refused for a while, before it
                # is compared.
                wrong = 0
                while True:
                    with pytest.raises(grpc.RpcError) as info:
                        await rpc.unary(path, request, pb.ServerCapabilities)
                    if info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        break
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    wrong += 1
                    assert wrong <= 12
                assert wrong >= 7
                error = await fails(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    rpc.unary(path, request, pb.ServerCapabilities, metadata=right),
                )
                retry = error_details_pb2.RetryInfo()
                assert status_of(error).details[0].Unpack(retry) and retry.retry_delay.ToNanoseconds() > 0
            finally:
                rpc.close()


async def test_tls_with_alpn_h2(tmp_path: Any) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "node.pem"))
    async with no_leaks(grace=5.0):
        async with triode.open_node(
            listen=None,
            grpc="127.0.0.1:0",
            data=tmp_path / "d",
            tls_cert=tmp_path / "node.pem",
            tls_key=tmp_path / "node.pem",
        ) as node:
            assert node.grpc_address is not None
            credentials = grpc.ssl_channel_credentials(root_certificates=ca.cert_pem.bytes())
            rpc = Rpc(node.grpc_address, credentials=credentials, authority="localhost")
            try:
                (d,) = await put(rpc, b"over TLS")
                assert await read(rpc, d) == b"over TLS"
            finally:
                rpc.close()


async def test_ac_writes_executor_refuses_updates(tmp_path: Any) -> None:
    async with no_leaks(grace=5.0):
        async with triode.open_node(
            listen=None, grpc="127.0.0.1:0", data=tmp_path / "d", ac_writes="executor"
        ) as node:
            assert node.grpc_address is not None
            rpc = Rpc(node.grpc_address)
            try:
                caps = await rpc.unary(
                    REAPI + "Capabilities/GetCapabilities", pb.GetCapabilitiesRequest(), pb.ServerCapabilities
                )
                assert not caps.cache_capabilities.action_cache_update_capabilities.update_enabled
                (out,) = await put(rpc, b"an output")
                request = pb.UpdateActionResultRequest(
                    action_digest=digest_of(b"act"),
                    action_result=pb.ActionResult(output_files=[pb.OutputFile(path="o", digest=out)]),
                )
                await fails(
                    grpc.StatusCode.PERMISSION_DENIED,
                    rpc.unary(AC + "UpdateActionResult", request, pb.ActionResult),
                )
            finally:
                rpc.close()


async def test_gathered_writes_survive_partial_sends() -> None:
    # More than a socket buffer holds, in pieces of every size: sendmsg takes part of them at
    # a time and the rest must follow in order.
    a, b = trio.socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    pieces: list[bytes | bytearray | memoryview] = []
    for n in range(200):
        piece = os.urandom((n * 7919) % 150_000 + 1)
        pieces.append(memoryview(piece)[1:] if n % 3 == 0 else bytearray(piece) if n % 3 == 1 else piece)
    expected = b"".join(pieces)
    got = bytearray()

    async def drain() -> None:
        with b:
            while len(got) < len(expected):
                chunk = await b.recv(1 << 20)
                assert chunk
                got.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        async with trio.SocketStream(a) as stream:
            await grpc_door.send_buffers(stream, pieces)
    assert got == expected
    # A closed peer is a broken stream, as for send_all.
    c, d = trio.socket.socketpair()
    d.close()
    with pytest.raises(trio.BrokenResourceError):
        async with trio.SocketStream(c) as stream:
            for _ in range(100):
                await grpc_door.send_buffers(stream, [b"x" * 100_000, b"y" * 100_000])


async def test_a_client_that_stops_reading_is_dropped(
    rnode: triode.Node, rpc: Rpc, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A download to a client that never reads its socket: the node's writer blocks once the
    # socket buffers are full, and the call would wait for room forever.
    monkeypatch.setattr(grpc_door, "WRITE_TIMEOUT", 0.5)
    data = os.urandom(32 * 1024 * 1024)
    async with triode.connect(rnode.address) as client:
        blob = await client.cas.put(data)
    h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    h2c.local_settings = h2.settings.Settings(client=True, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})  # let it send all it has
    h2c.initiate_connection()
    h2c.increment_flow_control_window(2**31 - 1 - 65_535)
    request = bs.ReadRequest(resource_name=f"blobs/{blob.hash}/{blob.size}").SerializeToString()
    h2c.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"triode"),
                         (b":path", b"/google.bytestream.ByteStream/Read"),
                         (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    h2c.send_data(1, b"\0" + len(request).to_bytes(4, "big") + request, end_stream=True)
    door = rnode.parts["grpc"]
    host, port = str(rnode.grpc_address).rsplit(":", 1)
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await stream.send_all(h2c.data_to_send())
        with trio.fail_after(20):
            while door.info()["connections"] == 0:  # noqa: ASYNC110 - polling, bounded
                await trio.sleep(0.01)
            while door.info()["connections"]:  # noqa: ASYNC110 - dropped, never having read a byte
                await trio.sleep(0.05)
        assert door.active == 0
    # ...and everyone else is served as before.
    assert await read(rpc, pb.Digest(hash=blob.hash, size_bytes=blob.size)) == data
