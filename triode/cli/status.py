"""``triode status [--json] [--remote ADDRESS]``: what a node is doing, and its cluster."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..sched.metrics import numeric_leaves
from .common import add_client_options, open_cli_client


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("status", help="node id, load, peers, storage, counters")
    add_client_options(p)
    p.add_argument("--json", action="store_true", help="print the node's whole description as JSON")
    p.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    async with open_cli_client(args) as client:
        info = await client.status()
    if args.json:
        json.dump(info, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(info))
    return 0


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _rate(hits: float, total: float) -> str:
    return f"{100 * hits / total:.1f}%" if total else "-"


def render(info: dict[str, Any]) -> str:
    """The human view of ``node.info``."""
    out: list[str] = []
    out.append(f"node      {info.get('node')}  (triode {info.get('version')})")
    out.append(f"address   {info.get('address') or '(in-process)'}")
    out.append(f"uptime    {_duration(info.get('uptime', 0))}")
    engine = info.get("engine")
    if engine and "isolation" in engine:
        # Said in words either way: an unisolated node is never silent about it.
        out.append(f"isolation {'on' if engine.get('isolated') else 'NOT ISOLATED'}: "
                   f"{engine.get('isolation_detail', engine['isolation'])}")
    sched = info.get("sched")
    if sched:
        out.append(
            f"load      {sched['executing']}/{sched['capacity']} executing, {sched['queued']}/"
            f"{sched['queue_limit']} queued, {sched['forwarding']} running on peers for us"
        )
        c = sched.get("counters", {})
        out.append(
            f"actions   {c.get('executed', 0)} run ({c.get('executed_for_peers', 0)} for peers), "
            f"{c.get('cached', 0)} cached, {c.get('deduplicated', 0)} shared, "
            f"{c.get('forwarded', 0)} forwarded, "
            f"{c.get('failed', 0)} failed, {c.get('cancelled', 0)} cancelled, {c.get('rejected', 0)} refused"
        )
        out.append(
            f"hit rate  {_rate(c.get('cached', 0), c.get('cached', 0) + c.get('executed', 0))} of executions "
            "answered from the action cache"
        )
        peers = sched.get("peers", [])
        out.append(f"peers     {len(peers) or 'none'}")
        for p in peers:
            load = p.get("load") or {}
            figures = (
                f"{load.get('executing', '?')}/{load.get('capacity', '?')} executing, "
                f"{load.get('queued', '?')} queued" if load else "load unknown"
            )
            heard = f"heard {p['heard']:.1f}s ago" if p.get("heard") is not None else "never heard"
            out.append(f"  {p['address']:<22} {p.get('node') or '?':<20} {p['state']:<8} {figures}; {heard}")
        if sched.get("metrics"):
            out.append(f"metrics   http://{sched['metrics']}/metrics")
    storage = info.get("storage")
    if storage:
        out.append("storage")
        cas = storage.get("cas", {})
        if "bytes" in cas:
            limit = cas.get("limit")
            out.append(
                f"  cas     {cas.get('blobs', '?')} blobs, {_size(cas['bytes'])}"
                + (f" of {_size(limit)}" if limit else "")
                + (f" ({cas['kind']})" if "kind" in cas else "")
            )
        for key, value in numeric_leaves(storage):
            if key in ("cas_blobs", "cas_bytes", "cas_limit"):
                continue
            out.append(f"  {key:<30} {_num(value)}")
        hits, misses = _find(storage, "hits"), _find(storage, "misses")
        if hits is not None and misses is not None:
            out.append(f"  hit rate {_rate(hits, hits + misses)}")
    for name in ("engine", "tools"):
        part = info.get(name)
        if part:
            figures = ", ".join(f"{k} {_num(v)}" for k, v in numeric_leaves(part) if v)
            out.append(f"{name:<9} {figures or 'idle'}")
    return "\n".join(out) + "\n"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.3g}"


def _find(tree: Any, key: str) -> float | None:
    total = None
    for k, v in numeric_leaves(tree):
        if k == key or k.endswith("_" + key):
            total = (total or 0) + v
    return total
