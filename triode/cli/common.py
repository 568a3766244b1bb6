"""What client commands share: --remote, --token-file, and the embedded node without them."""

from __future__ import annotations

import argparse
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from ..client import Client, connect
from ..errors import InvalidArgument
from ..node import open_node

__all__ = ["add_client_options", "open_cli_client", "read_token", "default_home", "parse_size"]


def default_home() -> Path:
    """The local data dir: ``$TRIODE_HOME``, else ``~/.cache/triode``."""
    home = os.environ.get("TRIODE_HOME")
    return Path(home) if home else Path.home() / ".cache" / "triode"


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidArgument(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise InvalidArgument(f"token file {path} is empty")
    return token


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--remote", metavar="ADDRESS", help="talk to the node at HOST:PORT (default: an embedded node "
        "over $TRIODE_HOME, ~/.cache/triode)"
    )
    parser.add_argument("--token-file", metavar="FILE", help="file holding the node's shared secret")
    parser.add_argument("--tls-ca", metavar="FILE", help="CA bundle to verify a node that serves TLS")


@asynccontextmanager
async def open_cli_client(args: argparse.Namespace) -> AsyncIterator[Client]:
    """A client of ``--remote``, or of an embedded node over the local data dir."""
    if args.remote:
        ssl_context = None
        if args.tls_ca:
            import ssl

            ssl_context = ssl.create_default_context(cafile=args.tls_ca)
        async with connect(args.remote, token=read_token(args.token_file), ssl_context=ssl_context) as client:
            yield client
    else:
        async with open_node(listen=None, data=default_home()) as node, node.connect() as client:
            yield client


_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
          "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4,
          "tib": 1024**4}


def parse_size(text: str) -> int:
    """``10GiB``, ``512M``, ``1000000`` to bytes."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in _UNITS or value < 0:
        raise argparse.ArgumentTypeError(f"expected a size like 10GiB, 512MB or 1000000, got {text!r}")
    return int(value * _UNITS[unit])
