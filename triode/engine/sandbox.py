"""Isolation of actions: bubblewrap, a PID namespace per action, the store out of reach.

An action runs as ``bwrap --unshare-pid ... -- ARGV``. What it does not get to keep:

- **Processes.** The command runs in a PID namespace of its own. When it exits, the
  namespace's init (bwrap's) exits and the kernel kills whatever is left in it: a
  ``setsid`` daemon with its descriptors closed, a double fork, anything. If the
  node stops the run (timeout, cancellation), it kills the wrapper's group, and the
  namespace goes with it. See :mod:`triode.procgroup` for how the SIGTERM of the grace
  period still reaches the command first. bwrap's init would wait for every daemon the
  command left, so when bwrap exits the runner SIGKILLs the init (see
  :mod:`triode.engine.runner`). Not ``--die-with-parent``, which did that too: the kernel
  ties it to the *thread* that started bwrap, one of trio's cached threads, which exits
  after ten idle seconds and took every longer action with it. A node that is killed
  leaves its sandboxes to the next node that opens its data dir (see
  :mod:`triode.engine.workdir`).
- **The store.** The node's data dir (and the work dirs' base) is bound read-only, and
  only the action's own work dir is writable. A node running as root runs the action
  as root without any capability (``--cap-drop ALL``, no new privileges), and gives
  each hard-linked input to ``nobody`` before the action sees it: a process without
  capabilities that does not own a read-only file can neither write to it nor
  ``chmod`` it, so a linked input cannot change the stored blob. A node that is not
  root cannot give its files to anyone: its actions run as its own uid (in a user
  namespace), which owns the store, so their inputs are copied, never linked.

The rest of the action's view is the node's: the same file system (``--dev-bind / /``),
a ``/proc`` of its own namespace, its cwd, its environment, and the network unless
``network="none"``. bubblewrap always sets ``PWD`` to the working directory, as a shell
does; it is left there (taking it out costs one more exec, 0.7 ms an action here, and
hides nothing: ``getcwd`` says the same). An action whose own ``env`` names ``PWD`` gets
its value back, through ``env`` (or ``sh``).

:func:`probe` tries the sandbox once, when a node starts: under ``"auto"`` a sandbox that
does not work gives an unisolated one *with the reason*, which the node prints at
start-up and shows in its status; under ``"bwrap"`` it is an error.
"""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FailedPrecondition
from .runner import run_process

__all__ = ["ISOLATION", "NETWORK", "Sandbox", "UNISOLATED", "probe", "find_bwrap"]

#: ``isolation`` settings: bwrap when it works (else none, with a warning), bwrap or fail, none.
ISOLATION = ("auto", "bwrap", "none")
#: ``action_network`` settings: the node's network, or none (a network namespace of its own).
NETWORK = ("host", "none")
#: Seconds the start-up probe may take.
PROBE_TIMEOUT = 10.0
#: Where bwrap is looked for when no path is given and it is not on the PATH (Debian's).
DEFAULT_BWRAP = "/usr/bin/bwrap"
#: Where ``env`` and ``sh`` are looked for.
_SYSTEM_PATH = "/usr/bin:/bin"


@dataclass(frozen=True)
class Sandbox:
    """How this node runs its actions: ``mode`` "bwrap" (isolated) or "none", and why."""

    mode: str
    #: One line for people: what the sandbox gives, or why there is none.
    detail: str
    network: str = "host"
    bwrap: str | None = None
    #: ``(uid, gid)`` that hard-linked inputs are given to before an action sees them, on a
    #: root node whose actions run without capabilities; None: links would not be safe.
    input_owner: tuple[int, int] | None = None
    #: The argv before ``--bind WORK WORK -- ARGV`` (fixed when the node starts).
    prefix: tuple[str, ...] = ()
    #: ``env`` and ``sh``, which put an action's own PWD back over the one bwrap sets.
    env_tool: str | None = None
    shell: str | None = None

    @property
    def isolated(self) -> bool:
        return self.mode == "bwrap"

    def wrapper(
        self, work: Path, env: Mapping[str, str] | None = None, program: str = "", cwd: Path | None = None
    ) -> Callable[[int], list[str]] | None:
        """What runs ``program`` (argv[0]) with environment ``env`` in this sandbox, ``work``
        writable, for :func:`~triode.engine.runner.run_process` (None when unisolated):
        given the fd of the pipe bwrap reports its init's pid on, the argv the command follows."""
        if not self.prefix:
            return None
        w = os.fspath(work)
        head = self.prefix
        # --chdir always: without it bwrap 0.8 takes its working directory from $PWD, which a
        # client may set to anything (Bazel sends PWD=/proc/self/cwd), not from its own cwd.
        where = os.fspath(cwd if cwd is not None else work)
        tail = ("--bind", w, w, "--chdir", where, "--", *self._restore_env(env or {}, program))
        return lambda info: [*head, "--info-fd", str(info), *tail]

    def around(self, argv: Sequence[str], cwd: Path) -> list[str]:
        """``argv`` run in ``cwd`` in this sandbox, with nothing but what every action gets
        writable (for a long-lived helper such as a tool worker; ``argv`` itself when
        unisolated). bwrap passes the caller's open descriptors and environment through."""
        if not self.prefix:
            return list(argv)
        return [*self.prefix, "--chdir", os.fspath(cwd), "--", *argv]

    def _restore_env(self, env: Mapping[str, str], program: str) -> list[str]:
        """The argv that puts the action's own PWD back over bwrap's (nothing when it has none)."""
        if "PWD" not in env:
            return []
        if self.env_tool is not None and "=" not in program:  # env would take it for NAME=VALUE
            return [self.env_tool, "--", f"PWD={env['PWD']}"]
        if self.shell is not None:
            return [self.shell, "-c", 'export PWD="$1"; shift; exec "$@"', "sh", env["PWD"]]
        return []

    def info(self) -> dict[str, Any]:
        return {
            "isolation": self.mode,
            "isolated": self.isolated,
            "isolation_detail": self.detail,
            "action_network": self.network if self.isolated else "host",
        }


