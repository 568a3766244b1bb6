"""What the scheduler is asked to run, and what it needs from whoever runs it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..model.digest import Digest
from ..model.result import ExecuteOutcome, ExecuteRequest

__all__ = ["Job", "Executor", "Placement", "NotAccepted", "PeerLost"]


@dataclass(frozen=True, eq=False)
class Job:
    """One submission: an action plus how to treat it.

    ``key`` is the action digest (``HASH/SIZE``): identical keys in flight share one
    execution unless ``dedup`` is off (an action marked do-not-cache).
    """

    key: str
    #: The action as the executor takes it (an engine ``Action``; anything for a fake).
    action: Any
    #: The action as sent on the wire, to forward it to a peer unchanged.
    wire: Any = None
    skip_cache: bool = False
    dedup: bool = True
    #: Blobs the action reads, pushed to a peer before it is forwarded there (default:
    #: the action's own ``input_digests()``, worked out only when it is forwarded).
    inputs: tuple[Digest, ...] | None = field(default=None)
    #: The node that forwarded this job here; such a job is never forwarded again (one hop).
    forwarded_from: str | None = None

    @classmethod
    def of(cls, request: ExecuteRequest, *, forwarded_from: str | None = None) -> Job:
        """The job an execute request asks for: keyed by the action digest, shared with
        identical actions in flight unless the action is ``do_not_cache``."""
        action = request.action
        return cls(
            key=str(action.digest()),
            action=action,
            wire=request.action_wire if request.action_wire is not None else action.to_wire(),
            skip_cache=request.skip_cache,
            dedup=not action.do_not_cache,
            forwarded_from=forwarded_from,
        )

    def input_digests(self) -> tuple[Digest, ...]:
        if self.inputs is not None:
            return self.inputs
        digests = getattr(self.action, "input_digests", None)
        return tuple(sorted(digests())) if digests is not None else ()


class Executor(Protocol):
    """Runs jobs on this node (the node's engine; a fake in tests)."""

    async def lookup(self, job: Job) -> ExecuteOutcome | None:
        """The cached outcome, or None: must not run anything or take a slot."""
        ...

    async def run(self, job: Job, *, queued: float = 0.0) -> ExecuteOutcome:
        """Run it now, in the calling task; cancelling the caller kills the process group.

        ``queued`` is the seconds the job waited for its slot (for the result's timings).
        """
        ...


class NotAccepted(Exception):
    """The peer never took the job (full, unreachable, shutting down): place it again."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer} did not accept: {reason}")
        self.peer = peer
        self.reason = reason


class PeerLost(Exception):
    """The peer took the job and then vanished: it may be retried elsewhere."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer} was lost while executing: {reason}")
        self.peer = peer
        self.reason = reason


class Placement(Protocol):
    """Where a job goes when no local slot is free: the cluster, or nothing."""

    def pick(self, job: Job) -> str | None:
        """A peer with free capacity (and reserve one of its slots), or None."""
        ...

    def spare(self) -> int:
        """Free slots on peers, as far as we know (admission does not queue what they can take)."""
        ...

    async def forward(self, peer: str, job: Job, accepted: Callable[[str], None]) -> ExecuteOutcome:
        """Run the job on ``peer``; call ``accepted(remote_name)`` once it took it. Returns
        the peer's outcome, checked, once every blob it refers to can be read here.

        Releases the slot :meth:`pick` reserved, however it ends. Raises
        :class:`NotAccepted` or :class:`PeerLost`, or the job's own TriodeError.
        """
        ...


AcceptedCallback = Callable[[str], None]
