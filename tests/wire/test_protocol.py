"""The sans-I/O call state machine, driven by plain calls: no trio, no streams, no tasks.

Frames go between two :class:`Protocol` objects as bytes through the codec, exactly as
they would cross a socket; ``deliver`` plays the I/O layer's reader (decode, then the
``on_*`` method for the kind).
"""

from __future__ import annotations

import hmac
import math
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triode import errors
from triode.errors import ConnectionClosed, EncodeError, FrameTooLarge, ProtocolError, TriodeError
from triode.wire import codec
from triode.wire.codec import CALL, CANCEL, CREDIT, DATA, END, ERROR, GOODBYE, HELLO, PING, PONG, REPLY
from triode.wire.protocol import (
    AWAITING_HELLO,
    CLOSED,
    HELLO_MAX_FRAME,
    OPEN,
    PROTOCOL_VERSION,
    MadeCall,
    Protocol,
    ServedCall,
)

WINDOW = 64 * 1024

# -- helpers ---------------------------------------------------------------------------


def handlers(*names: str) -> Any:
    return {name: f"handler:{name}" for name in names}.get


def make(initiator: bool, **kw: Any) -> Protocol[MadeCall, ServedCall]:
    kw.setdefault("node_id", "client" if initiator else "server")
    kw.setdefault("window", WINDOW)
    return Protocol(initiator=initiator, **kw)


def decode(frame: bytes | None) -> list[Any]:
    assert frame is not None
    decoder = codec.Decoder(2**31)
    decoder.receive_data(frame)
    message = decoder.next_message()
    assert message is not None and decoder.buffered == 0
    return message


def feed(p: Protocol[Any, Any], m: list[Any]) -> Any:
    """What the I/O layer's reader does with one message after the hello."""
    kind = m[0]
    if kind == CALL:
        return p.on_call(m[1], m[2], m[3], m[4])
    if kind == REPLY:
        return p.on_reply(m[1])
    if kind == ERROR:
        return p.on_error(m[1], m[2], m[3])
    if kind == CANCEL:
        return p.on_cancel(m[1])
    if kind == DATA:
        return p.on_data(m[1], m[2])
    if kind == END:
        return p.on_end(m[1])
    if kind == CREDIT:
        return p.on_credit(m[1], m[2])
    if kind == PING:
        return p.on_ping(m[1])
    if kind == PONG:
        return None
    if kind == GOODBYE:
        return p.on_goodbye(m[1])
    return p.on_hello()


def deliver(frame: bytes | None, to: Protocol[Any, Any]) -> Any:
    """Send one frame to ``to`` as bytes; what its ``on_*`` method returned."""
    assert frame is not None
    to.receive_bytes(frame)
    message = to.next_message()
    assert message is not None and to.next_message() is None
    return feed(to, message)


def shake(a: Protocol[Any, Any], b: Protocol[Any, Any]) -> None:
    """The hello, initiator first, through bytes."""
    b.receive_bytes(a.hello_frame())
    b.receive_hello(b.next_message() or [])
    a.receive_bytes(b.hello_frame())
    a.receive_hello(a.next_message() or [])


def pair(client: dict[str, Any] | None = None, server: dict[str, Any] | None = None) -> tuple[
    Protocol[MadeCall, ServedCall], Protocol[MadeCall, ServedCall]
]:
    server = {"lookup": handlers("echo", "put", "get"), **(server or {})}
    a, b = make(True, **(client or {})), make(False, **server)
    shake(a, b)
    return a, b


def hello(**overrides: Any) -> list[Any]:
    body = {"version": PROTOCOL_VERSION, "node": "peer", "features": ["zstd"], "window": 65536,
            "max_frame": 1 << 20, "max_calls": 10}
    body.update(overrides)
    return [HELLO, body]


def served(b: Protocol[Any, Any], frame: bytes) -> ServedCall:
    got = deliver(frame, b)
    assert isinstance(got, ServedCall), got
    return got


# -- the hello -------------------------------------------------------------------------


def test_hello_accepted_opens_both_sides() -> None:
    a, b = make(True, features=frozenset({"zstd", "x"})), make(False, max_calls=7, max_frame=1 << 20)
    assert a.state is b.state is AWAITING_HELLO
    assert a.decoder.max_frame == HELLO_MAX_FRAME
    shake(a, b)
    assert a.state is b.state is OPEN and not a.closed
    assert a.peer.node == "server" and a.peer.max_calls == 7 and a.peer.window == WINDOW
    assert b.peer.node == "client" and b.peer.features == {"zstd", "x"} and b.peer.version == PROTOCOL_VERSION
    # Only now does each side take frames up to its own limit.
    assert b.decoder.max_frame == 1 << 20 and a.decoder.max_frame == codec.DEFAULT_MAX_FRAME


