"""The benchmark harness: named workloads, repetitions, baselines, ratios, targets, JSON.

Shared machines are noisy, so no figure is reported alone: each :meth:`Bench.compare`
measures a *subject* (Triode) and a *baseline* doing the same work in the same run,
alternating their repetitions so drift hits both, and reports the ratio of their medians.

Writing a workload (a module in ``benchmarks/workloads/``; every module there is imported)::

    from ..harness import Bench, at_least, at_most, workload

    @workload("area.what", help="one line for `triode bench --list`")
    def what(b: Bench) -> None:          # b.quick: smaller sizes; b.tmpdir: scratch space
        b.compare(
            "figure", "calls/s",                    # what is measured, in which unit
            subject=lambda: ...,                    # one repetition of Triode's side -> a float
            baseline=("label", lambda: ...),        # the same work, the plainest way -> a float
            better="higher",                        # or "lower" (seconds, latencies)
            target=at_least(15_000, "calls/s"),     # optional, see below
            note="how it is set up",                # optional, printed under the table
        )

Targets are declared by the workloads, per figure, and judged by the harness; a figure
without one prints no verdict. Every verdict is on medians, and reaching the bar exactly
counts as met:

* ``at_least(0.5)`` / ``at_most(0.1)``: a *ratio* target, on the ratio of the medians
  (subject / baseline).
* ``at_least(15_000, "calls/s")`` / ``at_most(50, "us")``: an *absolute* target, on the
  subject's median; the unit must be the figure's own unit.
* ``target=0.5`` (a bare number, the older form, still accepted): a ratio target in the
  direction of ``better``: at least 0.5x when higher is better, at most when lower is.

A target's direction must agree with ``better`` (``at_least`` with "higher"), or
:meth:`Bench.compare` raises. The verdict is printed in the table (``>= 0.5x met`` or
``MISSED``), in ``FILE.md`` (``&ge; 0.5x met`` or ``**missed**``) and in the JSON (each
figure's ``"target"``, with its ``"text"``, and ``"met"``: true, false or null).

Percentiles: :func:`percentile` is the one method (nearest rank: the ``ceil(p/100 * n)``-th
smallest of ``n`` samples). :meth:`Bench.compare_percentiles` takes a list of samples per
repetition from each side, requires the same count from both, and records one figure per
percentile (e.g. p50 and p99 of the same samples).

``scripts/bench-readme FILE.json`` prints ``FILE.md`` again from the JSON alone
(:func:`render_document`), for pasting a run into README.md.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import pkgutil
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import trio

__all__ = [
    "workload",
    "at_least",
    "at_most",
    "percentile",
    "Bench",
    "Figure",
    "Target",
    "WORKLOADS",
    "discover",
    "machine_line",
    "render_document",
    "render_markdown",
    "render_table",
    "run_concurrently",
    "run_workloads",
]

REPEAT = 5
T = TypeVar("T")
Better = Literal["higher", "lower"]


@dataclass
class Workload:
    name: str
    fn: Callable[[Bench], None]
    help: str


WORKLOADS: dict[str, Workload] = {}


def workload(name: str, *, help: str = "") -> Callable[[Callable[[Bench], None]], Callable[[Bench], None]]:
    """Register a benchmark workload under ``name`` (``area.what``)."""

    def register(fn: Callable[[Bench], None]) -> Callable[[Bench], None]:
        if name in WORKLOADS:
            raise ValueError(f"workload {name!r} is defined twice")
        WORKLOADS[name] = Workload(name, fn, help or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return register


def discover() -> dict[str, Workload]:
    """Import every module of ``benchmarks.workloads`` so their workloads register."""
    from . import workloads

    for info in pkgutil.iter_modules(workloads.__path__):
        importlib.import_module(f"{workloads.__name__}.{info.name}")
    return WORKLOADS


# -- targets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A bar a figure should reach: on the ratio (``unit`` None) or on the subject's median."""

    value: float
    better: Better
    unit: str | None = None

    @property
    def kind(self) -> Literal["ratio", "absolute"]:
        return "ratio" if self.unit is None else "absolute"

    def met(self, *, ratio: float, subject: float) -> bool:
        """Whether the bar is reached (exactly reaching it counts) by this ratio or subject median."""
        value = ratio if self.unit is None else subject
        return value >= self.value if self.better == "higher" else value <= self.value

    def text(self, *, markdown: bool = False) -> str:
        """``>= 0.5x``, ``>= 15,000 calls/s``, ``<= 50 us`` (``&ge;``/``&le;`` in Markdown)."""
        if markdown:
            sign = "&ge;" if self.better == "higher" else "&le;"
        else:
            sign = ">=" if self.better == "higher" else "<="
        if self.unit is None:
            return f"{sign} {self.value:.3g}x"
        return f"{sign} {_number(self.value)} {self.unit}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "better": self.better, "unit": self.unit,
                "text": self.text()}

    @classmethod
    def from_json(cls, data: Any, better: Better) -> Target | None:
        """A target as :meth:`to_json` wrote it; a bare number (older files) is a ratio target."""
        if data is None:
            return None
        if isinstance(data, int | float):
            return cls(float(data), better)
        return cls(float(data["value"]), data["better"], data.get("unit"))


