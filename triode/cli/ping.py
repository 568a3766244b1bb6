"""``triode ping ADDRESS``: is a node there, and how far away."""

from __future__ import annotations

import argparse
import sys

import trio

from ..client import connect
from ..errors import TriodeError
from .common import read_token


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ping", help="round trip to a node")
    p.add_argument("address", metavar="ADDRESS", help="HOST:PORT of the node")
    p.add_argument("--token-file", metavar="FILE", help="file holding the node's shared secret")
    p.add_argument("--tls-ca", metavar="FILE", help="CA bundle to verify a node that serves TLS")
    p.add_argument("-c", "--count", type=int, default=1, help="pings to send (default 1)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    p.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    ssl_context = None
    if args.tls_ca:
        import ssl

        ssl_context = ssl.create_default_context(cafile=args.tls_ca)
    try:
        with trio.fail_after(args.timeout):
            async with connect(
                args.address, token=read_token(args.token_file), ssl_context=ssl_context,
                connect_timeout=args.timeout,
            ) as client:
                for _ in range(args.count):
                    rtt = await client.ping()
                    print(f"pong from {client.node_id} at {args.address}: {rtt * 1000:.3f} ms")
    except trio.TooSlowError:
        print(f"triode: no answer from {args.address} within {args.timeout}s", file=sys.stderr)
        return 1
    except TriodeError as exc:
        print(f"triode: {exc}", file=sys.stderr)
        return 1
    return 0
