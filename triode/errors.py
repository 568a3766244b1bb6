"""The one exception hierarchy of Triode, and its mapping to wire error codes.

Every error a user can see is a :class:`TriodeError` with a stable ``code`` string.
The code is what crosses the wire (see docs/protocol.md, "Error codes"); the far
side rebuilds the same class from it with :func:`from_wire`. Adding a class with a
new ``code`` registers it: this module is the only place codes are defined.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "TriodeError",
    "ProtocolError",
    "FrameTooLarge",
    "IncompatibleVersion",
    "ConnectionClosed",
    "AuthenticationFailed",
    "PermissionDenied",
    "EncodeError",
    "InvalidArgument",
    "InvalidDigest",
    "InvalidPath",
    "DigestMismatch",
    "NotFound",
    "BlobNotFound",
    "FailedPrecondition",
    "MissingInputs",
    "TooLarge",
    "OutputTooLarge",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Cancelled",
    "Unavailable",
    "Unimplemented",
    "Internal",
    "ToolNotFound",
    "ToolError",
    "ProcessExit",
    "RuntimeMissing",
    "from_wire",
]

_BY_CODE: dict[str, type[TriodeError]] = {}


class TriodeError(Exception):
    """Base of every Triode error: a stable code, a message that says what to fix, details."""

    code: ClassVar[str] = "INTERNAL"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            # The base class holds INTERNAL only until Internal takes it over.
            if _BY_CODE.get(cls.code, TriodeError) is not TriodeError:
                raise TypeError(f"error code {cls.code!r} is defined twice")
            _BY_CODE[cls.code] = cls

    def __str__(self) -> str:
        return self.message or self.code

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, **{self.details!r})"

    def to_wire(self) -> tuple[str, str, dict[str, Any]]:
        return self.code, self.message, self.details

    def copy(self) -> TriodeError:
        """A fresh instance of the same error, for each of many waiters on one failure:
        one exception object raised in several tasks tangles their tracebacks."""
        return type(self)(self.message, **self.details)

    def __reduce__(self) -> Any:  # picklable, so it can cross trio.to_thread and processes
        return (_rebuild, (type(self), self.message, self.details))


def _rebuild(cls: type[TriodeError], message: str, details: dict[str, Any]) -> TriodeError:
    return cls(message, **details)


_BY_CODE[TriodeError.code] = TriodeError

#: Codes older peers sent, read as the code that replaced them (never sent any more).
_ALIASES = {"INTERNAL_ERROR": "INTERNAL"}


def from_wire(code: str, message: str, details: dict[str, Any] | None = None) -> TriodeError:
    """Rebuild the error the far side raised; an unknown code becomes a plain TriodeError."""
    # Details come from the peer: keep what can be keyword arguments, so that no peer can
    # turn its error into a TypeError on our side.
    safe = {k: v for k, v in (details or {}).items() if isinstance(k, str) and k != "message"}
    code = _ALIASES.get(code, code)
    cls = _BY_CODE.get(code)
    if cls is None:
        err = TriodeError(message, **safe)
        err.code = code  # type: ignore[misc]  # keep the code we were sent
        return err
    return cls(message, **safe)


# -- protocol and connection ------------------------------------------------------------


class ProtocolError(TriodeError):
    """The peer broke the wire protocol; the connection is closed."""

    code = "PROTOCOL_ERROR"


class FrameTooLarge(ProtocolError):
    code = "FRAME_TOO_LARGE"


class IncompatibleVersion(ProtocolError):
    code = "INCOMPATIBLE_VERSION"


class ConnectionClosed(TriodeError):
    """The connection ended before the call finished; the call may or may not have run."""

    code = "CONNECTION_CLOSED"


class AuthenticationFailed(TriodeError):
    code = "UNAUTHENTICATED"


class PermissionDenied(TriodeError):
    """The caller may not do this on this node (e.g. write the action cache when the node
    takes only its own executions' results); retrying it unchanged fails the same way."""

    code = "PERMISSION_DENIED"


class EncodeError(TriodeError):
    """This side cannot encode a message: a value msgpack cannot hold (a set, an object,
    an int over 64 bits) was handed to the wire by a caller or returned by a handler.

    Raised locally, never because of bytes from the peer: unlike ProtocolError it says
    nothing about the connection, which stays up. It has no wire code of its own (never
    registered, so no peer can make us raise it); the call it broke fails with
    INVALID_ARGUMENT (arguments) or INTERNAL (a result) instead.
    """


# -- bad input ---------------------------------------------------------------------------


class InvalidArgument(TriodeError):
    """The request itself is wrong; retrying it unchanged will fail the same way."""

    code = "INVALID_ARGUMENT"


class InvalidDigest(InvalidArgument):
    code = "INVALID_DIGEST"


class InvalidPath(InvalidArgument):
    """A path escapes its root (absolute, ``..``, through a symlink) or is malformed."""

    code = "INVALID_PATH"


class DigestMismatch(InvalidArgument):
    """Bytes did not hash to (or were not the size of) the digest they were sent under."""

    code = "DIGEST_MISMATCH"


class NotFound(TriodeError):
    code = "NOT_FOUND"


class BlobNotFound(NotFound):
    code = "BLOB_NOT_FOUND"


class FailedPrecondition(TriodeError):
    code = "FAILED_PRECONDITION"


class MissingInputs(FailedPrecondition):
    """An action's inputs are not in the CAS; ``details['missing']`` lists their digests."""

    code = "MISSING_INPUTS"


class TooLarge(InvalidArgument):
    """Something is over a configured size limit (a blob, a frame payload, a result)."""

    code = "TOO_LARGE"


class OutputTooLarge(TooLarge):
    code = "OUTPUT_TOO_LARGE"


# -- load, time and availability ---------------------------------------------------------


class ResourceExhausted(TriodeError):
    """Full right now; ``details['retry_after']`` (seconds) says when to try again."""

    code = "RESOURCE_EXHAUSTED"

    @property
    def retry_after(self) -> float | None:
        value = self.details.get("retry_after")
        return float(value) if value is not None else None


class DeadlineExceeded(TriodeError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(TriodeError):
    """The work was cancelled on the far side (not a local trio.Cancelled)."""

    code = "CANCELLED"


class Unavailable(TriodeError):
    """A node this call needs (backing tier, peer) cannot be reached; ``details['node']`` names it."""

    code = "UNAVAILABLE"


class Unimplemented(TriodeError):
    """The method is unknown to this node."""

    code = "UNIMPLEMENTED"


class Internal(TriodeError):
    """A bug on the far side; the message carries its description.

    Its code, ``INTERNAL``, is also the base class's: an error of unknown origin is
    reported the same way. Older peers sent ``INTERNAL_ERROR``; it is still read as this.
    """

    code = "INTERNAL"


# -- tools -------------------------------------------------------------------------------


class ToolNotFound(NotFound):
    """``details['available']`` lists the tools the entrypoint does export."""

    code = "TOOL_NOT_FOUND"


class ToolError(TriodeError):
    """The tool threw; ``details`` has ``name``, ``message`` and ``stack`` from the runtime."""

    code = "TOOL_ERROR"


class ProcessExit(TriodeError):
    """A process ended when it should not have; ``details`` has ``exit_code``, ``signal``, ``stderr_tail``."""

    code = "PROCESS_EXIT"


class RuntimeMissing(FailedPrecondition):
    """The configured JavaScript runtime (bun or node) is not installed where we looked."""

    code = "RUNTIME_MISSING"