def at_least(value: float, unit: str | None = None) -> Target:
    """Higher is better: the ratio (no ``unit``) or the subject's median in ``unit`` is at least ``value``."""
    return Target(float(value), "higher", unit)


def at_most(value: float, unit: str | None = None) -> Target:
    """Lower is better: the ratio (no ``unit``) or the subject's median in ``unit`` is at most ``value``."""
    return Target(float(value), "lower", unit)


def _as_target(target: Target | float | None, unit: str, better: Better, figure: str) -> Target | None:
    if target is None:
        return None
    if not isinstance(target, Target):
        return Target(float(target), better)
    if target.better != better:
        raise ValueError(f"{figure}: target {target.text()} goes against better={better!r}")
    if target.unit is not None and target.unit != unit:
        raise ValueError(f"{figure}: target {target.text()} is not in the figure's unit {unit!r}")
    return target


def percentile(samples: Sequence[float], p: float) -> float:
    """The ``p``-th percentile by nearest rank: the ``ceil(p/100 * n)``-th smallest of ``n`` samples.

    Always one of the samples; p50 is the lower median, and p99 of 200 samples is the third
    largest. Compare percentiles only across equal sample counts.
    """
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {p}")
    ordered = sorted(samples)
    rank = math.ceil(round(p * len(ordered) / 100, 9))
    return ordered[max(rank, 1) - 1]


# -- figures -----------------------------------------------------------------------------


@dataclass
class Stats:
    median: float
    min: float
    max: float
    samples: list[float]

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        return cls(statistics.median(samples), min(samples), max(samples), list(samples))


@dataclass
class Figure:
    workload: str
    figure: str
    unit: str
    subject: Stats
    baseline_label: str
    baseline: Stats
    better: Better
    ratio: float
    target: Target | None
    met: bool | None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = None if self.target is None else self.target.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Figure:
        target = Target.from_json(data.get("target"), data["better"])
        fig = cls(
            data["workload"], data["figure"], data["unit"], Stats(**data["subject"]),
            data["baseline_label"], Stats(**data["baseline"]), data["better"], data["ratio"],
            target, data.get("met"), data.get("note", ""),
        )
        if fig.met is None and target is not None:
            fig.met = target.met(ratio=fig.ratio, subject=fig.subject.median)
        return fig


async def run_concurrently(
    items: Iterable[T], concurrency: int, fn: Callable[[T], Awaitable[object]]
) -> float:
    """Await ``fn(item)`` for every item, ``concurrency`` at a time; return the seconds it took."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:
            await fn(item)

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return time.perf_counter() - start


def machine_line() -> str:
    """What the figures were measured on, for the README and the issue notes."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    return (
        f"{platform.machine()}, {os.cpu_count()} cores ({cpu}){mem}, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def _code_version() -> str | None:
    """The checkout's commit (``abc1234``, ``+`` when tracked files differ from it); None outside git.

    Read-only: ``GIT_OPTIONAL_LOCKS=0`` keeps git from refreshing the index.
    """
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    where = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=where, env=env,
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=where, env=env,
                               capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ("+" if dirty.returncode == 1 else "")


