"""The benchmark harness: named workloads, repetitions, baselines, ratios, JSON.

Shared machines are noisy, so no figure is reported alone: each :meth:`Bench.compare`
measures a *subject* and a *baseline* doing the same work in the same run, alternating
their repetitions so drift hits both, and reports the ratio of their medians. Targets
are ratios too (``target=0.5``: the subject reaches at least half the baseline).
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
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import trio

__all__ = [
    "workload",
    "Bench",
    "Figure",
    "WORKLOADS",
    "discover",
    "machine_line",
    "render_markdown",
    "run_concurrently",
    "run_workloads",
]

REPEAT = 5
T = TypeVar("T")


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
    better: str
    ratio: float
    target: float | None
    met: bool | None
    note: str = ""


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
        better: Literal["higher", "lower"] = "higher",
        target: float | None = None,
        note: str = "",
    ) -> Figure:
        """Measure ``subject`` and ``baseline`` ``repeat`` times each, alternating; record the ratio.

        Each callable does one repetition and returns its value in ``unit``. The ratio is
        subject/baseline; ``target`` is met when the ratio is at least it (``better="higher"``)
        or at most it (``better="lower"``).
        """
        label, base_fn = baseline
        subj: list[float] = []
        base: list[float] = []
        for i in range(self.repeat):
            self.progress(f"  {self.current}: {figure} [{i + 1}/{self.repeat}] baseline ({label})")
            base.append(float(base_fn()))
            self.progress(f"  {self.current}: {figure} [{i + 1}/{self.repeat}] triode")
            subj.append(float(subject()))
        s, b = Stats.of(subj), Stats.of(base)
        ratio = s.median / b.median if b.median else float("inf")
        met = None if target is None else (ratio >= target if better == "higher" else ratio <= target)
        fig = Figure(self.current, figure, unit, s, label, b, better, ratio, target, met, note)
        self.figures.append(fig)
        self.progress(
            f"  {self.current}: {figure}: {_fmt(s.median)} {unit} vs {_fmt(b.median)} "
            f"({label}) = {_ratio(ratio)}" + ("" if met is None else (" ok" if met else " MISSED"))
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


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def _ratio(r: float) -> str:
    """2 decimals, but enough digits that a small ratio does not print as 0.00x."""
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def render_table(figures: Sequence[Figure]) -> str:
    header = ("workload", "figure", "triode median (min-max)", "baseline median (min-max)", "ratio", "target")
    rows = [header]
    for f in figures:
        target = (
            ""
            if f.target is None
            else (
                (">= " if f.better == "higher" else "<= ") + f"{f.target:g}x " + ("ok" if f.met else "MISSED")
            )
        )
        rows.append(
            (
                f.workload,
                f"{f.figure} [{f.unit}]",
                f"{_fmt(f.subject.median)} ({_fmt(f.subject.min)}-{_fmt(f.subject.max)})",
                f"{f.baseline_label}: {_fmt(f.baseline.median)} "
                f"({_fmt(f.baseline.min)}-{_fmt(f.baseline.max)})",
                f"{_ratio(f.ratio)}",
                target,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(figures: Sequence[Figure]) -> str:
    """The figures as a Markdown table, as the README shows them."""
    lines = [
        "| workload | figure | triode (median, min-max) | baseline (median, min-max) | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for f in figures:
        target = (
            ""
            if f.target is None
            else (
                ("&ge; " if f.better == "higher" else "&le; ")
                + f"{f.target:g}x "
                + ("met" if f.met else "**missed**")
            )
        )
        lines.append(
            f"| {f.workload} | {f.figure} [{f.unit}] "
            f"| {_fmt(f.subject.median)} ({_fmt(f.subject.min)}-{_fmt(f.subject.max)}) "
            f"| {f.baseline_label}: {_fmt(f.baseline.median)} "
            f"({_fmt(f.baseline.min)}-{_fmt(f.baseline.max)}) "
            f"| {_ratio(f.ratio)} | {target} |"
        )
    return "\n".join(lines)


def render_svg(figures: Sequence[Figure]) -> str:
    """The ratios as bars on a log scale from 1x, each target marked: a plot without a plotting library."""
    row, left, width = 26, 380, 460
    height = row * len(figures) + 56
    values = [f.ratio for f in figures if f.ratio > 0] + [f.target for f in figures if f.target] + [1.0]
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
        "black tick = target)</text>",
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
        if f.target is not None:
            tx = x(f.target)
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
            "quick": quick,
            "repeat": repeat,
            "figures": [asdict(f) for f in bench.figures],
            "failures": failures,
        }
        json_path.write_text(json.dumps(doc, indent=2))
        json_path.with_suffix(".svg").write_text(render_svg(bench.figures))
        json_path.with_suffix(".md").write_text(
            machine_line() + "\n\n" + render_markdown(bench.figures) + "\n"
        )
        print(f"wrote {json_path} and, beside it, .svg (plot) and .md (table)")
    if failures:
        raise SystemExit(1)
    return bench.figures
