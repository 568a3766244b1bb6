"""``triode node``: serve until SIGINT or SIGTERM, then shut down gracefully and exit 0."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from ..concurrency import sole_exception
from ..errors import TriodeError
from ..node import NodeConfig, open_node
from .common import default_home, parse_size, read_token


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("node", help="run a node")
    p.add_argument("--listen", metavar="ADDRESS", default="127.0.0.1:7420",
                   help="HOST:PORT to serve on; port 0 picks one (default 127.0.0.1:7420)")
    p.add_argument("--data", metavar="DIR", type=Path,
                   help="data directory (default: $TRIODE_HOME or ~/.cache/triode)")
    p.add_argument("--backing", metavar="ADDRESS", help="node whose storage backs this one")
    p.add_argument("--peer", metavar="ADDRESS", action="append", default=[], help="seed peer (repeatable)")
    p.add_argument("--max-concurrency", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="actions run at once (default: cores)")
    p.add_argument("--max-queue", type=int, default=1000, metavar="N", help="queued actions (default 1000)")
    p.add_argument("--cache-size", type=parse_size, metavar="SIZE", help="local storage limit, e.g. 10GiB")
    p.add_argument("--token-file", metavar="FILE",
                   help="require clients to present the shared secret held in FILE (whitespace around "
                        "it, such as the trailing newline, is stripped and is not part of it)")
    p.add_argument("--ac-writes", choices=("any", "executor"), default="any",
                   help="who may write the action cache: any client with ac.update (default), or "
                        "only this node's own executions (ac.update is refused PERMISSION_DENIED)")
    p.add_argument("--metrics", metavar="ADDRESS", help="serve Prometheus metrics over HTTP at HOST:PORT")
    p.add_argument("--http", metavar="ADDRESS",
                   help="serve the HTTP cache for Bazel (--remote_cache=http://...) and ccache at "
                        "HOST:PORT, with /metrics")
    p.add_argument("--grpc", metavar="ADDRESS",
                   help="serve Bazel's Remote Execution API (REAPI v2: cache and execution) over gRPC "
                        "at HOST:PORT (--remote_cache/--remote_executor=grpc://...)")
    p.add_argument("--allow-unauthenticated-reads", action="store_true",
                   help="with --token-file, serve HTTP cache GETs and HEADs without credentials")
    p.add_argument("--tls-cert", metavar="FILE", type=Path, help="serve TLS with this certificate chain")
    p.add_argument("--tls-key", metavar="FILE", type=Path, help="private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="FILE", type=Path, help="CA bundle to verify TLS peers and backing")
    p.add_argument("--shutdown-grace", type=float, default=10.0, metavar="S",
                   help="seconds calls in flight get to finish on shutdown (default 10)")
    p.add_argument("--isolation", choices=("auto", "bwrap", "none"), default="auto",
                   help="isolate each action with bubblewrap: a PID namespace (nothing it starts "
                        "outlives it), the store read-only; auto (default) falls back to none, with a "
                        "warning, where bwrap does not work; bwrap refuses to start without it")
    p.add_argument("--action-network", choices=("host", "none"), default="host",
                   help="an isolated action's network: the node's (default) or none")
    p.add_argument("--bwrap", metavar="PATH",
                   help="the bwrap to use (default: on the PATH, else /usr/bin/bwrap)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> NodeConfig:
    return NodeConfig(
        listen=args.listen,
        data=args.data or default_home(),
        backing=args.backing,
        peers=tuple(args.peer),
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        cache_size=args.cache_size,
        token=read_token(args.token_file),
        ac_writes=args.ac_writes,
        metrics=args.metrics,
        http=args.http,
        grpc=args.grpc,
        allow_unauthenticated_reads=args.allow_unauthenticated_reads,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_ca=args.tls_ca,
        shutdown_grace=args.shutdown_grace,
        isolation=args.isolation,
        action_network=args.action_network,
        bwrap=args.bwrap,
    )


async def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            with trio.CancelScope() as hard_stop:
                async with trio.open_nursery() as watcher:
                    logging.getLogger("triode.isolation").disabled = True  # said here, below
                    async with open_node(config) as node:
                        print(f"listening on {node.address}", file=sys.stderr, flush=True)
                        engine = node.parts["engine"].info()
                        print(f"actions: {engine['isolation_detail']}", file=sys.stderr, flush=True)
                        if node.http_address is not None:
                            print(f"http cache on {node.http_address}", file=sys.stderr, flush=True)
                        if node.grpc_address is not None:
                            print(f"grpc on {node.grpc_address}", file=sys.stderr, flush=True)
                        signum = await signals.__anext__()
                        print(
                            f"{signal.Signals(signum).name}: shutting down "
                            f"(up to {config.shutdown_grace:g}s for calls in flight; again to stop now)",
                            file=sys.stderr, flush=True,
                        )
                        watcher.start_soon(_stop_on_second_signal, signals, hard_stop)
                    # The graceful shutdown is over: stop listening for a second signal.
                    watcher.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # A node that cannot start (address in use, bad TLS files) fails inside the
        # watcher's nursery; show the one error that says why, not a tree of tracebacks.
        leaf = sole_exception(group)
        if isinstance(leaf, TriodeError):
            raise leaf from None
        raise
    return 0


async def _stop_on_second_signal(signals: AsyncIterator[int], hard_stop: trio.CancelScope) -> None:
    signum = await signals.__anext__()
    print(f"{signal.Signals(signum).name} again: stopping now", file=sys.stderr, flush=True)
    hard_stop.cancel()