@dataclass
class Bench:
    """What a workload gets: settings, a scratch dir, helpers, and :meth:`compare`."""

    quick: bool = False
    repeat: int = REPEAT
    tmpdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="triode-bench-")))
    figures: list[Figure] = field(default_factory=list)
    current: str = ""
    progress: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)

    def compare(
        self,
        figure: str,
        unit: str,
        *,
        subject: Callable[[], float],
        baseline: tuple[str, Callable[[], float]],
        better: Better = "higher",
        target: Target | float | None = None,
        note: str = "",
    ) -> Figure:
        """Measure ``subject`` and ``baseline`` ``repeat`` times each, alternating; record the ratio.

        Each callable does one repetition and returns its value in ``unit``. The ratio is
        subject/baseline of the medians. ``target`` (see the module's doc) is judged here.
        """
        label, base_fn = baseline
        checked = _as_target(target, unit, better, figure)
        subj, base = self._alternate(figure, label, lambda: [subject()], lambda: [base_fn()])
        return self._record(figure, unit, [s[0] for s in subj], label, [b[0] for b in base],
                            better, checked, note)

    def compare_percentiles(
        self,
        figure: str,
        unit: str,
        *,
        samples: int,
        subject: Callable[[], Sequence[float]],
        baseline: tuple[str, Callable[[], Sequence[float]]],
        percentiles: Sequence[float] = (50, 99),
        better: Better = "lower",
        target: Target | float | None = None,
        note: str = "",
    ) -> list[Figure]:
        """Like :meth:`compare`, for percentiles: one figure per percentile, from the same samples.

        Each callable does one repetition and returns exactly ``samples`` values (the same
        count on both sides, so their percentiles compare). ``figure`` and the baseline's
        label may hold ``{p}``, replaced by ``p50``, ``p99``...; ``target`` applies to each.
        """
        label, base_fn = baseline
        names = [figure.format(p=f"p{p:g}") for p in percentiles]
        checked = [_as_target(target, unit, better, name) for name in names]

        def taking(side: str, fn: Callable[[], Sequence[float]]) -> Callable[[], list[float]]:
            def one() -> list[float]:
                values = [float(v) for v in fn()]
                if len(values) != samples:
                    raise ValueError(f"{figure}: the {side} gave {len(values)} samples, not {samples}")
                return [percentile(values, p) for p in percentiles]
            return one

        subj, base = self._alternate(figure.format(p="percentiles"), label.format(p="samples"),
                                     taking("subject", subject), taking("baseline", base_fn))
        method = f"nearest-rank percentiles of {samples} samples per repetition on each side"
        return [
            self._record(name, unit, [s[i] for s in subj], label.format(p=f"p{p:g}"), [b[i] for b in base],
                         better, checked[i], f"{note}; {method}" if note else method)
            for i, (name, p) in enumerate(zip(names, percentiles, strict=True))
        ]

    def _alternate(
        self, figure: str, label: str, subject: Callable[[], list[float]], baseline: Callable[[], list[float]]
    ) -> tuple[list[list[float]], list[list[float]]]:
        """``repeat`` repetitions of each side, baseline first, alternating."""
        subj: list[list[float]] = []
        base: list[list[float]] = []
        for i in range(self.repeat):
            self.progress(f"  {self.current}: {figure} [{i + 1}/{self.repeat}] baseline ({label})")
            base.append(baseline())
            self.progress(f"  {self.current}: {figure} [{i + 1}/{self.repeat}] triode")
            subj.append(subject())
        return subj, base

    def _record(
        self, figure: str, unit: str, subj: list[float], label: str, base: list[float],
        better: Better, target: Target | None, note: str,
    ) -> Figure:
        s, b = Stats.of(subj), Stats.of(base)
        ratio = s.median / b.median if b.median else float("inf")
        met = None if target is None else target.met(ratio=ratio, subject=s.median)
        fig = Figure(self.current, figure, unit, s, label, b, better, ratio, target, met, note)
        self.figures.append(fig)
        self.progress(
            f"  {self.current}: {figure}: {_fmt(s.median)} {unit} vs {_fmt(b.median)} "
            f"({label}) = {_ratio(ratio)}" + ("" if target is None else f"; target {_verdict(fig)}")
        )
        return fig

    @contextlib.contextmanager
    def spawn_node(self, *args: str, ready_timeout: float = 30.0) -> Iterator[str]:
        """A ``triode node`` in its own process on loopback; yields its address.

        Stopped with SIGTERM (then SIGKILL) and waited for when the block ends.
        """
        data = Path(tempfile.mkdtemp(prefix="node-", dir=self.tmpdir))
        log_path = data / "node.log"
        argv = [sys.executable, "-m", "triode", "node", "--listen", "127.0.0.1:0", *args]
        if "--data" not in args:
            argv += ["--data", str(data / "data")]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + ready_timeout
            address = None
            while address is None:
                for line in log_path.read_text(errors="replace").splitlines():
                    if line.startswith("listening on "):
                        address = line.split()[-1]
                if address is None:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"node did not start: {log_path.read_text(errors='replace')[-2000:]}"
                        )
                    time.sleep(0.02)
            yield address
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(data, ignore_errors=True)