#: No sandbox: actions run as the node's children in a process group (``isolation="none"``).
UNISOLATED = Sandbox("none", "isolation off (--isolation none): a process that leaves its action's "
                             "process group can outlive it, and inputs are copied")


def find_bwrap(path: str | None = None) -> str | None:
    """The bwrap to use: ``path`` as given, else ``bwrap`` on the PATH, else Debian's (or None)."""
    if path is not None:
        return path if "/" in path else shutil.which(path) or path
    found = shutil.which("bwrap")
    if found is not None:
        return found
    return DEFAULT_BWRAP if os.path.exists(DEFAULT_BWRAP) else None


def _outermost(paths: Iterable[Path]) -> list[str]:
    """The given directories, without those inside another one of them."""
    resolved = sorted({os.path.realpath(p) for p in paths})
    out: list[str] = []
    for p in resolved:
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _nobody() -> tuple[int, int]:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return 65534, 65534
    return entry.pw_uid, entry.pw_gid


def bwrap_prefix(bwrap: str, *, root: bool, network: str, protect: Sequence[Path]) -> list[str]:
    """The bwrap options every action gets (the work dir's bind and the command follow)."""
    argv = [bwrap, "--unshare-pid"]  # not --die-with-parent: see the module docstring
    if not root:
        argv.append("--unshare-user")  # what lets a user that is not root make the namespaces
    if network == "none":
        argv.append("--unshare-net")
    argv += ["--cap-drop", "ALL", "--dev-bind", "/", "/", "--proc", "/proc"]
    for path in _outermost(protect):
        argv += ["--ro-bind", path, path]
    return argv


async def probe(
    setting: str,
    *,
    bwrap: str | None = None,
    network: str = "host",
    protect: Sequence[Path] = (),
    scratch: Path,
) -> Sandbox:
    """Work out how actions will run: try bwrap once (under ``scratch``, an existing dir
    that stands in for a work dir) unless ``setting`` is "none".

    ``protect``: directories actions must not write to (the data dir, the work dirs' base).
    Under "auto" a bwrap that does not work gives an unisolated sandbox that says why;
    under "bwrap" it raises :class:`FailedPrecondition`.
    """
    if setting not in ISOLATION:
        raise ValueError(f"isolation must be one of {', '.join(ISOLATION)}, got {setting!r}")
    if network not in NETWORK:
        raise ValueError(f"action_network must be one of {', '.join(NETWORK)}, got {network!r}")
    if setting == "none":
        return UNISOLATED
    path = find_bwrap(bwrap)
    root = os.geteuid() == 0
    if path is None:
        return _unavailable(setting, "bwrap is not installed (apt-get install bubblewrap, or give its "
                                     "path with --bwrap)")
    if not os.access(path, os.X_OK):
        return _unavailable(setting, f"there is no bwrap to run at {path}")
    prefix = bwrap_prefix(path, root=root, network=network, protect=protect)
    run = await run_process(
        [path, "--version"], wrapper=Sandbox("bwrap", "", prefix=tuple(prefix)).wrapper(scratch), cwd=scratch,
        timeout=PROBE_TIMEOUT, grace=0.5, output_cap=64 * 1024,
    )
    out = run.stdout.data().decode(errors="replace").strip()
    if run.exit_code != 0 or not out.startswith("bubblewrap"):
        said = run.stderr.data().decode(errors="replace").strip() or out
        first = said.splitlines()[0] if said else f"exit status {run.exit_code}"
        return _unavailable(setting, f"{path} does not work here: {first}")
    protected = ", ".join(_outermost(protect)) or "nothing"
    detail = (
        f"{out}: a PID namespace per action (nothing it starts outlives it), "
        f"{'no capabilities' if root else 'the node uid in a user namespace'}, {protected} read-only, "
        + ("linked inputs owned by nobody" if root else "inputs copied (this uid owns the store)")
        + (", no network" if network == "none" else "")
    )
    return Sandbox(
        "bwrap", detail, network, path, _nobody() if root else None, tuple(prefix),
        shutil.which("env", path=_SYSTEM_PATH), shutil.which("sh", path=_SYSTEM_PATH),
    )


def _unavailable(setting: str, problem: str) -> Sandbox:
    if setting == "bwrap":
        raise FailedPrecondition(f"actions cannot be isolated (--isolation bwrap): {problem}")
    return Sandbox("none", f"NOT ISOLATED: {problem}; a process that leaves its action's process group "
                           "can outlive it, and inputs are copied")