def test_our_hello_says_what_we_promise() -> None:
    p = make(True, node_id="n1", token="t", features=frozenset({"b", "a"}), window=2048, max_calls=3)
    assert decode(p.hello_frame()) == [HELLO, {
        "version": PROTOCOL_VERSION, "node": "n1", "features": ["a", "b"], "window": 2048,
        "max_frame": codec.DEFAULT_MAX_FRAME, "max_calls": 3, "token": "t",
    }]
    assert "token" not in make(True).hello()


@pytest.mark.parametrize("first, complaint", [
    ([CALL, 1, "echo", None, {}], "expected HELLO, got CALL"),
    ([PING, 1], "expected HELLO, got PING"),
    ([DATA, 1, b"x"], "expected HELLO, got DATA"),
    ([HELLO, {"version": PROTOCOL_VERSION}], "hello field"),
    (hello(window=1), "'window'"),
    (hello(window=True), "'window'"),
    (hello(node=""), "'node'"),
    (hello(node="n" * 257), "'node'"),
    (hello(max_frame=1000), "'max_frame'"),
    (hello(max_calls=0), "'max_calls'"),
    (hello(features="zstd"), "'features'"),
    (hello(features=[1]), "'features'"),
    (hello(token=5), "'token'"),
])
def test_bad_first_frames_are_refused(first: list[Any], complaint: str) -> None:
    p = make(False)
    with pytest.raises(ProtocolError, match=complaint):
        p.receive_hello(first)
    assert p.state is AWAITING_HELLO  # nothing was opened
    with pytest.raises(ProtocolError, match="expected HELLO"):
        p.on_call(1, "echo", None, {})


def test_other_version_is_refused_with_both_versions() -> None:
    with pytest.raises(errors.IncompatibleVersion, match="upgrade") as info:
        make(False).receive_hello(hello(version=PROTOCOL_VERSION + 1))
    assert info.value.details == {"peer_version": PROTOCOL_VERSION + 1, "version": PROTOCOL_VERSION}
    assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize("offered, complaint", [(None, "none was given"), ("", "none was given"),
                                                ("wrong", "the one given is wrong"),
                                                ("s3cret" * 100, "the one given is wrong")])
def test_token_is_demanded(offered: str | None, complaint: str) -> None:
    p = make(False, required_token="s3cret")
    message = hello() if offered is None else hello(token=offered)
    with pytest.raises(errors.AuthenticationFailed, match=complaint):
        p.receive_hello(message)
    assert p.state is AWAITING_HELLO


def test_token_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(x: bytes, y: bytes) -> bool:
        compared.append((x, y))
        return real(x, y)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    p = make(False, required_token="s3cret")
    assert p.receive_hello(hello(token="s3cret")).token == "s3cret"
    # Digests of equal length whatever was offered: the length does not leak either.
    assert len(compared) == 1 and len(compared[0][0]) == len(compared[0][1]) == 32
    assert make(False).receive_hello(hello(token="anything")).token == "anything"  # none demanded


def test_the_peers_refusal_is_raised_as_itself() -> None:
    refusal = Protocol.refusal_frame(errors.AuthenticationFailed("node s requires a token"))
    assert decode(refusal) == [ERROR, 0, "UNAUTHENTICATED", "node s requires a token", {}]
    with pytest.raises(errors.AuthenticationFailed, match="requires a token"):
        make(True).receive_hello(decode(refusal))


def test_hello_once_only() -> None:
    a, b = pair()
    with pytest.raises(RuntimeError):  # our own misuse, not the peer's
        b.receive_hello(hello())
    with pytest.raises(ProtocolError, match="unexpected HELLO"):
        deliver(codec.encode(hello()), b)


def test_frames_before_the_hello_are_held_to_64_kib() -> None:
    p = make(False)
    with pytest.raises(FrameTooLarge):
        p.receive_bytes(struct.pack(">I", HELLO_MAX_FRAME + 1))
    q = make(False)
    q.receive_bytes(codec.encode(hello()) + struct.pack(">I", HELLO_MAX_FRAME + 1))
    q.receive_hello(q.next_message() or [])
    assert q.next_message() is None  # the same header is fine once the hello is accepted