# -- rendering ---------------------------------------------------------------------------


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _number(x: float) -> str:
    """A bar as written: 15,000; 50; 0.25."""
    return f"{x:,.0f}" if x == int(x) else f"{x:,.3g}"


def _ratio(r: float) -> str:
    """2 decimals, but enough digits that a small ratio does not print as 0.00x."""
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _verdict(f: Figure, *, markdown: bool = False) -> str:
    """The target column: empty without a target, else the bar and met or missed."""
    if f.target is None:
        return ""
    if markdown:
        return f"{f.target.text(markdown=True)} {'met' if f.met else '**missed**'}"
    return f"{f.target.text()} {'met' if f.met else 'MISSED'}"


def _tally(figures: Sequence[Figure]) -> str:
    judged = [f for f in figures if f.target is not None]
    met = sum(1 for f in judged if f.met)
    return f"Targets: {met} met, {len(judged) - met} missed, of {len(judged)}."


def _cells(f: Figure) -> tuple[str, str, str, str]:
    return (
        f"{f.figure} [{f.unit}]",
        f"{_fmt(f.subject.median)} ({_fmt(f.subject.min)}-{_fmt(f.subject.max)})",
        f"{f.baseline_label}: {_fmt(f.baseline.median)} ({_fmt(f.baseline.min)}-{_fmt(f.baseline.max)})",
        _ratio(f.ratio),
    )


