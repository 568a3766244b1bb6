"""``triode bench``: the benchmark suite (``benchmarks/`` in the repo, installed as ``triode_benchmarks``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="run benchmarks, each figure beside a baseline of the same run")
    p.add_argument("workloads", nargs="*", metavar="WORKLOAD", help="names or area prefixes (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, for a fast look")
    p.add_argument("--repeat", type=int, default=5, metavar="N", help="repetitions of each side (default 5)")
    p.add_argument(
        "--json", type=Path, metavar="FILE", help="write the figures as JSON (and an SVG plot beside)"
    )
    p.add_argument("--list", action="store_true", help="list the workloads and exit")
    p.set_defaults(func=run, sync=True)


def run(args: argparse.Namespace) -> int:
    from triode_benchmarks.harness import discover, run_workloads

    if args.list:
        for name, w in sorted(discover().items()):
            print(f"{name:32} {w.help}")
        return 0
    if args.repeat < 5:
        raise SystemExit("--repeat must be at least 5: fewer repetitions make the medians meaningless")
    run_workloads(args.workloads, quick=args.quick, repeat=args.repeat, json_path=args.json)
    return 0