# -- call ids --------------------------------------------------------------------------


def test_initiator_ids_are_odd_and_acceptor_ids_even() -> None:
    a, b = pair(server={"lookup": None})
    made_a = [a.start_call("echo", i, None, False, False)[0].id for i in range(4)]
    made_b = [b.start_call("echo", i, None, False, False)[0].id for i in range(4)]
    assert made_a == [1, 3, 5, 7] and made_b == [2, 4, 6, 8]
    assert set(a.made) == set(made_a) and set(b.made) == set(made_b)


@pytest.mark.parametrize("initiator", [True, False])
def test_a_call_with_our_parity_or_id_0_is_a_protocol_error(initiator: bool) -> None:
    a, b = pair()
    receiver = a if initiator else b
    own = 1 if initiator else 2
    with pytest.raises(ProtocolError, match="wrong parity"):
        receiver.on_call(own, "echo", None, {})
    with pytest.raises(ProtocolError, match="wrong parity"):
        receiver.on_call(0, "echo", None, {})


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=30))
def test_peer_ids_must_increase_and_have_its_parity(ids: list[int]) -> None:
    """Any sequence of CALL ids: accepted exactly while each is odd and above the last."""
    _, b = pair()
    last = 0
    for call_id in ids:
        ok = call_id % 2 == 1 and call_id > last
        if ok:
            assert isinstance(b.on_call(call_id, "echo", None, {}), ServedCall)
            last = call_id
        else:
            with pytest.raises(ProtocolError):
                b.on_call(call_id, "echo", None, {})
            return  # a protocol error ends the connection
    assert sorted(b.served) == sorted(set(i for i in ids))


def test_a_refused_call_still_uses_up_its_id() -> None:
    _, b = pair()
    refusal = b.on_call(1, "nope", None, {})
    assert isinstance(refusal, bytes)
    assert decode(refusal)[:3] == [ERROR, 1, "UNIMPLEMENTED"] and "no method 'nope'" in decode(refusal)[3]
    assert not b.served
    with pytest.raises(ProtocolError, match="must increase"):
        b.on_call(1, "echo", None, {})


def test_an_upload_to_a_method_that_reads_none_is_refused() -> None:
    # Its bytes would otherwise wait unread, a window of them, until the call ended.
    a, b = pair(server={"takes_upload": lambda method: method == "put"})
    _, frame = a.start_call("echo", None, None, True, False)
    refusal = b.on_call(*decode(frame)[1:])
    assert isinstance(refusal, bytes)
    assert decode(refusal)[:3] == [ERROR, 1, "INVALID_ARGUMENT"]
    assert "echo takes no upload" in decode(refusal)[3]
    assert b.on_data(1, b"x" * 100) is None  # its DATA is dropped as it comes
    _, frame = a.start_call("put", None, None, True, False)
    assert isinstance(served(b, frame), ServedCall)
    _, frame = a.start_call("echo", None, None, False, False)  # the same method, no upload: fine
    assert isinstance(served(b, frame), ServedCall)


# -- calls we serve ----------------------------------------------------------------------


def test_call_meta_sets_streams_and_deadline() -> None:
    a, b = pair()
    call, frame = a.start_call("put", {"k": 1}, 2.5, True, False)
    assert decode(frame) == [CALL, 1, "put", {"k": 1}, {"timeout": 2.5, "up": True}]
    s = served(b, frame)
    assert (s.id, s.method, s.handler, s.timeout) == (1, "put", "handler:put", 2.5)
    assert s.recv_window is not None and s.send_window is None and not s.cancelled
    assert call.send_window is not None and call.recv_window is None and not call.answered

    _, frame = a.start_call("get", None, None, False, True)
    assert decode(frame) == [CALL, 3, "get", None, {"down": True}]
    s = served(b, frame)
    assert s.timeout is None and s.recv_window is None and s.send_window is not None


@pytest.mark.parametrize("timeout, expected", [(0, 0), (-5, 0.0), (1e9, 1e9), (math.inf, math.inf)])
def test_a_negative_timeout_is_taken_as_zero(timeout: float, expected: float) -> None:
    _, b = pair()
    assert served(b, codec.encode([CALL, 1, "echo", None, {"timeout": timeout}])).timeout == expected