def render_table(figures: Sequence[Figure]) -> str:
    """The figures as the terminal shows them: aligned columns, then the tally and the notes."""
    header = ("workload", "figure", "triode median (min-max)", "baseline median (min-max)", "ratio", "target")
    rows = [header] + [(f.workload, *_cells(f), _verdict(f)) for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(_tally(figures))
    notes = [f"  {f.workload}: {f.figure}: {f.note}" for f in figures if f.note]
    if notes:
        lines += ["Notes:", *notes]
    return "\n".join(lines)


def render_markdown(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table, as the README shows them."""
    lines = [
        "| workload | figure | triode (median, min-max) | baseline (median, min-max) | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        lines.append("| " + " | ".join((f.workload, *_cells(f), _verdict(f, markdown=True))) + " |")
    return "\n".join(lines)


def render_document(doc: Mapping[str, Any]) -> str:
    """``FILE.md`` from the JSON document ``--json FILE`` writes: what the run was on, the table, the tally.

    The harness writes ``FILE.md`` with this very function, from the JSON it writes, so
    ``scripts/bench-readme FILE`` prints the same bytes.
    """
    figures = [Figure.from_json(f) for f in doc["figures"]]
    commit = doc.get("commit")
    run = (f"Measured {doc['date']}" + (f" on {commit}" if commit else "")
           + f", {doc['repeat']} repetitions of each side.")
    if doc.get("quick"):
        run += " **--quick sizes: a fast look, not figures to publish.**"
    lines = [f"Machine: {doc['machine']}.", run, "", render_markdown(figures), "", _tally(figures)]
    lines += [f"FAILED {failure}" for failure in doc.get("failures", [])]
    return "\n".join(lines) + "\n"


def render_svg(figures: Sequence[Figure]) -> str:
    """The ratios as bars on a log scale from 1x, each ratio target marked: a plot without a plotting library.

    A bar is red when its figure missed its target (ratio or absolute).
    """
    row, left, width = 26, 380, 460
    height = row * len(figures) + 56
    ticks = [f.target.value for f in figures if f.target is not None and f.target.kind == "ratio"]
    values = [f.ratio for f in figures if f.ratio > 0] + [t for t in ticks if t > 0] + [1.0]
    lo, hi = math.log10(min(values) / 2), math.log10(max(values) * 2)

    def x(ratio: float) -> float:
        return left + (math.log10(max(ratio, 1e-9)) - lo) / (hi - lo) * width

    def esc(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;")

    one = x(1.0)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" '
        'font-family="sans-serif" font-size="12">',
        '<rect width="100%" height="100%" fill="#fff"/>',
        '<text x="4" y="16" font-weight="bold">triode / baseline, median ratio (log scale; '
        "black tick = ratio target; red = target missed)</text>",
        f'<text x="4" y="32">{esc(machine_line())}</text>',
        f'<line x1="{one:.1f}" x2="{one:.1f}" y1="38" y2="{height}" stroke="#888" stroke-dasharray="3,3"/>',
    ]
    for i, f in enumerate(figures):
        y = 44 + i * row
        colour = "#4a8" if f.met in (True, None) else "#c44"
        end = x(f.ratio)
        out.append(f'<text x="4" y="{y + 14}">{esc(f"{f.workload}: {f.figure}"[:60])}</text>')
        out.append(
            f'<rect x="{min(one, end):.1f}" y="{y}" width="{max(abs(end - one), 1):.1f}" '
            f'height="18" fill="{colour}"/>'
        )
        out.append(f'<text x="{max(one, end) + 4:.1f}" y="{y + 14}">{_ratio(f.ratio)}</text>')
        if f.target is not None and f.target.kind == "ratio":
            tx = x(f.target.value)
            out.append(
                f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="{y - 2}" y2="{y + 20}" '
                'stroke="#000" stroke-width="2"/>'
            )
    out.append("</svg>")
    return "\n".join(out)


def run_workloads(
    selected: Sequence[str], *, quick: bool, repeat: int, json_path: Path | None
) -> list[Figure]:
    """Run the named workloads (a name or an ``area`` prefix; none = all); print and save."""
    available = discover()
    names = sorted(available)
    if selected:
        chosen = [n for n in names if any(n == s or n.startswith(s + ".") for s in selected)]
        unknown = [s for s in selected if not any(n == s or n.startswith(s + ".") for n in names)]
        if unknown:
            raise SystemExit(f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(names)}")
    else:
        chosen = names
    bench = Bench(quick=quick, repeat=repeat)
    failures: list[str] = []
    try:
        for i, name in enumerate(chosen, 1):
            bench.current = name
            bench.progress(f"[{i}/{len(chosen)}] {name}")
            try:
                available[name].fn(bench)
            except Exception as exc:  # one broken workload must not hide the others' figures
                failures.append(f"{name}: {exc!r}")
                bench.progress(f"  {name} FAILED: {exc!r}")
    finally:
        shutil.rmtree(bench.tmpdir, ignore_errors=True)
    print(machine_line())
    print(render_table(bench.figures))
    for failure in failures:
        print(f"FAILED {failure}")
    if json_path is not None:
        doc: dict[str, Any] = {
            "machine": machine_line(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": _code_version(),
            "quick": quick,
            "repeat": repeat,
            "workloads": chosen,
            "figures": [f.to_json() for f in bench.figures],
            "failures": failures,
        }
        text = json.dumps(doc, indent=2)
        json_path.write_text(text)
        json_path.with_suffix(".svg").write_text(render_svg(bench.figures))
        json_path.with_suffix(".md").write_text(render_document(json.loads(text)))
        print(f"wrote {json_path} and, beside it, .svg (plot) and .md (table)")
    if failures:
        raise SystemExit(1)
    return bench.figures


def readme_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/bench-readme FILE.json``: print ``FILE.md`` again, from the JSON alone."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: scripts/bench-readme FILE.json\n\nPrint the Markdown that `triode bench --json "
              "FILE.json` wrote beside it\n(FILE.md: the machine, the figures-and-targets table, the "
              "tally), from the JSON alone.", file=sys.stderr)
        return 0 if args and args[0] in ("-h", "--help") else 2
    sys.stdout.write(render_document(json.loads(Path(args[0]).read_text())))
    return 0
