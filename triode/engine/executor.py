"""Executing an action: cache lookup, staging, the run, output collection, the cache entry.

:class:`Executor` runs one action in the calling task (no queue of its own: admission
is the scheduler's job, which calls :meth:`Executor.lookup` at admission and
:meth:`Executor.run_action` once the action has a slot). Every execution gets a fresh
work dir that is removed however it ends, its inputs are leased in the local store while
it needs them, and the result goes to the action cache only when it is worth reusing:
exit code 0, not timed out, cacheable, and no input was altered through a hard link.
Results are :class:`~triode.model.result.ActionResult` values, built here and trusted
as built (the cache does not check their shape again).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import trio

from ..errors import OutputTooLarge, TriodeError
from ..model.action import Action
from ..model.digest import Digest
from ..model.result import (
    EMPTY_CAPTURE,
    ActionResult,
    CapturedStream,
    ExecuteOutcome,
    OutputDirectory,
    OutputFile,
    OutputSymlink,
    Timings,
)
from .outputs import scan_outputs
from .runner import DEFAULT_GRACE, DEFAULT_OUTPUT_CAP, Capture, run_process
from .sandbox import ISOLATION, NETWORK, UNISOLATED, Sandbox, probe
from .staging import INLINE_FILES, link_policy, maybe_in_thread, stage_inputs, tampered
from .workdir import WorkDirs, scratch_of

__all__ = ["Executor", "EngineConfig"]

log = logging.getLogger("triode.engine")

#: Results queued for the action cache behind their answers (and the most written at once).
WRITE_BEHIND = 64
#: Seconds the first result of a batch waits for others to join it (see write_behind). The
#: results are served from memory meanwhile, so only the batch size depends on it: at 5 ms
#: a stream of short actions wrote about 4 per hop, at 20 ms 15, and cost 7% less CPU each.
BATCH_WINDOW = 0.02
#: The largest result an execution may return (it must fit a frame and an action cache entry).
MAX_RESULT_BYTES = 4 * 1024 * 1024
#: Results with at most this many outputs are under MAX_RESULT_BYTES whatever their paths.
FEW_OUTPUTS = 256
#: Small action results kept in memory for repeat lookups, and what "small" means.
RECENT_RESULTS = 4096
RECENT_MAX_OUTPUTS = 64


@dataclass(frozen=True)
class EngineConfig:
    #: Seconds between SIGTERM and SIGKILL when an action times out or is cancelled.
    grace: float = DEFAULT_GRACE
    #: Bytes of stdout, and of stderr, kept per action.
    output_cap: int = DEFAULT_OUTPUT_CAP
    #: Kill an action whose stdout or stderr passes the cap (else: keep reading, drop the rest).
    kill_on_cap: bool = False
    #: Hard-link inputs from the disk CAS: "auto" (where the sandbox makes it safe, see
    #: staging.link_policy), "always" or "never" (copy).
    link_inputs: str = "auto"
    #: How actions are isolated (see sandbox.py): "auto" (bwrap when it works, else none, and
    #: :meth:`Executor.info` says why), "bwrap" (or refuse to start) or "none".
    isolation: str = "auto"
    #: An isolated action's network: "host" (the node's) or "none" (a namespace of its own).
    action_network: str = "host"
    #: The bwrap to run (None: ``bwrap`` on the PATH, else /usr/bin/bwrap).
    bwrap: str | None = None

    def __post_init__(self) -> None:
        if self.isolation not in ISOLATION:
            raise ValueError(f"isolation must be one of {', '.join(ISOLATION)}, got {self.isolation!r}")
        if self.action_network not in NETWORK:
            raise ValueError(
                f"action_network must be one of {', '.join(NETWORK)}, got {self.action_network!r}"
            )


class Executor:
    """Runs actions against a CAS and an action cache, in work dirs from ``workdirs``."""

    def __init__(
        self, cas: Any, ac: Any, workdirs: WorkDirs, *, node_id: str, config: EngineConfig | None = None
    ) -> None:
        self.cas = cas
        self.ac = ac
        self.workdirs = workdirs
        self.node_id = node_id
        self.config = config or EngineConfig()
        #: How actions run; None until :meth:`prepare` has probed the sandbox.
        self.sandbox: Sandbox | None = None
        self._link: bool = False
        self._give_to: tuple[int, int] | None = None
        self._preparing: trio.Event | None = None
        if self.config.isolation == "none":
            self._use(UNISOLATED)
        #: Results on their way to the action cache (see write_behind).
        self._pending: dict[Digest, ActionResult] = {}
        #: Recently written or read small results, most recent last, with the blobs each
        #: references (worked out once, not at every hit; see lookup).
        self._recent: OrderedDict[Digest, tuple[ActionResult, list[Digest]]] = OrderedDict()
        self._writes: trio.MemorySendChannel[tuple[Digest, ActionResult]] | None = None
        self.counters = {
            "executed": 0, "cache_hits": 0, "cache_writes": 0, "failed": 0, "timed_out": 0,
            "cancelled": 0, "errors": 0, "running": 0, "inputs_linked": 0, "inputs_copied": 0,
            "inputs_fetched": 0, "inputs_altered": 0,
        }

    def _use(self, sandbox: Sandbox) -> None:
        self._link, self._give_to = link_policy(self.config.link_inputs, sandbox)
        self.sandbox = sandbox

    async def prepare(self) -> Sandbox:
        """Work out how actions will run (once; the first run does it when nobody has):
        probe bwrap unless isolation is "none". Under "bwrap" a sandbox that does not work
        is :class:`~triode.errors.FailedPrecondition`."""
        while self.sandbox is None:
            if self._preparing is not None:
                await self._preparing.wait()
                continue
            self._preparing = done = trio.Event()
            try:
                # What actions must not write to: the store's data dir and the work dirs' base.
                protect = [Path(self.cas.root)] if isinstance(getattr(self.cas, "root", None), Path) else []
                protect.append(self.workdirs.base)
                sandbox = await probe(
                    self.config.isolation, bwrap=self.config.bwrap, network=self.config.action_network,
                    protect=protect, scratch=self.workdirs.base,
                )
                if sandbox.input_owner is not None:
                    # Linked inputs are nobody's: keep nobody's processes away from their paths.
                    os.chmod(self.workdirs.base, 0o700)
                self._use(sandbox)
            finally:
                self._preparing = None
                done.set()
        sandbox = self.sandbox
        assert sandbox is not None
        return sandbox

    async def lookup(self, action: Action) -> ExecuteOutcome | None:
        """The cached outcome of ``action``, or None; never runs anything.

        Sees results still on their way to the action cache (see :meth:`write_behind`).
        An action marked ``do_not_cache`` is never a hit.
        """
        if action.do_not_cache:
            return None
        digest = action.digest()
        hit = self._pending.get(digest)
        if hit is None:
            recent = self._recent.get(digest)
            if recent is not None:
                if await self.cas.find_missing(recent[1]):
                    self._recent.pop(digest, None)  # a blob it names is gone: ask the cache proper
                else:
                    hit = recent[0]
                    self._recent.move_to_end(digest)
        if hit is None:
            hit = await self.ac.get(digest)
            if hit is None:
                return None
            self._remember(digest, hit)
        self.counters["cache_hits"] += 1
        return ExecuteOutcome(digest, True, hit)

    def pending_result(self, digest: Digest) -> ActionResult | None:
        """The result of ``digest`` answered but not yet in the action cache (see
        write_behind), or None: what the node's ac.get serves until the write lands."""
        return self._pending.get(digest)

    def _remember(self, digest: Digest, result: ActionResult) -> None:
        """Keep a small result in memory: a repeat is then answered without reading a file."""
        if result.output_count > RECENT_MAX_OUTPUTS:
            return
        self._recent[digest] = (result, result.blobs())
        self._recent.move_to_end(digest)
        while len(self._recent) > RECENT_RESULTS:
            self._recent.popitem(last=False)

    async def run_action(self, action: Action, *, queued: float = 0.0) -> ExecuteOutcome:
        """Run ``action`` now, in the calling task, and return its result (never a cache hit).

        ``queued`` is the seconds the caller (the scheduler) held the action before this.
        Cancelling the caller stops the action's process group.
        """
        digest = action.digest()
        self.counters["running"] += 1
        try:
            if self.sandbox is None:
                await self.prepare()
            result = await self._run(action, digest, queued)
        except BaseException as exc:
            self._count_failure(exc)
            raise
        finally:
            self.counters["running"] -= 1
        return ExecuteOutcome(digest, False, result)

    async def lookup_or_run(self, action: Action, *, skip_cache: bool = False) -> ExecuteOutcome:
        """:meth:`lookup`, unless ``skip_cache``; on a miss :meth:`run_action`. Unqueued:
        the node's ``engine.execute``, and whoever embeds an executor without a scheduler."""
        if not skip_cache:
            try:
                hit = await self.lookup(action)
            except BaseException as exc:
                self._count_failure(exc)
                raise
            if hit is not None:
                return hit
        return await self.run_action(action)

    def _count_failure(self, exc: BaseException) -> None:
        self.counters["cancelled" if _only_cancelled(exc) else "errors"] += 1

    async def _run(self, action: Action, digest: Digest, queued: float) -> ActionResult:
        started = trio.current_time()
        # Leased from staging to the end of the run: an input in use is never evicted.
        with self.cas.lease(action.input_digests()):
            async with self.workdirs.create() as root:
                staged = await stage_inputs(root, action, self.cas, link=self._link, give_to=self._give_to)
                self.counters["inputs_linked"] += staged.linked
                self.counters["inputs_copied"] += staged.copied
                self.counters["inputs_fetched"] += staged.fetched
                staged_at = trio.current_time()
                assert self.sandbox is not None
                cwd = root / action.cwd if action.cwd else root
                run = await run_process(
                    action.argv,
                    wrapper=self.sandbox.wrapper(root, action.env, action.argv[0], cwd=cwd),
                    env=action.env,
                    cwd=cwd,
                    timeout=action.timeout,
                    grace=self.config.grace,
                    output_cap=self.config.output_cap,
                    kill_on_cap=self.config.kill_on_cap,
                    spill_dir=scratch_of(root),
                )
                ran_at = trio.current_time()
                stdout = await self._store_capture(run.stdout)
                stderr = await self._store_capture(run.stderr)
                # Any output may be a large tree: walk in a thread unless there is none.
                found = await maybe_in_thread(bool(action.outputs), scan_outputs, root, action.outputs)
                files = []
                for rel, path, executable in found.files:
                    files.append(OutputFile(rel, await self.cas.put_file(path), executable))
                altered = await maybe_in_thread(len(staged.links) > INLINE_FILES, tampered, staged)
                for linked, blob, inode in altered:
                    log.error(
                        "action %s altered the hard-linked input %s (blob %s) in place: the stored blob "
                        "is dropped and the result not cached",
                        digest, linked[len(str(root)) + 1 :], blob,
                    )
                    self.counters["inputs_altered"] += 1
                    self.cas.drop_damaged(blob, inode)  # only a disk store hands out files to link
                uploaded_at = trio.current_time()
        result = ActionResult(
            run.exit_code,
            run.signal,
            run.timed_out,
            stdout,
            stderr,
            tuple(files),
            tuple([OutputSymlink(link["path"], link["target"]) for link in found.symlinks]),
            tuple([OutputDirectory(d["path"]) for d in found.directories]),
            tuple(found.missing),
            Timings(float(queued), staged_at - started, ran_at - staged_at, uploaded_at - ran_at),
            self.node_id,
            time.time(),
        )
        # Each output takes at most two paths of 4 KiB (a path and a symlink's target): a
        # result with few outputs cannot pass the limit, and need not be encoded to know it.
        size = len(msgpack.packb(result.to_wire(), use_bin_type=True)) if found.count() > FEW_OUTPUTS else 0
        if size > MAX_RESULT_BYTES:
            raise OutputTooLarge(
                f"the action's result is {size} bytes encoded (over {MAX_RESULT_BYTES}): it lists "
                f"{found.count()} outputs; collect fewer paths or archive them into one file",
                size=size, limit=MAX_RESULT_BYTES,
            )
        self.counters["executed"] += 1
        if run.timed_out:
            self.counters["timed_out"] += 1
        if run.exit_code != 0:
            self.counters["failed"] += 1
        if run.exit_code == 0 and not run.timed_out and not action.do_not_cache and not altered:
            await self._cache(digest, result)
        return result

    async def _cache(self, digest: Digest, result: ActionResult) -> None:
        """Write the result to the action cache: behind the answer when a writer runs, else now."""
        if self._writes is not None:
            self._pending[digest] = result
            try:
                self._writes.send_nowait((digest, result))
                return
            except trio.WouldBlock:  # the writer is behind: this caller waits for its own write
                pass
            except trio.ClosedResourceError:
                pass
        try:
            await self.ac.update(digest, result)
        except (TriodeError, OSError) as exc:  # the run's answer stands; it is just not cached
            log.warning("could not cache the result of action %s: %s", digest, exc)
            return
        finally:
            self._pending.pop(digest, None)
        self.counters["cache_writes"] += 1
        self._remember(digest, result)

    async def write_behind(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write action results to the cache after their callers have their answer.

        The cache write (an fsynced file) is the slowest step of a short action; doing it
        here frees the caller and its executor slot sooner. Until it is written the result
        is served from memory, so a repeat of the action is a hit all the same. Results
        are written in batches, one thread hop each: the first result waits up to
        :data:`BATCH_WINDOW` seconds for others to join it. At most :data:`WRITE_BEHIND`
        wait; past that a caller writes its own. Run it in the engine's nursery;
        :meth:`close_writes` makes it finish the queue and return.
        """
        send, receive = trio.open_memory_channel[tuple[Digest, ActionResult]](WRITE_BEHIND)
        self._writes = send
        task_status.started()
        async with receive:
            async for first in receive:
                batch = [first]
                with trio.move_on_after(BATCH_WINDOW):
                    while len(batch) < WRITE_BEHIND:
                        try:
                            batch.append(await receive.receive())
                        except trio.EndOfChannel:  # closing: write what we have now
                            break
                await self._write_batch(batch)

    async def _write_batch(self, batch: list[tuple[Digest, ActionResult]]) -> None:
        try:
            errors: list[Any] = await self.ac.update_many(batch)
        except (TriodeError, OSError) as exc:
            errors = [exc] * len(batch)
        for (digest, result), error in zip(batch, errors, strict=True):
            if error is None:
                self.counters["cache_writes"] += 1
                self._remember(digest, result)
            else:
                log.warning("could not cache the result of action %s: %s", digest, error)
            if self._pending.get(digest) is result:
                del self._pending[digest]

    def close_writes(self) -> None:
        """Let :meth:`write_behind` finish what is queued and return."""
        if self._writes is not None:
            self._writes.close()

    async def _store_capture(self, capture: Capture) -> CapturedStream:
        if not capture.total:  # the usual stderr, and stdout too for many commands
            await trio.lowlevel.checkpoint_if_cancelled()  # (no yield: see maybe_in_thread)
            return EMPTY_CAPTURE
        if capture.spilled:
            assert capture.spill_path is not None
            blob = await self.cas.put_file(capture.spill_path)
        else:
            blob = await self.cas.put(capture.data())
        return CapturedStream(blob, capture.truncated)

    def info(self) -> dict[str, Any]:
        return {
            **self.counters,
            "work_dirs": self.workdirs.count(),
            "cache_writes_pending": len(self._pending),
            "grace": self.config.grace,
            "output_cap": self.config.output_cap,
            "link_inputs": self._link,
            **(self.sandbox.info() if self.sandbox is not None else {
                "isolation": "undecided", "isolated": False, "action_network": self.config.action_network,
                "isolation_detail": f"isolation {self.config.isolation}: decided when the first action runs",
            }),
        }


def _only_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is trio's Cancelled, alone or as the only thing in a (nested) group."""
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        return rest is None
    return isinstance(exc, trio.Cancelled)