@pytest.mark.parametrize("timeout", ["soon", math.nan, None, [1]])
def test_a_timeout_that_is_not_a_number_is_a_protocol_error(timeout: Any) -> None:
    _, b = pair()
    meta = {} if timeout is None else {"timeout": timeout}
    if timeout is None:
        assert served(b, codec.encode([CALL, 1, "echo", None, meta])).timeout is None
        return
    with pytest.raises(ProtocolError, match="timeout"):
        b.on_call(1, "echo", None, meta)


@pytest.mark.parametrize("meta, key", [
    ({"timeout": True}, "timeout"),  # a bool is not a number of seconds
    ({"down": 1}, "down"), ({"down": "x"}, "down"), ({"down": None}, "down"),
    ({"up": 1}, "up"), ({"up": "yes"}, "up"), ({"up": True, "down": 0}, "down"),
])
def test_meta_of_the_wrong_type_is_a_protocol_error(meta: dict[str, Any], key: str) -> None:
    _, b = pair()
    with pytest.raises(ProtocolError, match=f"'{key}'"):
        b.on_call(1, "echo", None, meta)
    assert not b.served


def test_meta_streams_are_exact_bools() -> None:
    _, b = pair()
    s = served(b, codec.encode([CALL, 1, "echo", None, {"up": False, "down": True, "timeout": 3}]))
    assert s.recv_window is None and s.send_window is not None and s.timeout == 3


def test_hello_features_may_be_left_out() -> None:
    body = hello()[1]
    del body["features"]
    p = make(False)
    assert p.receive_hello([HELLO, body]).features == frozenset()


def test_credit_granted_counts_every_grant() -> None:
    a, b = pair()
    call, frame = a.start_call("get", None, None, False, True)
    s = served(b, frame)
    assert s.send_window is not None and s.send_window.granted == WINDOW
    assert b.take_credit(s, WINDOW) == WINDOW
    b.on_credit(s.id, 100)
    b.on_credit(s.id, 28)
    assert (s.send_window.credit, s.send_window.granted) == (128, WINDOW + 128)


def test_calls_over_max_calls_are_refused_until_one_ends() -> None:
    _, b = pair(server={"max_calls": 2})
    first = served(b, codec.encode([CALL, 1, "echo", None, {}]))
    served(b, codec.encode([CALL, 3, "echo", None, {}]))
    refusal = decode(deliver(codec.encode([CALL, 5, "echo", None, {}]), b))
    assert refusal[:3] == [ERROR, 5, "RESOURCE_EXHAUSTED"] and refusal[4]["retry_after"] > 0
    b.served_done(first)
    served(b, codec.encode([CALL, 7, "echo", None, {}]))
    assert sorted(b.served) == [3, 7]


def test_reply_and_errors_end_a_served_call() -> None:
    a, b = pair()
    call, frame = a.start_call("echo", "hi", None, False, False)
    s = served(b, frame)
    reply = b.reply(s, ["hi"])
    assert decode(reply) == [REPLY, 1, ["hi"]]
    b.served_done(s)
    assert not b.served
    assert deliver(reply, a) is call and call.answered
    assert a.forget(call) is None  # answered: nothing to cancel
    assert not a.made

    err = b.reply_error(served(b, a.start_call("echo", 1, None, False, False)[1]),
                        errors.BlobNotFound("no blob", digest="ab"))
    assert decode(err) == [ERROR, 3, "BLOB_NOT_FOUND", "no blob", {"digest": "ab"}]


@pytest.mark.parametrize("result", [object(), {1, 2}, 2**64, memoryview(b"abcd")[::2]])
def test_a_result_that_cannot_be_encoded_becomes_an_error_for_that_call(result: Any) -> None:
    a, b = pair()
    s = served(b, a.start_call("echo", None, None, False, False)[1])
    m = decode(b.reply(s, result))
    assert m[:3] == [ERROR, 1, "INTERNAL"] and "cannot be sent" in m[3]
    # The connection is fine: the next call is served as usual.
    s = served(b, a.start_call("echo", None, None, False, False)[1])
    assert decode(b.reply(s, 5)) == [REPLY, 3, 5]


