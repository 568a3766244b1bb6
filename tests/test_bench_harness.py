"""The benchmark harness's targets, verdicts and rendering, on made-up figures (no real workload runs)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from triode_benchmarks import harness
from triode_benchmarks.harness import (
    Bench,
    Figure,
    Stats,
    Target,
    at_least,
    at_most,
    percentile,
    render_document,
    render_markdown,
    render_table,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def bench(tmp_path: Path) -> Bench:
    return Bench(repeat=5, tmpdir=tmp_path, current="test.area", progress=lambda msg: None)


def constant(value: float):  # type: ignore[no-untyped-def]
    return lambda: value


# -- the verdict ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "ratio", "subject", "met"),
    [
        (at_least(0.5), 0.6, 1.0, True),
        (at_least(0.5), 0.5, 1.0, True),  # exactly at the bar counts
        (at_least(0.5), 0.49, 1e9, False),  # a ratio target ignores the subject's own value
        (at_most(0.1), 0.05, 1e9, True),
        (at_most(0.1), 0.1, 1.0, True),
        (at_most(0.1), 0.12, 0.0, False),
        (at_least(15_000, "calls/s"), 0.01, 33_000, True),  # an absolute target ignores the ratio
        (at_least(15_000, "calls/s"), 100.0, 14_999, False),
        (at_least(15_000, "calls/s"), 1.0, 15_000, True),
        (at_most(50, "us"), 9.0, 17.7, True),
        (at_most(50, "us"), 0.1, 50.5, False),
    ],
)
def test_target_met_or_missed(target: Target, ratio: float, subject: float, met: bool) -> None:
    assert target.met(ratio=ratio, subject=subject) is met


def test_target_texts() -> None:
    assert at_least(0.5).text() == ">= 0.5x"
    assert at_least(1 / 3).text() == ">= 0.333x"
    assert at_most(0.1).text(markdown=True) == "&le; 0.1x"
    assert at_least(15_000, "calls/s").text() == ">= 15,000 calls/s"
    assert at_least(200_000, "digests/s").text(markdown=True) == "&ge; 200,000 digests/s"
    assert at_most(50, "us").text() == "<= 50 us"
    assert at_most(0.25, "s").text() == "<= 0.25 s"
    assert at_least(0.5).kind == "ratio" and at_most(5, "s").kind == "absolute"


@pytest.mark.parametrize(
    ("better", "subject", "baseline", "target", "met"),
    [
        ("higher", 60.0, 100.0, at_least(0.5), True),
        ("higher", 40.0, 100.0, at_least(0.5), False),
        ("lower", 5.0, 100.0, at_most(0.1), True),
        ("lower", 20.0, 100.0, at_most(0.1), False),
        ("higher", 20_000.0, 1e6, at_least(15_000, "u"), True),
        ("higher", 10_000.0, 1.0, at_least(15_000, "u"), False),
        ("lower", 17.0, 10.0, at_most(50, "u"), True),
        ("lower", 60.0, 100.0, at_most(50, "u"), False),
        # The older form: a bare number is a ratio target in the direction of ``better``.
        ("higher", 60.0, 100.0, 0.5, True),
        ("higher", 40.0, 100.0, 0.5, False),
        ("lower", 5.0, 100.0, 0.1, True),
        ("lower", 20.0, 100.0, 0.1, False),
        ("higher", 1.0, 1.0, None, None),
    ],
)
def test_compare_judges_the_target(
    bench: Bench, better: str, subject: float, baseline: float, target: object, met: bool | None
) -> None:
    fig = bench.compare("f", "u", subject=constant(subject), baseline=("base", constant(baseline)),
                        better=better, target=target)  # type: ignore[arg-type]
    assert fig.met is met
    assert fig.ratio == pytest.approx(subject / baseline)
    if target is None:
        assert fig.target is None
    else:
        assert fig.target is not None and fig.target.better == better


def test_the_verdict_is_on_the_medians(bench: Bench) -> None:
    subject = iter([100.0, 1.0, 20.0, 21.0, 22.0])  # median 21, one bad outlier
    baseline = iter([40.0] * 5)
    fig = bench.compare("f", "u", subject=lambda: next(subject), baseline=("base", lambda: next(baseline)),
                        target=at_least(20, "u"))
    assert (fig.subject.median, fig.subject.min, fig.subject.max) == (21.0, 1.0, 100.0)
    assert fig.ratio == pytest.approx(21 / 40)
    assert fig.met is True


def test_compare_alternates_baseline_first(bench: Bench) -> None:
    order: list[str] = []
    bench.compare("f", "u", subject=lambda: order.append("s") or 1.0,
                  baseline=("base", lambda: order.append("b") or 1.0))
    assert order == ["b", "s"] * 5


def test_a_target_that_contradicts_the_figure_is_refused(bench: Bench) -> None:
    with pytest.raises(ValueError, match="better"):
        bench.compare("f", "ms", subject=constant(1), baseline=("b", constant(1)), better="lower",
                      target=at_least(0.5))
    with pytest.raises(ValueError, match="unit"):
        bench.compare("f", "calls/s", subject=constant(1), baseline=("b", constant(1)),
                      target=at_least(15_000, "gets/s"))
    assert bench.figures == []


# -- percentiles ---------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 201)]  # 1..200, shuffled order must not matter
    samples.reverse()
    assert percentile(samples, 50) == 100  # the lower median
    assert percentile(samples, 99) == 198  # the third largest of 200
    assert percentile(samples, 100) == 200
    assert percentile([float(x) for x in range(1, 41)], 99) == 40  # of 40: the largest
    assert percentile([float(x) for x in range(1, 401)], 99) == 396
    assert percentile([7.0], 50) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 0)


def test_compare_percentiles_one_figure_per_percentile(bench: Bench) -> None:
    subject = [float(x) for x in range(1, 101)]  # p50 50, p99 99
    baseline = [10 * x for x in subject]  # p50 500, p99 990
    figs = bench.compare_percentiles("call latency {p}", "ms", samples=100, subject=lambda: subject,
                                     baseline=("fresh start, {p} of 100", lambda: baseline),
                                     target=at_most(0.1))
    assert [f.figure for f in figs] == ["call latency p50", "call latency p99"]
    assert [f.baseline_label for f in figs] == ["fresh start, p50 of 100", "fresh start, p99 of 100"]
    assert [f.subject.median for f in figs] == [50, 99]
    assert [f.baseline.median for f in figs] == [500, 990]
    assert [f.met for f in figs] == [True, True]
    assert all("nearest-rank" in f.note and "100 samples" in f.note for f in figs)
    assert bench.figures == figs


def test_compare_percentiles_needs_the_same_count_on_both_sides(bench: Bench) -> None:
    with pytest.raises(ValueError, match="samples"):
        bench.compare_percentiles("p {p}", "ms", samples=400, subject=lambda: [1.0] * 400,
                                  baseline=("b {p}", lambda: [1.0] * 40))


# -- rendering -------------------------------------------------------------------------


def figure(name: str, target: Target | None, subject: float, baseline: float, unit: str = "calls/s",
           better: str = "higher") -> Figure:
    ratio = subject / baseline
    met = None if target is None else target.met(ratio=ratio, subject=subject)
    return Figure("area.what", name, unit, Stats.of([subject] * 5), "raw", Stats.of([baseline] * 5),
                  better, ratio, target, met, "a note")  # type: ignore[arg-type]


FIGURES = [
    figure("ratio met", at_least(0.5), 60, 100),
    figure("ratio missed", at_least(0.5), 40, 100),
    figure("absolute met", at_least(15_000, "calls/s"), 33_643, 538_773),
    figure("absolute missed", at_most(50, "us"), 60, 10, unit="us", better="lower"),
    figure("no target", None, 1, 2),
]


NAMES = ("ratio met", "ratio missed", "absolute met", "absolute missed", "no target")


def rows(text: str) -> dict[str, str]:
    return {name: line for line in text.splitlines() for name in NAMES if name + " [" in line}


def test_table_shows_every_verdict() -> None:
    text = render_table(FIGURES)
    r = rows(text)
    assert r["ratio met"].rstrip().endswith(">= 0.5x met")
    assert r["ratio missed"].rstrip().endswith(">= 0.5x MISSED")
    assert r["absolute met"].rstrip().endswith(">= 15,000 calls/s met")
    assert r["absolute missed"].rstrip().endswith("<= 50 us MISSED")
    assert r["no target"].rstrip().endswith("0.50x")  # no verdict at all
    assert "Targets: 2 met, 2 missed, of 4." in text
    assert "  area.what: ratio met: a note" in text


def test_markdown_shows_every_verdict() -> None:
    r = rows(render_markdown(FIGURES))
    assert r["ratio met"].endswith("| 0.60x | &ge; 0.5x met |")
    assert r["ratio missed"].endswith("| 0.40x | &ge; 0.5x **missed** |")
    assert r["absolute met"].endswith("| 0.062x | &ge; 15,000 calls/s met |")
    assert r["absolute missed"].endswith("| 6.00x | &le; 50 us **missed** |")
    assert r["no target"].endswith("| 0.50x |  |")
    assert r["absolute met"].startswith(
        "| area.what | absolute met [calls/s] | 33,643 (33,643-33,643) | raw: 538,773 (538,773-538,773) |"
    )


def test_json_round_trip_keeps_targets_and_verdicts() -> None:
    data = json.loads(json.dumps([f.to_json() for f in FIGURES]))
    assert data[2]["target"] == {"kind": "absolute", "value": 15000.0, "better": "higher",
                                 "unit": "calls/s", "text": ">= 15,000 calls/s"}
    assert [d["met"] for d in data] == [True, False, True, False, None]
    assert data[4]["target"] is None
    assert [Figure.from_json(d) for d in data] == FIGURES


def test_json_of_older_runs_still_renders() -> None:
    """Files written before targets were declared: a bare ratio, judged in ``better``'s direction."""
    old = FIGURES[0].to_json() | {"target": 0.5, "met": None}
    fig = Figure.from_json(old)
    assert fig.target == at_least(0.5) and fig.met is True
    old = FIGURES[3].to_json() | {"target": 0.1, "met": None}
    assert Figure.from_json(old).target == at_most(0.1)


