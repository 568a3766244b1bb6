"""Content digests: SHA-256 as lowercase hex plus the size in bytes, written ``HASH/SIZE``."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import DigestMismatch, InvalidDigest

__all__ = ["Digest", "EMPTY", "Hasher"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX_BYTES = b"0123456789abcdef"


@dataclass(frozen=True, slots=True, order=True)
class Digest:
    hash: str
    size: int

    def __post_init__(self) -> None:
        if not isinstance(self.hash, str) or not _HEX64.fullmatch(self.hash):
            raise InvalidDigest(
                f"digest hash must be 64 lowercase hex characters (SHA-256), got {self.hash!r}"
            )
        if type(self.size) is not int or self.size < 0:
            raise InvalidDigest(f"digest size must be a non-negative integer, got {self.size!r}")

    @classmethod
    def of(cls, data: bytes | bytearray | memoryview) -> Digest:
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``HASH/SIZE``; anything else is an InvalidDigest that shows the expected form."""
        hash_, sep, size = text.strip().partition("/")
        if not sep or not size.isdigit() or (len(size) > 1 and size[0] == "0"):
            raise InvalidDigest(f"expected HASH/SIZE (64 hex chars, '/', decimal size), got {text!r}")
        return cls(hash_, int(size))

    @classmethod
    def from_wire(cls, value: Any) -> Digest:
        """A digest as sent on the wire: ``[hash, size]``."""
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise InvalidDigest(f"a digest on the wire is [hash, size], got {value!r}")
        return cls(value[0], value[1])

    @classmethod
    def from_wire_list(cls, values: list[Any]) -> list[Digest]:
        """Many wire digests at once: the same checks as :meth:`from_wire`, without its per-call cost.

        ``find_missing`` of 10,000 digests spends most of its time here, so the common
        case skips the dataclass machinery and checks every hash in one pass over their
        bytes (a regular expression per hash cost more than the rest of the call); a list
        with anything unusual goes through ``from_wire`` item by item, for its error message.
        """
        hashes = []
        for v in values:
            if type(v) is not list or len(v) != 2:
                break
            h, size = v
            if type(h) is not str or len(h) != 64 or type(size) is not int or size < 0:
                break
            hashes.append(h)
        else:
            try:
                joined = "".join(hashes).encode("ascii")
            except UnicodeEncodeError:
                joined = None
            if joined is not None and not joined.translate(None, _HEX_BYTES):
                out: list[Digest] = []
                append = out.append
                new = object.__new__
                set_hash = _HASH_SLOT.__set__
                set_size = _SIZE_SLOT.__set__
                for h, size in values:
                    d = new(cls)
                    set_hash(d, h)
                    set_size(d, size)
                    append(d)
                return out
        return [cls.from_wire(v) for v in values]

    def __hash__(self) -> int:
        # The hash alone: sizes never differ for one SHA-256 in practice, and equality
        # still compares both. Cheaper than hashing a tuple, which find_missing does a lot.
        return hash(self.hash)

    def to_wire(self) -> list[Any]:
        return [self.hash, self.size]

    @property
    def is_empty(self) -> bool:
        return self.size == 0

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"


EMPTY = Digest.of(b"")
_HASH_SLOT = Digest.__dict__["hash"]
_SIZE_SLOT = Digest.__dict__["size"]


class Hasher:
    """Incremental SHA-256 plus a byte count, checked against an expected digest at the end."""

    __slots__ = ("_sha", "size")

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._sha.update(data)
        self.size += len(data)

    def update_all(self, chunks: list[bytes] | list[bytes | memoryview]) -> None:
        """Hash several chunks in one call (one worker-thread hop for a batch)."""
        for chunk in chunks:
            self.update(chunk)

    def digest(self) -> Digest:
        return Digest(self._sha.hexdigest(), self.size)

    def verify(self, expected: Digest) -> None:
        got = self.digest()
        if got != expected:
            raise DigestMismatch(
                f"bytes hash to {got}, not the digest they were sent as ({expected})",
                expected=str(expected),
                actual=str(got),
            )
