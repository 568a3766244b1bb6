"""A node with its gRPC door, and a grpcio client driven from trio (each call in a thread)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
import pytest
import trio

import triode
from triode.proto import status_pb2
from triode.testing import no_leaks

# grpcio makes a few process-wide file descriptors with its first channel: make them before
# any test counts descriptors, so that no_leaks does not take them for a test's leak.
grpc.insecure_channel("127.0.0.1:1").close()

REAPI = "/build.bazel.remote.execution.v2."
BYTESTREAM = "/google.bytestream.ByteStream/"
BIG = 64 * 1024 * 1024


def _serialize(message: Any) -> bytes:
    return message.SerializeToString()


class Rpc:
    """A grpcio channel; every call runs in a worker thread so the trio loop keeps serving."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        authority: str | None = None,
    ) -> None:
        options = [("grpc.max_receive_message_length", BIG), ("grpc.max_send_message_length", BIG)]
        if authority is not None:
            options.append(("grpc.ssl_target_name_override", authority))
        if credentials is None:
            self.channel = grpc.insecure_channel(address, options=options)
        else:
            self.channel = grpc.secure_channel(address, credentials, options=options)
        self.metadata = tuple(metadata)

    def close(self) -> None:
        self.channel.close()

    async def unary(
        self,
        path: str,
        request: Any,
        response_type: Any,
        *,
        deadline: float = 30.0,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Any:
        method = self.channel.unary_unary(
            path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )
        md = self.metadata if metadata is None else tuple(metadata)
        return await trio.to_thread.run_sync(lambda: method(request, timeout=deadline, metadata=md))

    async def stream(
        self,
        path: str,
        request: Any,
        response_type: Any,
        *,
        deadline: float = 30.0,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> list[Any]:
        method = self.channel.unary_stream(
            path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )
        md = self.metadata if metadata is None else tuple(metadata)
        return await trio.to_thread.run_sync(lambda: list(method(request, timeout=deadline, metadata=md)))

    def stream_call(
        self, path: str, request: Any, response_type: Any, *, timeout: float | None = None
    ) -> Any:
        """The grpcio call object itself (an iterator with ``cancel()``): iterate it in a thread."""
        method = self.channel.unary_stream(
            path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )
        return method(request, timeout=timeout, metadata=self.metadata)

    async def upload(
        self,
        path: str,
        requests: Iterable[Any],
        response_type: Any,
        *,
        deadline: float = 60.0,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Any:
        method = self.channel.stream_unary(
            path, request_serializer=_serialize, response_deserializer=response_type.FromString
        )
        md = self.metadata if metadata is None else tuple(metadata)
        return await trio.to_thread.run_sync(lambda: method(iter(requests), timeout=deadline, metadata=md))


def status_of(error: grpc.RpcError) -> status_pb2.Status:
    """The google.rpc.Status a server put in grpc-status-details-bin (an empty one if none)."""
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            raw = value if isinstance(value, bytes) else base64.b64decode(value + "=" * (-len(value) % 4))
            return status_pb2.Status.FromString(raw)
    return status_pb2.Status()


@pytest.fixture
async def rnode(tmp_path: Any) -> AsyncIterator[triode.Node]:
    """A node serving REAPI on loopback over a fresh data dir; checked for leaks once closed."""
    async with no_leaks(grace=5.0):
        async with triode.open_node(
            listen="127.0.0.1:0", grpc="127.0.0.1:0", data=tmp_path / "data", max_concurrency=2
        ) as node:
            yield node


@pytest.fixture
async def rpc(rnode: triode.Node) -> AsyncIterator[Rpc]:
    assert rnode.grpc_address is not None
    client = Rpc(rnode.grpc_address)
    try:
        yield client
    finally:
        client.close()
