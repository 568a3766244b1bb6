"""The sans-I/O frame codec: round trips under any chunking, and every kind of bad input."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triode import errors
from triode.errors import EncodeError, FrameTooLarge, ProtocolError, TriodeError
from triode.wire import codec
from triode.wire.codec import (
    CALL,
    CANCEL,
    CREDIT,
    DATA,
    END,
    ERROR,
    GOODBYE,
    HELLO,
    MAX_ID,
    PING,
    PONG,
    REPLY,
    Decoder,
    encode,
    encode_data,
)

# -- strategies ------------------------------------------------------------------------

ids = st.integers(min_value=0, max_value=MAX_ID)
scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | \
    st.text(max_size=20) | st.binary(max_size=64)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
meta = st.fixed_dictionaries(
    {}, optional={"timeout": st.floats(0, 1e6), "up": st.booleans(), "down": st.booleans()}
)
messages = st.one_of(
    st.builds(lambda d: [HELLO, d], st.dictionaries(st.text(max_size=10), values, max_size=5)),
    st.builds(lambda i, m, a, mt: [CALL, i, m, a, mt], ids, st.text(max_size=20), values, meta),
    st.builds(lambda i, v: [REPLY, i, v], ids, values),
    st.builds(lambda i, c, m, d: [ERROR, i, c, m, d], ids, st.text(max_size=20), st.text(max_size=40),
              st.dictionaries(st.text(max_size=8), values, max_size=3)),
    st.builds(lambda i: [CANCEL, i], ids),
    st.builds(lambda i, b: [DATA, i, b], ids, st.binary(max_size=70_000)),
    st.builds(lambda i: [END, i], ids),
    st.builds(lambda i, n: [CREDIT, i, n], ids, st.integers(1, 2**40)),
    st.builds(lambda n: [PING, n], st.integers(0, 2**31)),
    st.builds(lambda n: [PONG, n], st.integers(0, 2**31)),
    st.builds(lambda r: [GOODBYE, r], st.text(max_size=30)),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


def decode_all(chunks: list[bytes], max_frame: int = codec.DEFAULT_MAX_FRAME) -> list[list]:
    decoder = Decoder(max_frame)
    out = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (message := decoder.next_message()) is not None:
            out.append(message)
    assert decoder.buffered == 0
    return out


# -- round trips -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, max_size=8), st.lists(st.integers(0, 2**20), max_size=12))
def test_any_messages_survive_any_chunking(msgs: list[list], cuts: list[int]) -> None:
    wire = b"".join(encode(m) for m in msgs)
    assert decode_all(split(wire, cuts)) == msgs


@settings(max_examples=100, deadline=None)
@given(messages)
def test_byte_at_a_time(msg: list) -> None:
    wire = encode(msg)
    if len(wire) > 5000:
        wire = wire[:5000]  # keep it quick: only the prefix is fed, nothing may come out early
        decoder = Decoder()
        for i in range(len(wire)):
            decoder.receive_data(wire[i : i + 1])
            assert decoder.next_message() is None
        return
    assert decode_all([wire[i : i + 1] for i in range(len(wire))]) == [msg]


@settings(max_examples=100, deadline=None)
@given(ids, st.binary(max_size=300_000))
def test_encode_data_matches_msgpack(call_id: int, chunk: bytes) -> None:
    """The hand-built DATA frame is byte for byte what msgpack would make."""
    assert encode_data(call_id, chunk) == encode([DATA, call_id, chunk])
    assert encode_data(call_id, memoryview(chunk)) == encode([DATA, call_id, chunk])


def test_message_split_exactly_at_the_header() -> None:
    wire = encode([PING, 1]) + encode([PONG, 2])
    assert decode_all([wire[:4], wire[4:9], wire[9:]]) == [[PING, 1], [PONG, 2]]


# -- malformed input -------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=5))
def test_random_bytes_give_protocol_errors_or_nothing(data: bytes, cuts: list[int]) -> None:
    """Garbage never crashes the decoder with anything but a ProtocolError."""
    decoder = Decoder(max_frame=64 * 1024)
    try:
        for chunk in split(data, cuts):
            decoder.receive_data(chunk)
            while decoder.next_message() is not None:
                pass
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_truncated_frame_yields_nothing(msg: list, data: st.DataObject) -> None:
    wire = encode(msg)
    cut = data.draw(st.integers(0, len(wire) - 1))
    decoder = Decoder()
    decoder.receive_data(wire[:cut])
    assert decoder.next_message() is None


def test_over_limit_length_is_refused_from_the_header_alone() -> None:
    decoder = Decoder(max_frame=1000)
    with pytest.raises(FrameTooLarge) as info:
        decoder.receive_data(struct.pack(">I", 1001))
    assert info.value.details == {"size": 1001, "limit": 1000}
    assert "over the limit" in str(info.value)
    # Nothing beyond the 4 header bytes was ever held.
    assert decoder.buffered == 0


def test_over_limit_frame_after_a_good_one() -> None:
    decoder = Decoder(max_frame=1000)
    decoder.receive_data(encode([PING, 1]) + struct.pack(">I", 2**31))
    assert decoder.next_message() == [PING, 1]
    with pytest.raises(FrameTooLarge):
        decoder.next_message()


def test_raising_the_limit_applies_to_the_next_frame() -> None:
    """The hello is read under a small limit; the frame right behind it under the real one."""
    big = encode([REPLY, 1, b"x" * 2000])
    decoder = Decoder(max_frame=100)
    decoder.receive_data(encode([PING, 1]) + big[:10])
    assert decoder.next_message() == [PING, 1]
    decoder.max_frame = 10_000
    decoder.receive_data(big[10:])
    assert decoder.next_message() == [REPLY, 1, b"x" * 2000]


def frame_of(value: object) -> bytes:
    body = msgpack.packb(value, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "value, complaint",
    [
        ({"not": "a list"}, "non-empty array"),
        ([], "non-empty array"),
        (42, "non-empty array"),
        ([99, 1], "unknown message kind 99"),
        (["CALL", 1], "unknown message kind"),
        ([True, 1], "unknown message kind"),
        ([CALL, 1, "m", None], "CALL has 5 elements"),
        ([CALL, "1", "m", None, {}], "element 1 must be int"),
        ([CALL, 1, b"m", None, {}], "element 2 must be str"),
        ([CALL, 1, "m", None, []], "element 4 must be dict"),
        ([CALL, -1, "m", None, {}], "out of range"),
        ([CALL, 2**63, "m", None, {}], "out of range"),
        ([DATA, 1, "text, not bytes"], "element 2 must be bytes"),
        ([CREDIT, 1, 0], "positive"),
        ([CREDIT, 1, -5], "positive"),
        ([ERROR, 1, 7, "m", {}], "element 2 must be str"),
        ([HELLO, [1]], "element 1 must be dict"),
        ([PING, 1.5], "element 1 must be int"),
        ([GOODBYE, None], "element 1 must be str"),
        ([END, True], "element 1 must be int"),
    ],
)
def test_wrong_shapes_are_protocol_errors(value: object, complaint: str) -> None:
    decoder = Decoder()
    decoder.receive_data(frame_of(value))
    with pytest.raises(ProtocolError, match=complaint):
        decoder.next_message()


def test_invalid_msgpack_is_a_protocol_error() -> None:
    decoder = Decoder()
    decoder.receive_data(struct.pack(">I", 1) + b"\xc1")  # 0xc1 is never used by msgpack
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decoder.next_message()


def test_trailing_bytes_inside_a_frame_are_a_protocol_error() -> None:
    body = msgpack.packb([PING, 1]) + b"\x00"
    decoder = Decoder()
    decoder.receive_data(struct.pack(">I", len(body)) + body)
    with pytest.raises(ProtocolError):
        decoder.next_message()


@pytest.mark.parametrize(
    "value",
    [
        object(),
        {1, 2},  # a set: the usual mistake
        frozenset({"a"}),
        2**64,  # over 64 bits
        -(2**63) - 1,
        "lone surrogate \ud800",
        memoryview(b"abcdef")[::2],  # strided: no contiguous buffer to pack
        {"deep": [{"inside": [object()]}]},
    ],
)
def test_unencodable_values_are_an_encode_error_on_our_side(value: object) -> None:
    """Our own bad value is EncodeError: a local bug, not the peer breaking the protocol."""
    with pytest.raises(EncodeError, match="cannot encode") as info:
        encode([REPLY, 1, value])
    assert not isinstance(info.value, ProtocolError)
    assert isinstance(info.value, TriodeError)


def test_encode_error_has_no_wire_code_of_its_own() -> None:
    """A peer cannot make us raise it: no code maps to it."""
    assert "code" not in EncodeError.__dict__
    assert type(errors.from_wire(EncodeError.code, "x")) is not EncodeError


def test_a_failed_encode_leaves_the_packer_clean() -> None:
    """The packer is shared: a value that fails half-way must not leak bytes into the next frame."""
    with pytest.raises(EncodeError):
        encode([REPLY, 1, ["x" * 100, b"y" * 100, {"k": object()}]])
    assert encode([PING, 7]) == b"\x00\x00\x00\x03\x92\x08\x07"  # as in docs/protocol.md
    decoder = Decoder()
    decoder.receive_data(encode([REPLY, 2, ["ok"]]))
    assert decoder.next_message() == [REPLY, 2, ["ok"]]


@settings(max_examples=100, deadline=None)
@given(values, st.sampled_from([object(), {1}, 2**64]))
def test_a_bad_value_anywhere_is_an_encode_error(good: object, bad: object) -> None:
    with pytest.raises(EncodeError):
        encode([REPLY, 1, [good, {"k": bad}]])
    assert decode_all([encode([REPLY, 1, good])]) == [[REPLY, 1, good]]


@pytest.mark.parametrize("body", [b"", b"\x90"])
def test_empty_and_tiny_frames_are_protocol_errors_at_any_split(body: bytes) -> None:
    """A zero-length frame once crashed the decoder with IndexError (and the node with it)."""
    frame = len(body).to_bytes(4, "big") + body
    for split in range(len(frame) + 1):
        decoder = Decoder()
        with pytest.raises(ProtocolError):
            decoder.receive_data(frame[:split])
            decoder.next_message()
            decoder.receive_data(frame[split:])
            decoder.next_message()