def test_results_and_errors_over_the_peers_frame_limit() -> None:
    a, b = pair(client={"max_frame": 64 * 1024})
    s = served(b, a.start_call("echo", None, None, False, False)[1])
    m = decode(b.reply(s, b"x" * 70_000))
    assert m[:3] == [ERROR, 1, "TOO_LARGE"] and m[4]["limit"] == 64 * 1024
    s = served(b, a.start_call("echo", None, None, False, False)[1])
    m = decode(b.reply_error(s, errors.InvalidArgument("y" * 100_000, thing=object())))
    assert m[:3] == [ERROR, 3, "INVALID_ARGUMENT"] and m[3] == "y" * 1000 and m[4] == {}


def test_unencodable_error_details_are_dropped_not_fatal() -> None:
    a, b = pair()
    s = served(b, a.start_call("echo", None, None, False, False)[1])
    m = decode(b.reply_error(s, errors.InvalidArgument("bad thing", thing={1, 2})))
    assert m == [ERROR, 1, "INVALID_ARGUMENT", "bad thing", {}]


# -- calls we make ---------------------------------------------------------------------


@pytest.mark.parametrize("args", [object(), {1, 2}, -(2**63) - 1, "\ud800"])
def test_arguments_that_cannot_be_encoded_fail_that_call_only(args: Any) -> None:
    a, _ = pair()
    with pytest.raises(errors.InvalidArgument, match="cannot be sent") as info:
        a.start_call("echo", args, None, False, False)
    assert not isinstance(info.value, (ProtocolError, EncodeError))
    assert not a.made and a.state is OPEN


def test_arguments_over_the_peers_frame_limit_are_refused_here() -> None:
    a, _ = pair(server={"max_frame": 64 * 1024})
    with pytest.raises(errors.TooLarge, match="frame limit") as info:
        a.start_call("echo", b"x" * 70_000, None, False, False)
    assert info.value.details["limit"] == 64 * 1024 and not a.made


def test_no_call_before_the_hello() -> None:
    with pytest.raises(RuntimeError, match="before the hello"):
        make(True).start_call("echo", None, None, False, False)


def test_error_answers_and_connection_errors() -> None:
    a, _ = pair()
    call, _ = a.start_call("echo", None, None, False, False)
    assert a.on_error(call.id, "NOT_FOUND", "gone") is call and call.answered
    assert a.on_error(call.id, "NOT_FOUND", "again") is None  # one answer per call
    assert a.on_reply(call.id) is None
    with pytest.raises(ConnectionClosed, match="node server closed the connection: PROTOCOL_ERROR") as info:
        a.on_error(0, "PROTOCOL_ERROR", "bad frame")
    assert info.value.details == {"node": "server", "code": "PROTOCOL_ERROR"}


# -- cancel ----------------------------------------------------------------------------


def test_leaving_an_unanswered_call_cancels_it_and_the_cancel_is_not_answered() -> None:
    a, b = pair()
    call, frame = a.start_call("put", None, None, True, True)
    s = served(b, frame)
    cancel = a.forget(call)
    assert decode(cancel) == [CANCEL, 1]
    assert call.answered and not a.made
    assert call.send_window is not None and not call.send_window.open
    assert deliver(cancel, b) is s and s.cancelled
    assert b.reply(s, "late") is None and b.reply_error(s, errors.Internal("x")) is None
    # Frames that crossed the cancel are dropped on both sides, not errors.
    assert deliver(codec.encode([DATA, 1, b"crossed"]), b) is s  # still served: the handler runs on
    b.served_done(s)
    for late in ([DATA, 1, b"x"], [END, 1], [CREDIT, 1, 5], [CANCEL, 1], [REPLY, 1, None],
                 [ERROR, 1, "X", "y", {}]):
        assert deliver(codec.encode(late), a) is None
        assert deliver(codec.encode(late), b) is None


def test_frames_for_ids_never_used_are_dropped() -> None:
    a, b = pair()
    for p in (a, b):
        for call_id in (1, 2, 99, 100, codec.MAX_ID):
            for m in ([DATA, call_id, b"x"], [END, call_id], [CREDIT, call_id, 1], [REPLY, call_id, 1],
                      [ERROR, call_id, "X", "y", {}], [CANCEL, call_id]):
                assert deliver(codec.encode(m), p) is None


# -- streams and credit ------------------------------------------------------------------


