"""Counters and latency histograms, rendered in the Prometheus text format (version 0.0.4).

Small on purpose: a node has a handful of figures, so a dict per metric keyed by its
label values is all the structure needed, and rendering never blocks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Counter", "Histogram", "Registry", "DEFAULT_BUCKETS"]

#: Seconds: from a cache hit (sub-millisecond) to a long build step.
DEFAULT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   300.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labels = name, help, labels
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, *values: str, by: float = 1.0) -> None:
        self._values[values] = self._values.get(values, 0.0) + by

    def value(self, *values: str) -> float:
        return self._values.get(values, 0.0)

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for values, v in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.labels, values)} {_number(v)}"


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> None:
        self.name, self.help = name, help
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self.count += 1
        self.sum += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        running = 0
        for bound, n in zip((*self.buckets, math.inf), self._counts, strict=True):
            running += n
            yield f'{self.name}_bucket{{le="{_number(bound)}"}} {running}'
        yield f"{self.name}_sum {_number(self.sum)}"
        yield f"{self.name}_count {self.count}"


class Registry:
    """The metrics of one node; gauges are read from callbacks when rendered."""

    def __init__(self) -> None:
        self._metrics: list[Counter | Histogram] = []
        self._gauges: list[tuple[str, str, Callable[[], Iterable[tuple[dict[str, str], float]]]]] = []

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> Counter:
        c = Counter(name, help, labels)
        self._metrics.append(c)
        return c

    def histogram(self, name: str, help: str, buckets: tuple[float, ...] = DEFAULT_BUCKETS) -> Histogram:
        h = Histogram(name, help, buckets)
        self._metrics.append(h)
        return h

    def gauge(self, name: str, help: str, read: Callable[[], Iterable[tuple[dict[str, str], float]]]) -> None:
        """``read()`` yields ``(labels, value)`` pairs each time the metrics are rendered."""
        self._gauges.append((name, help, read))

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics:
            lines.extend(metric.render())
        for name, help, read in self._gauges:
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} gauge")
            for labels, value in read():
                names = tuple(sorted(labels))
                lines.append(f"{name}{_labels(names, tuple(labels[n] for n in names))} {_number(value)}")
        return "\n".join(lines) + "\n"


def numeric_leaves(value: Any, prefix: str = "") -> Iterable[tuple[str, float]]:
    """Flatten a part's ``info()`` into ``(metric_suffix, number)`` pairs for gauges."""
    if isinstance(value, bool):
        yield prefix, float(value)
    elif isinstance(value, (int, float)):
        if not (isinstance(value, float) and math.isnan(value)):
            yield prefix, float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            key = "".join(c if c.isalnum() else "_" for c in str(k)).lower()
            yield from numeric_leaves(v, f"{prefix}_{key}" if prefix else key)
