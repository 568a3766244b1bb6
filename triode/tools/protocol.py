"""The worker channel, sans I/O: length-prefixed JSON frames and the messages they carry.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON (JSON, not
msgpack, because every JavaScript runtime parses it natively and the harness then needs
no package). Request ids let the host tell a reply to *this* call from anything else, so
a worker that answers the wrong call, or answers twice, is caught as a protocol error
rather than silently mixing up results. The decoder refuses a frame as soon as its header
announces more than the limit: a tool returning 2 GiB never gets buffered.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from ..errors import OutputTooLarge, ProtocolError

__all__ = [
    "HEADER",
    "encode_frame",
    "encode_call",
    "FrameDecoder",
    "Ready",
    "LoadFailure",
    "Result",
    "parse_hello",
    "parse_result",
]

HEADER = struct.Struct(">I")
#: Room for the envelope around a tool's output ({"type":"result","id":..,"ok":true,"output":}).
ENVELOPE = 256


def encode_frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def encode_call(call_id: int, tool: str, input_json: bytes) -> bytes:
    """A call frame; ``input_json`` is already-serialised JSON, embedded without re-encoding."""
    head = b'{"type":"call","id":%d,"tool":%s,"input":' % (call_id, json.dumps(tool).encode())
    return encode_frame(head + input_json + b"}")


class FrameDecoder:
    """Feed bytes from the worker, get whole decoded messages back.

    ``max_output`` bounds the body of one frame (the tool's output plus a small
    envelope); a bigger announced frame raises :class:`OutputTooLarge` at once.
    """

    def __init__(self, max_output: int) -> None:
        self.max_output = max_output
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > self.max_output + ENVELOPE:
                header = bytes(self._buffer[: HEADER.size])
                if all(32 <= b < 127 or b in (9, 10, 13) for b in header):
                    raise ProtocolError(
                        f"the worker's channel carries text, not frames (it starts {header!r}); "
                        "something other than the harness wrote to it"
                    )
                raise OutputTooLarge(
                    f"the worker sent a {size}-byte reply; the limit is {self.max_output} bytes "
                    "of output (raise max_output or return less)",
                    size=size,
                    limit=self.max_output,
                )
            if len(self._buffer) < HEADER.size + size:
                break
            body = bytes(self._buffer[HEADER.size : HEADER.size + size])
            del self._buffer[: HEADER.size + size]
            messages.append(_decode(body))
        return messages


def _parse_int(text: str) -> int | float:
    """JSON integers as JavaScript meant them: past 64 bits they are doubles (and msgpack needs that)."""
    value = int(text)
    return value if -(2**63) <= value < 2**64 else float(value)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body, parse_int=_parse_int)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(
            f"the worker sent a frame that is not JSON: {exc}; first bytes {body[:40]!r}"
        ) from None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ProtocolError(f"the worker sent a frame that is not a message: {body[:80]!r}")
    return value


@dataclass(frozen=True)
class Ready:
    tools: tuple[str, ...]
    runtime: str
    pid: int


@dataclass(frozen=True)
class LoadFailure:
    """The entrypoint could not be loaded; ``kind`` is "load" or "typescript"."""

    kind: str
    error: dict[str, str]


@dataclass(frozen=True)
class Result:
    call_id: int
    ok: bool
    output: Any = None
    error: dict[str, str] = field(default_factory=dict)
    #: The tool left the worker in a bad state (an uncaught error): do not reuse it.
    recycle: bool = False
    #: The worker did not know the tool; ``tools`` lists what it has.
    not_found: bool = False
    tools: tuple[str, ...] = ()


def _error_fields(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ProtocolError(f"the worker sent an error that is not an object: {value!r:.80}")
    return {key: str(value.get(key) or "") for key in ("name", "message", "stack")}


def parse_hello(message: dict[str, Any]) -> Ready | LoadFailure:
    kind = message["type"]
    if kind == "ready":
        tools = message.get("tools")
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise ProtocolError("the worker's ready message has no list of tool names")
        pid = message.get("pid")
        return Ready(tuple(tools), str(message.get("runtime", "")), pid if isinstance(pid, int) else 0)
    if kind == "load_error":
        return LoadFailure(str(message.get("kind", "load")), _error_fields(message.get("error")))
    raise ProtocolError(f"the worker's first message was {kind!r}, expected 'ready'")


def parse_result(message: dict[str, Any], call_id: int) -> Result:
    if message["type"] != "result":
        raise ProtocolError(f"the worker sent {message['type']!r} while a call was in progress")
    if message.get("id") != call_id:
        raise ProtocolError(f"the worker answered call {message.get('id')!r}, expected {call_id}")
    ok = message.get("ok")
    if ok is True:
        if "output" not in message:
            raise ProtocolError("the worker's result has no output")
        return Result(call_id, True, output=message["output"])
    if ok is False:
        tools = message.get("tools") or []
        return Result(
            call_id,
            False,
            error=_error_fields(message.get("error")),
            recycle=bool(message.get("recycle")),
            not_found=bool(message.get("not_found")),
            tools=tuple(str(t) for t in tools) if isinstance(tools, list) else (),
        )
    raise ProtocolError(f"the worker's result has no ok flag: {message!r:.120}")