def test_data_on_a_call_without_that_stream_is_a_protocol_error() -> None:
    a, b = pair()
    call, frame = a.start_call("echo", None, None, False, False)
    served(b, frame)
    with pytest.raises(ProtocolError, match="no stream in that direction"):
        deliver(codec.encode([DATA, call.id, b"x"]), b)
    with pytest.raises(ProtocolError, match="no stream in that direction"):
        deliver(codec.encode([DATA, call.id, b"x"]), a)


def test_data_after_end_is_a_protocol_error() -> None:
    a, b = pair()
    call, frame = a.start_call("put", None, None, True, False)
    s = served(b, frame)
    assert deliver(codec.encode([DATA, 1, b"abc"]), b) is s
    end = a.end_upload(call)
    assert decode(end) == [END, 1] and a.end_upload(call) is None
    assert deliver(end, b) is s and s.recv_window is not None and not s.recv_window.open
    with pytest.raises(ProtocolError, match="after its stream ended"):
        deliver(codec.encode([DATA, 1, b"x"]), b)


def test_data_after_the_answer_is_a_protocol_error() -> None:
    a, b = pair()
    call, frame = a.start_call("get", None, None, False, True)
    s = served(b, frame)
    deliver(b.reply(s, None), a)
    with pytest.raises(ProtocolError, match="after its stream ended"):
        deliver(codec.encode([DATA, 1, b"x"]), a)


def test_data_beyond_the_credit_is_refused_to_the_byte() -> None:
    a, b = pair()
    _, frame = a.start_call("put", None, None, True, False)
    s = served(b, frame)
    assert deliver(codec.encode([DATA, 1, b"x" * (WINDOW - 1)]), b) is s
    assert deliver(codec.encode([DATA, 1, b"x"]), b) is s  # exactly the window
    assert deliver(codec.encode([DATA, 1, b""]), b) is s  # empty chunks cost nothing
    with pytest.raises(ProtocolError, match=r"peer sent 1 bytes on call 1 with only 0 of credit"):
        deliver(codec.encode([DATA, 1, b"x"]), b)


