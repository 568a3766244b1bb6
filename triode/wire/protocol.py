"""The call state machine of one connection, with no I/O (in the manner of h11).

:class:`Protocol` holds everything a connection knows about the protocol: the hello and
its checks, call ids, which calls are open in each direction and what may still be sent
on them, stream credit, draining and closing. The I/O layer (``connection.py``) feeds it
bytes, hands it each decoded message through the ``on_*`` method for its kind, and sends
the frames its methods return. Nothing here waits, sleeps or imports trio, so every rule
can be tested with plain calls, and the rules live in one place instead of being spread
over the tasks that move the bytes.

Two kinds of error come out, as in h11: :class:`ProtocolError` (and the other errors of
the hello) when the *peer* broke the protocol, which closes the connection, and
``RuntimeError`` when *this* side misused the class, which is a bug here.

A call's record (:class:`MadeCall`, :class:`ServedCall`) is the I/O layer's own call
object, a subclass made through the protocol's factories, so a call costs one object
as before the split. Methods take and return plain values and those records: the hot
path allocates nothing the old all-in-one connection did not.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .. import errors
from ..errors import ConnectionClosed, EncodeError, ProtocolError, TriodeError
from . import codec
from .codec import CALL, CANCEL, CREDIT, END, ERROR, GOODBYE, HELLO, PING, PONG, REPLY

__all__ = [
    "PROTOCOL_VERSION",
    "HELLO_MAX_FRAME",
    "DEFAULT_WINDOW",
    "DEFAULT_MAX_CALLS",
    "AWAITING_HELLO",
    "OPEN",
    "CLOSED",
    "PeerHello",
    "hello_body",
    "SendWindow",
    "ReceiveWindow",
    "CallState",
    "MadeCall",
    "ServedCall",
    "Protocol",
]

log = logging.getLogger("triode.wire")

PROTOCOL_VERSION = 1

#: Frames that arrive before the hello is accepted are held to this size, so an
#: unauthenticated peer cannot make us buffer a large frame.
HELLO_MAX_FRAME = 64 * 1024

DEFAULT_WINDOW = 4 * 1024 * 1024
DEFAULT_MAX_CALLS = 256

# The states of a connection. Plain strings: compared with ``is``, readable in a repr.
AWAITING_HELLO = "awaiting hello"
OPEN = "open"
CLOSED = "closed"


def hello_body(
    *,
    node_id: str,
    features: frozenset[str],
    window: int,
    max_frame: int,
    max_calls: int,
    token: str | None,
) -> dict[str, Any]:
    """The map a side sends in its HELLO."""
    hello: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "node": node_id,
        "features": sorted(features),
        "window": window,
        "max_frame": max_frame,
        "max_calls": max_calls,
    }
    if token is not None:
        hello["token"] = token
    return hello


@dataclass(frozen=True)
class PeerHello:
    """What the far side said about itself in its hello."""

    version: int
    node: str
    features: frozenset[str]
    window: int
    max_frame: int
    max_calls: int
    token: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> PeerHello:
        def need(key: str, typ: type, check: Callable[[Any], bool], what: str) -> Any:
            value = body.get(key)
            if type(value) is not typ or not check(value):
                raise ProtocolError(f"hello field {key!r} must be {what}, got {value!r}")
            return value

        version = need("version", int, lambda v: v >= 0, "a protocol version number")
        if version != PROTOCOL_VERSION:
            raise errors.IncompatibleVersion(
                f"peer speaks protocol version {version}, this side speaks {PROTOCOL_VERSION}; "
                "upgrade the older of the two",
                peer_version=version,
                version=PROTOCOL_VERSION,
            )
        features = body.get("features", [])  # optional: absent is no feature
        if type(features) is not list or not all(type(f) is str for f in features):
            raise ProtocolError(f"hello field 'features' must be a list of strings, got {features!r}")
        token = body.get("token")
        if token is not None and not isinstance(token, str):
            raise ProtocolError("hello field 'token' must be a string")
        return cls(
            version=version,
            node=need("node", str, lambda v: 0 < len(v) <= 256, "a node id of 1-256 characters"),
            features=frozenset(features),
            window=need("window", int, lambda v: 1024 <= v <= 2**30, "1 KiB to 1 GiB"),
            max_frame=need("max_frame", int, lambda v: 64 * 1024 <= v <= 2**31, "64 KiB to 2 GiB"),
            max_calls=need("max_calls", int, lambda v: 1 <= v <= 65536, "1 to 65536"),
            token=token,
        )


# -- per-call records ----------------------------------------------------------------------


class SendWindow:
    """A stream we send: the credit left, whether DATA may still go, and all the credit
    ever granted (the window, plus every CREDIT): a sender that has prepared ``n`` bytes
    so far may prepare ``granted - n`` more without getting ahead of the receiver."""

    __slots__ = ("credit", "open", "granted")

    def __init__(self, credit: int) -> None:
        self.credit = credit
        self.open = True
        self.granted = credit

    def __repr__(self) -> str:
        return f"SendWindow(credit={self.credit}, granted={self.granted}, open={self.open})"


class ReceiveWindow:
    """A stream we receive: the credit the peer has left, and what we owe it back."""

    __slots__ = ("allowance", "consumed", "open")

    def __init__(self, allowance: int) -> None:
        self.allowance = allowance
        self.consumed = 0  # read by our side since the last CREDIT
        self.open = True

    def __repr__(self) -> str:
        return f"ReceiveWindow(allowance={self.allowance}, consumed={self.consumed}, open={self.open})"


class CallState:
    """What the protocol keeps about one call.

    The I/O layer's call objects subclass :class:`MadeCall` and :class:`ServedCall` (the
    protocol makes them through its ``new_made``/``new_served`` factories), so a call
    is one object, not two: a unary call is the hot path. The record's constructor sets
    ``id`` and ``method``; the protocol sets the rest as it opens the call, and the I/O
    layer only reads it. A window exists only for a direction the call streams in.
    """

    __slots__ = ("id", "method", "send_window", "recv_window")

    id: int
    method: str
    send_window: SendWindow | None
    recv_window: ReceiveWindow | None


class MadeCall(CallState):
    """A call this side made: the upload is ``send_window``, the download ``recv_window``."""

    __slots__ = ("answered",)

    #: A REPLY or ERROR came, or we gave up on the call (left it, or the connection closed).
    answered: bool

    def __init__(self, call_id: int, method: str, upload: bool = False, download: bool = False) -> None:
        self.id = call_id
        self.method = method

    def __repr__(self) -> str:
        answered = getattr(self, "answered", None)  # unset until the protocol opened it
        return f"<{type(self).__name__} {self.id} {self.method!r} answered={answered}>"


class ServedCall(CallState):
    """A call the peer made and we serve: the upload is ``recv_window``, the download
    ``send_window``."""

    __slots__ = ("handler", "timeout", "cancelled")

    #: What the lookup returned for ``method``; opaque to the protocol.
    handler: Any
    #: Seconds the caller had left when it sent the call (None: no deadline).
    timeout: float | None
    #: The caller sent CANCEL, or the connection closed: nothing more is sent for it.
    cancelled: bool

    def __init__(
        self,
        call_id: int,
        method: str,
        args: Any = None,
        timeout: float | None = None,
        upload: bool = False,
        download: bool = False,
    ) -> None:
        self.id = call_id
        self.method = method

    def __repr__(self) -> str:
        cancelled = getattr(self, "cancelled", None)  # unset until the protocol opened it
        return f"<{type(self).__name__} {self.id} {self.method!r} cancelled={cancelled}>"


M = TypeVar("M", bound=MadeCall)
S = TypeVar("S", bound=ServedCall)


# -- the state machine ---------------------------------------------------------------------


class Protocol(Generic[M, S]):
    """The protocol state of one side of a connection.

    Receiving: feed bytes to :attr:`decoder` (or :meth:`receive_bytes`), take messages
    from :meth:`next_message`, pass the first to :meth:`receive_hello` and every later
    one to the ``on_*`` method of its kind. Sending: every method that makes a frame
    returns it; the caller writes it (or drops it once the connection is closed).

    ``new_made(call_id, method, upload, download)`` and ``new_served(call_id, method,
    args, timeout, upload, download)`` make the records of new calls: the I/O layer
    passes its own call classes' constructors (subclasses of MadeCall and ServedCall),
    tests leave the plain records.
    """

    def __init__(
        self,
        *,
        initiator: bool,
        node_id: str,
        window: int = DEFAULT_WINDOW,
        max_frame: int = codec.DEFAULT_MAX_FRAME,
        max_calls: int = DEFAULT_MAX_CALLS,
        features: frozenset[str] = frozenset(),
        token: str | None = None,
        required_token: str | None = None,
        lookup: Callable[[str], Any] | None = None,
        takes_upload: Callable[[str], bool] | None = None,
        new_made: Callable[[int, str, bool, bool], M] = MadeCall,  # type: ignore[assignment]
        new_served: Callable[[int, str, Any, float | None, bool, bool], S] = ServedCall,  # type: ignore[assignment]
    ) -> None:
        self.initiator = initiator
        self.node_id = node_id
        self.window = window
        self.max_frame = max_frame
        self.max_calls = max_calls
        self.features = features
        self._token = token
        self._required_token = required_token
        #: Method name -> handler (anything but None); None means "no such method".
        self._lookup = lookup
        #: Method name -> whether its handler reads an upload; None: every method may.
        self._takes_upload = takes_upload
        self._new_made = new_made
        self._new_served = new_served
        self._credit_at = window // 2  # grant credit back once this much has been read

        self.state = AWAITING_HELLO
        self.peer: PeerHello  # set by receive_hello
        self.decoder = codec.Decoder(HELLO_MAX_FRAME)
        #: Calls we made that the caller still holds (answered or not).
        self.made: dict[int, M] = {}
        #: Calls from the peer whose handler has not finished (cancelled or not).
        self.served: dict[int, S] = {}
        #: We said GOODBYE: calls from the peer are refused from now on.
        self.draining = False
        #: The peer said GOODBYE: we start no new calls.
        self.peer_draining = False
        self.close_reason: ConnectionClosed | None = None
        self._next_id = 1 if initiator else 2
        self._peer_parity = 0 if initiator else 1
        self._last_peer_id = 0
        self._ping_nonce = 0

    def __repr__(self) -> str:
        role = "initiator" if self.initiator else "acceptor"
        return (f"<Protocol {self.node_id} {role} {self.state}: "
                f"{len(self.made)} made, {len(self.served)} served>")

    # -- bytes in ----------------------------------------------------------------------

    def receive_bytes(self, data: bytes | bytearray | memoryview) -> None:
        """Add received bytes (raises :class:`FrameTooLarge` on an over-limit header)."""
        self.decoder.receive_data(data)

    def next_message(self) -> list[Any] | None:
        """The next whole, shape-checked message; None until more bytes arrive."""
        return self.decoder.next_message()

    # -- the hello ---------------------------------------------------------------------

    def hello(self) -> dict[str, Any]:
        return hello_body(
            node_id=self.node_id, features=self.features, window=self.window,
            max_frame=self.max_frame, max_calls=self.max_calls, token=self._token,
        )

    def hello_frame(self) -> bytes:
        """Our HELLO. The initiator sends it first; the acceptor once it accepted the peer's."""
        return codec.encode([HELLO, self.hello()])

    def receive_hello(self, message: list[Any]) -> PeerHello:
        """Check the peer's first message; on success the connection is open.

        Raises the reason to refuse it: a ProtocolError (not a HELLO, a bad field),
        IncompatibleVersion, AuthenticationFailed, or the refusal the peer sent us
        (ERROR with id 0) rebuilt as its own error.
        """
        if self.state is not AWAITING_HELLO:
            raise RuntimeError(f"receive_hello() on a connection that is {self.state}")
        kind = message[0]
        if kind == ERROR and message[1] == 0:
            raise errors.from_wire(message[2], message[3], message[4])
        if kind != HELLO:
            raise ProtocolError(f"expected HELLO, got {codec.KIND_NAMES[kind]}")
        peer = PeerHello.parse(message[1])
        self._check_token(peer)
        self.peer = peer
        self.state = OPEN
        self.decoder.max_frame = self.max_frame
        return peer

    def _check_token(self, peer: PeerHello) -> None:
        """Compare the offered token with ours in constant time (hashes hide the length too)."""
        required = self._required_token
        if required is None:
            return
        offered = peer.token or ""
        if not hmac.compare_digest(
            hashlib.sha256(offered.encode()).digest(), hashlib.sha256(required.encode()).digest()
        ):
            raise errors.AuthenticationFailed(
                f"node {self.node_id} requires a token and "
                + ("none was given" if not offered else "the one given is wrong")
                + " (pass the node's token with --token-file or token=)"
            )

    @staticmethod
    def refusal_frame(err: TriodeError) -> bytes:
        """ERROR with call id 0: why we give up on the connection (a refused hello, a
        protocol error). Sent just before closing; the peer does not answer it."""
        return codec.encode([ERROR, 0, *err.to_wire()])

    # -- state -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.state is CLOSED

    def close(self, reason: ConnectionClosed) -> bool:
        """Mark the connection closed; False if it already was.

        Every call we made counts as answered (its caller gets ``reason``) and every call
        we serve as cancelled (no answer goes out). The records stay until their owners
        let go of them (:meth:`forget`, :meth:`served_done`), as they would anyway.
        """
        if self.state is CLOSED:
            return False
        self.state = CLOSED
        self.close_reason = reason
        for made in self.made.values():
            _end_made(made)
        for served in self.served.values():
            served.cancelled = True
        return True

    def check_open(self) -> None:
        """Raise ConnectionClosed (a fresh copy of the reason) once the connection is closed."""
        reason = self.close_reason
        if reason is not None:
            raise ConnectionClosed(reason.message, **reason.details)

    def drain(self) -> bytes | None:
        """Start refusing the peer's calls: the GOODBYE to send, the first time only."""
        if self.draining or self.state is CLOSED:
            return None
        self.draining = True
        return codec.encode([GOODBYE, "node is shutting down"])

    def ping(self) -> bytes:
        """A PING frame, with the next nonce (kept below 2**31)."""
        nonce = self._ping_nonce
        self._ping_nonce = (nonce + 1) & 0x7FFFFFFF
        return codec.encode([PING, nonce])

    # -- calls we make -----------------------------------------------------------------

    def check_can_call(self) -> None:
        """Raise ConnectionClosed if no new call may start: closed, or the peer drains."""
        if self.close_reason is not None:
            self.check_open()
        if self.peer_draining:
            raise ConnectionClosed(f"node {self.peer.node} is shutting down", node=self.peer.node)

    def start_call(
        self, method: str, args: Any, timeout: float | None, upload: bool, download: bool
    ) -> tuple[M, bytes]:
        """Open a call: its record (in :attr:`made` from now on) and its CALL frame.

        ``timeout`` is the caller's time left in seconds, None without a deadline. Raises
        InvalidArgument when ``args`` cannot be encoded and TooLarge when the frame is
        over the peer's limit; the call is not opened then.
        """
        if self.state is not OPEN:
            self.check_open()
            raise RuntimeError("start_call() before the hello was accepted")
        call_id = self._next_id
        self._next_id = call_id + 2
        meta: dict[str, Any] = {}
        if timeout is not None:
            meta["timeout"] = timeout
        if upload:
            meta["up"] = True
        if download:
            meta["down"] = True
        try:
            frame = codec.encode([CALL, call_id, method, args, meta])
        except EncodeError as exc:
            raise errors.InvalidArgument(f"arguments of {method} cannot be sent: {exc}") from None
        peer = self.peer
        if len(frame) - 4 > peer.max_frame:
            raise errors.TooLarge(
                f"arguments of {method} are {len(frame) - 4} bytes, over node {peer.node}'s "
                f"frame limit of {peer.max_frame}; stream large data instead",
                size=len(frame) - 4, limit=peer.max_frame,
            )
        call = self._new_made(call_id, method, upload, download)
        call.send_window = SendWindow(peer.window) if upload else None
        call.recv_window = ReceiveWindow(self.window) if download else None
        call.answered = False
        self.made[call_id] = call
        return call, frame

    def end_upload(self, call: M) -> bytes | None:
        """The END of the upload, unless the call has no upload, ended it, or was answered."""
        send = call.send_window
        if send is None or not send.open:
            return None
        send.open = False
        return codec.encode([END, call.id])

    def forget(self, call: M) -> bytes | None:
        """The caller is done with ``call``. Unanswered, it is cancelled: the CANCEL to
        send is returned (None once the connection is closed)."""
        del self.made[call.id]
        if call.answered:
            return None
        _end_made(call)
        if self.state is CLOSED:
            return None
        return codec.encode([CANCEL, call.id])

    # -- calls we serve ----------------------------------------------------------------

    def on_call(self, call_id: int, method: str, args: Any, meta: dict[str, Any]) -> S | bytes:
        """A CALL from the peer: the record to serve it with (in :attr:`served` until
        :meth:`served_done`), or the ERROR frame that refuses it."""
        if self.state is not OPEN:
            if self.state is AWAITING_HELLO:
                raise ProtocolError("expected HELLO, got CALL")
            return self._refuse(call_id, errors.Unavailable(f"the connection to {self.node_id} is closed"))
        if call_id % 2 != self._peer_parity or call_id == 0:
            raise ProtocolError(f"call id {call_id} has the wrong parity for this side")
        if call_id <= self._last_peer_id:
            raise ProtocolError(
                f"call id {call_id} is not above the last one ({self._last_peer_id}); ids must increase"
            )
        self._last_peer_id = call_id
        if self.draining:
            return self._refuse(call_id, errors.Unavailable(f"node {self.node_id} is shutting down"))
        if len(self.served) >= self.max_calls:
            return self._refuse(call_id, errors.ResourceExhausted(
                f"over {self.max_calls} calls in flight on one connection", retry_after=0.1,
            ))
        handler = self._lookup(method) if self._lookup is not None else None
        if handler is None:
            return self._refuse(call_id, errors.Unimplemented(
                f"node {self.node_id} has no method {method!r}"
            ))
        timeout = meta.get("timeout")
        if timeout is not None:
            if (type(timeout) is not float and type(timeout) is not int) or timeout != timeout:
                raise ProtocolError(f"CALL meta 'timeout' must be a number of seconds, got {timeout!r}")
            timeout = max(timeout, 0.0)
        upload = meta.get("up", False)
        download = meta.get("down", False)
        if (upload is not False and upload is not True) or (download is not False and download is not True):
            key, value = ("up", upload) if upload is not False and upload is not True else ("down", download)
            raise ProtocolError(f"CALL meta {key!r} must be true or false, got {value!r}")
        if upload and self._takes_upload is not None and not self._takes_upload(method):
            # Refused before any credit is used: its DATA is dropped as it arrives, instead
            # of waiting unread (up to a window per call) until the call ends.
            return self._refuse(call_id, errors.InvalidArgument(
                f"{method} takes no upload: call it without meta.up"
            ))
        call = self._new_served(call_id, method, args, timeout, upload, download)
        call.send_window = SendWindow(self.peer.window) if download else None
        call.recv_window = ReceiveWindow(self.window) if upload else None
        call.handler = handler
        call.timeout = timeout
        call.cancelled = False
        self.served[call_id] = call
        return call

    @staticmethod
    def _refuse(call_id: int, err: TriodeError) -> bytes:
        code, message, details = err.to_wire()
        return codec.encode([ERROR, call_id, code, message, details])

    def on_cancel(self, call_id: int) -> S | None:
        """CANCEL: the call to cancel (nothing more is sent for it), None if it is over."""
        call = self.served.get(call_id)
        if call is not None:
            call.cancelled = True
        return call

    def reply(self, call: S, result: Any) -> bytes | None:
        """The REPLY that ends a served call (None if it was cancelled: no answer then).

        A result msgpack cannot hold, or one over the peer's frame limit, becomes an
        ERROR for that call alone rather than a broken connection.
        """
        if call.send_window is not None:
            call.send_window.open = False
        if call.cancelled:
            return None
        try:
            frame = codec.encode([REPLY, call.id, result])
        except EncodeError as exc:
            log.error("handler for %s returned a value that cannot be sent: %s", call.method, exc)
            return self.reply_error(call, errors.Internal(
                f"{call.method} on node {self.node_id} returned a value that cannot be sent: {exc}"
            ))
        limit = self.peer.max_frame
        if len(frame) - 4 <= limit:
            return frame
        return self.reply_error(call, errors.TooLarge(
            f"the result of {call.method} is {len(frame) - 4} bytes, over the peer's frame limit "
            f"of {limit}; stream it instead",
            size=len(frame) - 4, limit=limit,
        ))

    def reply_error(self, call: S, err: TriodeError) -> bytes | None:
        """The ERROR that ends a served call (None if it was cancelled). Details msgpack
        cannot hold are dropped, and an over-long message is cut, so it always goes."""
        if call.send_window is not None:
            call.send_window.open = False
        if call.cancelled:
            return None
        code, message, details = err.to_wire()
        try:
            frame = codec.encode([ERROR, call.id, code, message, details])
        except EncodeError:  # details held something msgpack cannot: send the message only
            frame = codec.encode([ERROR, call.id, code, message, {}])
        if len(frame) - 4 > self.peer.max_frame:
            frame = codec.encode([ERROR, call.id, code, message[:1000], {}])
        return frame

    def served_done(self, call: S) -> None:
        """The handler is over and its answer (if any) is on its way: forget the call, so
        frames that crossed its end are dropped."""
        if call.send_window is not None:
            call.send_window.open = False
        del self.served[call.id]

    # -- messages about calls either side made -------------------------------------------

    def _call_for(self, call_id: int) -> M | S | None:
        """The live call a stream frame is about: one we serve or one we made, by parity.

        None for a call that has finished: frames that crossed its end are dropped.
        """
        if call_id % 2 == self._peer_parity:
            return self.served.get(call_id)
        return self.made.get(call_id)

    def on_reply(self, call_id: int) -> M | None:
        """REPLY: the call it answers (now answered), or None for one we left."""
        call = self.made.get(call_id)
        if call is None or call.answered:
            return None
        call.answered = True
        if call.send_window is not None or call.recv_window is not None:  # a unary call has neither
            _end_made(call)
        return call

    def on_error(self, call_id: int, code: str, message: str) -> M | None:
        """ERROR: as REPLY; with id 0 the peer is closing the connection, raised as
        ConnectionClosed (answering it would be pointless)."""
        if call_id == 0:
            node = self.peer.node
            raise ConnectionClosed(
                f"node {node} closed the connection: {code}: {message}", node=node, code=code
            )
        return self.on_reply(call_id)

    def on_data(self, call_id: int, chunk: bytes) -> M | S | None:
        """DATA: the call whose stream it belongs to, after checking it against the credit
        we granted; None for a call that is over (the chunk is dropped)."""
        call: M | S | None = (
            self.served.get(call_id) if call_id % 2 == self._peer_parity else self.made.get(call_id)
        )
        if call is None:
            return None
        recv = call.recv_window
        if recv is None:
            raise ProtocolError(f"DATA on call {call_id}, which has no stream in that direction")
        if not recv.open:
            raise ProtocolError(f"DATA on call {call_id} after its stream ended")
        n = len(chunk)
        if n > recv.allowance:
            raise ProtocolError(f"peer sent {n} bytes on call {call_id} with only {recv.allowance} of credit")
        recv.allowance -= n
        return call

    def on_end(self, call_id: int) -> M | S | None:
        """END: the call whose incoming stream is now over, if it has one."""
        call = self._call_for(call_id)
        if call is None or call.recv_window is None:
            return None
        call.recv_window.open = False
        return call

    def on_credit(self, call_id: int, n: int) -> M | S | None:
        """CREDIT: the call whose outgoing stream may now send ``n`` more bytes."""
        call = self._call_for(call_id)
        if call is None or call.send_window is None:
            return None
        window = call.send_window
        window.credit += n
        window.granted += n
        return call

    def take_credit(self, call: CallState, want: int) -> int:
        """Spend up to ``want`` bytes of ``call``'s send credit; how many may go now.

        0 means wait for CREDIT, or stop: ``call.send_window.open`` says which.
        """
        send = call.send_window
        if send is None:
            raise RuntimeError(f"call {call.id} has no stream to send on")
        if not send.open:
            return 0
        n = want if want < send.credit else send.credit
        if n <= 0:
            return 0
        send.credit -= n
        return n

    def consumed(self, call: CallState, n: int) -> bytes | None:
        """Our side read ``n`` bytes of ``call``'s incoming stream. Past half the window
        since the last grant, the CREDIT giving them back (never once the stream ended)."""
        recv = call.recv_window
        if recv is None:
            raise RuntimeError(f"call {call.id} has no stream to receive on")
        recv.consumed += n
        if recv.consumed >= self._credit_at and recv.open:
            grant = recv.consumed
            recv.allowance += grant
            recv.consumed = 0
            return codec.encode([CREDIT, call.id, grant])
        return None

    # -- connection-level messages ---------------------------------------------------------

    @staticmethod
    def on_ping(nonce: int) -> bytes:
        """PING: the PONG to send, at once and whatever the flow control."""
        return codec.encode([PONG, nonce])

    def on_goodbye(self, reason: str) -> None:
        """GOODBYE: the peer drains; new calls fail locally from now on."""
        self.peer_draining = True

    @staticmethod
    def on_hello() -> None:
        """A second HELLO."""
        raise ProtocolError("unexpected HELLO after the handshake")


def _end_made(call: MadeCall) -> None:
    """A call we made is over: nothing more is sent on it, and no more DATA may come."""
    call.answered = True
    if call.send_window is not None:
        call.send_window.open = False
    if call.recv_window is not None:
        call.recv_window.open = False
