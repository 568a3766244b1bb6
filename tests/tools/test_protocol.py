"""The worker channel's frames and messages, without processes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triode.errors import OutputTooLarge, ProtocolError
from triode.tools.protocol import (
    FrameDecoder,
    LoadFailure,
    Ready,
    encode_call,
    encode_frame,
    parse_hello,
    parse_result,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def frame(value: object) -> bytes:
    return encode_frame(json.dumps(value).encode())


@given(st.lists(json_values, max_size=5), st.integers(1, 17))
def test_frames_survive_any_chunking(values: list[object], step: int) -> None:
    data = b"".join(frame({"type": "result", "v": v}) for v in values)
    decoder = FrameDecoder(max_output=1 << 20)
    out = []
    for i in range(0, len(data), step):
        out += decoder.feed(data[i : i + step])
    assert [m["v"] for m in out] == values
    assert decoder.buffered == 0


def test_call_frame_embeds_input_json() -> None:
    data = encode_call(7, "add", b'{"a":1}')
    (message,) = FrameDecoder(1000).feed(data)
    assert message == {"type": "call", "id": 7, "tool": "add", "input": {"a": 1}}


def test_integers_past_64_bits_become_doubles_as_in_javascript() -> None:
    (message,) = FrameDecoder(1000).feed(encode_frame(b'{"type":"result","v":[18446744073709552000,7]}'))
    assert message["v"] == [1.8446744073709552e19, 7]
    assert isinstance(message["v"][1], int)


def test_oversized_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder(max_output=1000)
    with pytest.raises(OutputTooLarge) as info:
        decoder.feed((10**6).to_bytes(4, "big"))  # no body needed: the header is enough
    assert info.value.details["limit"] == 1000


def test_text_on_the_channel_is_a_protocol_error_not_a_size() -> None:
    with pytest.raises(ProtocolError, match="text, not frames"):
        FrameDecoder(max_output=1000).feed(b"hello, I am garbage")


@pytest.mark.parametrize("body", [b"not json", b"[1,2]", b'{"no":"type"}', b"\xff\xfe"])
def test_bad_bodies_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder(1000).feed(encode_frame(body))


def test_hello_messages() -> None:
    ready = parse_hello({"type": "ready", "tools": ["a", "b"], "runtime": "node v20", "pid": 5})
    assert ready == Ready(("a", "b"), "node v20", 5)
    failure = parse_hello(
        {"type": "load_error", "kind": "load", "error": {"name": "SyntaxError", "message": "x"}}
    )
    assert isinstance(failure, LoadFailure) and failure.error["name"] == "SyntaxError"
    with pytest.raises(ProtocolError):
        parse_hello({"type": "result"})
    with pytest.raises(ProtocolError):
        parse_hello({"type": "ready", "tools": "a"})


def test_results_must_answer_the_call_in_progress() -> None:
    assert parse_result({"type": "result", "id": 3, "ok": True, "output": [1]}, 3).output == [1]
    with pytest.raises(ProtocolError, match="answered call 2"):
        parse_result({"type": "result", "id": 2, "ok": True, "output": 1}, 3)
    with pytest.raises(ProtocolError):
        parse_result({"type": "result", "id": 3, "ok": True}, 3)
    with pytest.raises(ProtocolError):
        parse_result({"type": "ready", "id": 3}, 3)
    failed = parse_result(
        {
            "type": "result",
            "id": 3,
            "ok": False,
            "error": {"name": "E", "message": "m", "stack": "s"},
            "recycle": True,
        },
        3,
    )
    assert not failed.ok and failed.recycle and failed.error == {"name": "E", "message": "m", "stack": "s"}