def test_credit_is_granted_back_at_half_the_window() -> None:
    a, b = pair()
    call, frame = a.start_call("put", None, None, True, False)
    s = served(b, frame)
    assert a.take_credit(call, 10**9) == WINDOW and a.take_credit(call, 1) == 0
    deliver(codec.encode([DATA, 1, b"x" * WINDOW]), b)
    assert b.consumed(s, WINDOW // 2 - 1) is None
    credit = b.consumed(s, 1)
    assert decode(credit) == [CREDIT, 1, WINDOW // 2]
    assert s.recv_window is not None and s.recv_window.allowance == WINDOW // 2
    assert deliver(credit, a) is call and a.take_credit(call, 10**9) == WINDOW // 2
    # Once the upload ended, nothing more is granted: no CREDIT the sender could not use.
    deliver(a.end_upload(call), b)
    assert b.consumed(s, WINDOW // 2) is None


def test_credit_for_a_call_without_an_outgoing_stream_is_ignored() -> None:
    a, b = pair()
    call, frame = a.start_call("echo", None, None, False, False)
    served(b, frame)
    assert deliver(codec.encode([CREDIT, 1, 100]), a) is None
    assert deliver(codec.encode([CREDIT, 1, 100]), b) is None
    with pytest.raises(RuntimeError):  # our bug: no upload to spend it on
        a.take_credit(call, 1)


def test_the_answer_stops_the_upload() -> None:
    a, b = pair()
    call, frame = a.start_call("put", None, None, True, True)
    s = served(b, frame)
    deliver(b.reply_error(s, errors.InvalidArgument("enough")), a)
    assert call.send_window is not None and not call.send_window.open
    assert a.take_credit(call, 10) == 0 and a.end_upload(call) is None


@settings(max_examples=300, deadline=None)
@given(upload=st.booleans(), window=st.integers(1024, 8192), steps=st.lists(
    st.tuples(st.sampled_from(["send", "read", "to_receiver", "to_sender"]), st.integers(1, 5000)),
    max_size=200,
))
def test_credit_under_any_interleaving(upload: bool, window: int, steps: list[tuple[str, int]]) -> None:
    """Sender and receiver with frames in flight both ways, in any order.

    The receiver never sees more than it granted, the credit is conserved (held by the
    sender, in flight, buffered, owed back), and a sender out of credit is never stuck
    once the receiver has read everything.
    """
    a, b = pair(client={"window": window}, server={"window": window})
    call, frame = a.start_call("put" if upload else "get", None, None, upload, not upload)
    s = served(b, frame)
    sender, receiver = (a, b) if upload else (b, a)
    out_call, in_call = (call, s) if upload else (s, call)
    to_receiver: list[bytes] = []
    to_sender: list[bytes] = []
    buffered = 0

    def in_flight() -> tuple[int, int]:
        data = sum(len(decode(f)[2]) for f in to_receiver)
        credit = sum(decode(f)[2] for f in to_sender)
        return data, credit

    for action, n in steps:
        if action == "send":
            took = sender.take_credit(out_call, n)
            if took:
                to_receiver.append(codec.encode_data(out_call.id, b"d" * took))
        elif action == "read" and buffered:
            take = min(n, buffered)
            buffered -= take
            credit = receiver.consumed(in_call, take)
            if credit is not None:
                to_sender.append(credit)
        elif action == "to_receiver" and to_receiver:
            frame = to_receiver.pop(0)
            assert deliver(frame, receiver) is in_call  # never beyond the credit
            buffered += len(decode(frame)[2])
        elif action == "to_sender" and to_sender:
            assert deliver(to_sender.pop(0), sender) is out_call
        data_flying, credit_flying = in_flight()
        sending, receiving = out_call.send_window, in_call.recv_window
        assert sending is not None and receiving is not None
        owed = receiving.consumed
        assert sending.credit + data_flying + buffered + owed + credit_flying == window
        assert receiving.allowance == sending.credit + data_flying + credit_flying
        assert owed < window // 2

    # Drain: the receiver reads all, every frame arrives; the sender then has credit again.
    while to_receiver or to_sender or buffered:
        if to_receiver:
            buffered += len(decode(to_receiver[0])[2])
            deliver(to_receiver.pop(0), receiver)
        if buffered:
            credit = receiver.consumed(in_call, buffered)
            buffered = 0
            if credit is not None:
                to_sender.append(credit)
        if to_sender:
            deliver(to_sender.pop(0), sender)
    assert out_call.send_window.credit > window // 2  # type: ignore[union-attr]


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.tuples(st.booleans(), st.integers(0, 20_000)), max_size=60))
def test_a_sender_that_ignores_credit_is_caught_at_the_first_byte_over(
    steps: list[tuple[bool, int]],
) -> None:
    """A peer sending what it likes, while we read some: refused exactly when it overruns."""
    a, b = pair()
    _, frame = a.start_call("put", None, None, True, False)
    s = served(b, frame)
    received = granted = unread = 0
    for is_data, n in steps:
        if is_data:
            if received + n > WINDOW + granted:
                with pytest.raises(ProtocolError, match="credit"):
                    deliver(codec.encode_data(1, b"o" * n), b)
                return
            assert deliver(codec.encode_data(1, b"o" * n), b) is s
            received += n
            unread += n
        elif unread:
            take = min(n, unread) or unread
            unread -= take
            credit = b.consumed(s, take)
            if credit is not None:
                granted += decode(credit)[2]


# -- drain and close ---------------------------------------------------------------------


def test_drain_refuses_new_calls_but_lets_running_ones_answer() -> None:
    a, b = pair()
    call, frame = a.start_call("echo", 1, None, False, False)
    s = served(b, frame)
    goodbye = b.drain()
    assert decode(goodbye) == [GOODBYE, "node is shutting down"] and b.draining
    assert b.drain() is None  # said once
    refusal = decode(deliver(a.start_call("echo", 2, None, False, False)[1], b))
    assert refusal[:3] == [ERROR, 3, "UNAVAILABLE"] and "shutting down" in refusal[3]
    assert deliver(b.reply(s, 1), a) is call  # the call in flight still answers
    # The peer stops starting calls once it has the GOODBYE.
    a.check_can_call()
    assert deliver(goodbye, a) is None and a.peer_draining
    with pytest.raises(ConnectionClosed, match="node server is shutting down"):
        a.check_can_call()


def test_close_answers_our_calls_and_cancels_theirs() -> None:
    a, b = pair()
    mine, _ = b.start_call("echo", None, None, True, True)
    theirs = served(b, a.start_call("put", None, None, True, False)[1])
    reason = ConnectionClosed("lost the connection", node="client")
    assert b.close(reason) and b.state is CLOSED and b.closed
    assert not b.close(ConnectionClosed("again"))
    assert b.close_reason is reason
    assert mine.answered and not mine.send_window.open and not mine.recv_window.open  # type: ignore[union-attr]
    assert theirs.cancelled and b.reply(theirs, 1) is None
    # The records stay until their owners let go; nothing goes out for them any more.
    assert b.forget(mine) is None and not b.made
    b.served_done(theirs)
    assert not b.served
    assert b.drain() is None
    for check in (b.check_open, b.check_can_call):
        with pytest.raises(ConnectionClosed, match="lost the connection") as info:
            check()
        assert info.value is not reason and info.value.details == {"node": "client"}  # a fresh copy
    with pytest.raises(ConnectionClosed):
        b.start_call("echo", None, None, False, False)
    assert decode(b.on_call(1_001, "echo", None, {}))[2] == "UNAVAILABLE"  # type: ignore[arg-type]


# -- keepalive ---------------------------------------------------------------------------


def test_ping_nonces_count_and_pong_echoes() -> None:
    a, b = pair()
    pings = [decode(a.ping()) for _ in range(3)]
    assert pings == [[PING, 0], [PING, 1], [PING, 2]]
    assert decode(deliver(a.ping(), b)) == [PONG, 3]
    assert deliver(codec.encode([PONG, 3]), a) is None
    a._ping_nonce = 2**31 - 1
    assert decode(a.ping()) == [PING, 2**31 - 1] and decode(a.ping()) == [PING, 0]


# -- the whole exchange ------------------------------------------------------------------


def test_a_streaming_call_end_to_end() -> None:
    """Upload and download on one call, as the I/O layer drives them; nothing is left over."""
    a, b = pair()
    call, frame = a.start_call("put", "name", 10.0, True, True)
    s = served(b, frame)
    up = a.take_credit(call, 5000)
    assert deliver(codec.encode_data(call.id, b"u" * up), b) is s
    assert deliver(a.end_upload(call), b) is s
    assert b.consumed(s, up) is None
    down = b.take_credit(s, 3000)
    assert deliver(codec.encode_data(s.id, b"d" * down), a) is call
    assert a.consumed(call, down) is None
    assert deliver(b.reply(s, {"stored": up}), a) is call and call.answered
    b.served_done(s)
    assert a.forget(call) is None
    assert not a.made and not b.made and not a.served and not b.served


_fuzz_messages = st.one_of(
    st.builds(lambda i, m, mt: [CALL, i, m, None, mt], st.integers(0, 12), st.sampled_from(["echo", "x"]),
              st.fixed_dictionaries({}, optional={"timeout": st.one_of(st.floats(), st.text(max_size=2)),
                                                  "up": st.booleans(), "down": st.booleans()})),
    st.builds(lambda i: [REPLY, i, None], st.integers(0, 12)),
    st.builds(lambda i: [ERROR, i, "X", "y", {}], st.integers(0, 12)),
    st.builds(lambda i: [CANCEL, i], st.integers(0, 12)),
    st.builds(lambda i, n: [DATA, i, b"z" * n], st.integers(0, 12), st.integers(0, 70_000)),
    st.builds(lambda i: [END, i], st.integers(0, 12)),
    st.builds(lambda i, n: [CREDIT, i, n], st.integers(0, 12), st.integers(1, 2**40)),
    st.builds(lambda n: [PING, n], st.integers(0, 5)),
    st.builds(lambda n: [PONG, n], st.integers(0, 5)),
    st.just([GOODBYE, "bye"]),
    st.just(hello()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_fuzz_messages, max_size=25), st.lists(st.sampled_from(["call", "stream", "done"]),
                                                       max_size=10))
def test_no_peer_input_breaks_the_state_machine(messages: list[list[Any]], ours: list[str]) -> None:
    """Whatever a peer sends after the hello, the protocol answers with a frame, a record,
    None or a TriodeError (which closes the connection): never another exception."""
    a, b = pair()
    for i, what in enumerate(ours):
        if what == "call":
            b.start_call("echo", i, None, False, False)
        elif what == "stream":
            b.start_call("echo", i, None, True, True)
        elif b.served:
            b.served_done(next(iter(b.served.values())))
    for m in messages:
        try:
            got = deliver(codec.encode(m), b)
        except TriodeError as exc:
            assert isinstance(exc, (ProtocolError, ConnectionClosed)), exc
            return
        assert got is None or isinstance(got, (bytes, MadeCall, ServedCall))
        if isinstance(got, bytes):
            assert decode(got)[0] in (ERROR, PONG)