@pytest.fixture
def fake_workloads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    harness.discover()  # the real ones register first, so the run below picks only the fakes

    def what(b: Bench) -> None:
        b.compare("calls", "calls/s", subject=constant(33_000), baseline=("raw echo", constant(500_000)),
                  target=at_least(15_000, "calls/s"))
        b.compare("copy", "MiB/s", subject=constant(1_000), baseline=("raw copy", constant(2_500)),
                  target=at_least(0.5))
        b.compare_percentiles("latency {p}", "ms", samples=3, subject=lambda: [0.1, 0.2, 0.9],
                              baseline=("fresh, {p} of 3", lambda: [4.0, 5.0, 6.0]), target=at_most(0.1))
        b.compare("plain", "s", subject=constant(1), baseline=("other", constant(1)), better="lower")

    monkeypatch.setitem(harness.WORKLOADS, "zzfake.what", harness.Workload("zzfake.what", what, "fake"))
    yield


def test_a_run_prints_and_writes_the_verdicts(
    fake_workloads: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run.json"
    figures = harness.run_workloads(["zzfake"], quick=True, repeat=5, json_path=out)
    assert [f.met for f in figures] == [True, False, True, False, None]
    printed = capsys.readouterr().out
    assert ">= 15,000 calls/s met" in printed and ">= 0.5x MISSED" in printed
    assert "<= 0.1x MISSED" in printed and "Targets: 2 met, 2 missed, of 4." in printed

    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["repeat"] == 5 and doc["workloads"] == ["zzfake.what"]
    assert [f["met"] for f in doc["figures"]] == [True, False, True, False, None]
    assert doc["figures"][0]["target"]["text"] == ">= 15,000 calls/s"

    md = out.with_suffix(".md").read_text()
    assert md == render_document(doc)
    assert "| zzfake.what | calls [calls/s] | 33,000 (33,000-33,000) | raw echo: 500,000 (500,000-500,000) " \
           "| 0.066x | &ge; 15,000 calls/s met |" in md
    assert "| &ge; 0.5x **missed** |" in md and "| fresh, p99 of 3: 6.00 (6.00-6.00) |" in md
    assert md.startswith("Machine: ") and "--quick sizes" in md
    assert out.with_suffix(".svg").read_text().startswith("<svg")

    # scripts/bench-readme prints the same Markdown again, from the JSON alone.
    again = subprocess.run([str(ROOT / "scripts" / "bench-readme"), str(out)], capture_output=True,
                           text=True, check=True)
    assert again.stdout == md
