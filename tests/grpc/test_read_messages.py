"""ByteStream ReadResponses sent as the runtime's head and the blob's own bytes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from triode.node.reapi import READ_MESSAGE, _read_response_head, _responses
from triode.proto import bytestream_pb2 as bs


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=3 * 1024 * 1024))
def test_a_head_and_the_bytes_are_what_the_runtime_serializes(size: int) -> None:
    data = bytes([size % 251]) * size
    assert _read_response_head(size) + data == bs.ReadResponse(data=data).SerializeToString()


@settings(max_examples=30, deadline=None)
@given(st.binary(min_size=0, max_size=300), st.integers(min_value=1, max_value=4))
def test_responses_split_a_chunk_into_messages_of_its_bytes(tail: bytes, parts: int) -> None:
    chunk = bytes(range(256)) * (READ_MESSAGE // 256) * (parts - 1) + tail
    limit = len(chunk) - len(tail) // 2
    messages = _responses(chunk, limit)
    parsed = [bs.ReadResponse.FromString(head + bytes(body)) for head, body in messages]
    assert b"".join(m.data for m in parsed) == chunk[:limit]
    assert all(len(m.data) <= READ_MESSAGE for m in parsed)
