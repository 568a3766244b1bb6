"""``triode cas put|get|has|verify``: the content-addressed store from the shell."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from ..errors import BlobNotFound, InvalidDigest, TriodeError
from ..model.digest import Digest
from .common import add_client_options, open_cli_client


def _digest(text: str) -> Digest:
    try:
        return Digest.parse(text)
    except InvalidDigest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cas", help="store and fetch blobs by digest")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    put = verbs.add_parser("put", help="store files; prints HASH/SIZE  FILE for each")
    put.add_argument("files", nargs="+", metavar="FILE", type=Path)
    get = verbs.add_parser("get", help="write a blob to stdout or a file")
    get.add_argument("digest", metavar="HASH/SIZE", type=_digest)
    get.add_argument("-o", "--output", metavar="FILE", type=Path, help="write here instead of stdout")
    has = verbs.add_parser("has", help="print the digests that are missing; exit 1 if any is")
    has.add_argument("digests", nargs="+", metavar="HASH/SIZE", type=_digest)
    for verb in (put, get, has):
        add_client_options(verb)
        verb.add_argument("--zstd", action="store_true", help="compress transfers with zstd")
    verify = verbs.add_parser(
        "verify", help="re-hash stored blobs (all, or the ones named) on the node, remove those whose "
        "bytes no longer match their digest and print them; exit 1 if any was damaged")
    verify.add_argument("digests", nargs="*", metavar="HASH/SIZE", type=_digest)
    add_client_options(verify)
    put.set_defaults(func=run_put)
    get.set_defaults(func=run_get)
    has.set_defaults(func=run_has)
    verify.set_defaults(func=run_verify)


async def run_put(args: argparse.Namespace) -> int:
    for path in args.files:
        if not path.is_file():
            print(f"triode: {path} is not a regular file", file=sys.stderr)
            return 2
    async with open_cli_client(args) as client:
        if args.zstd:
            client.cas.compression = "zstd"
        for path in args.files:
            try:
                digest = await client.cas.put_file(path)
            except (TriodeError, OSError) as exc:
                print(f"triode: {path}: {exc}", file=sys.stderr)
                return 2
            print(f"{digest}  {path}", flush=True)
    return 0


async def run_get(args: argparse.Namespace) -> int:
    digest: Digest = args.digest
    async with open_cli_client(args) as client:
        if args.zstd:
            client.cas.compression = "zstd"
        try:  # "not found" is a plain no (exit 1); any other failure is triode's (exit 2)
            if args.output is not None:
                await client.cas.write_to(digest, args.output)
                return 0
            out = sys.stdout.buffer
            async with client.cas.open_read(digest) as chunks:
                async for chunk in chunks:
                    await trio.to_thread.run_sync(out.write, chunk)
            await trio.to_thread.run_sync(out.flush)
        except BlobNotFound:
            print(f"triode: {digest}: not found", file=sys.stderr)
            return 1
        except (TriodeError, OSError) as exc:
            print(f"triode: {digest}: {exc}", file=sys.stderr)
            return 2
    return 0


async def run_has(args: argparse.Namespace) -> int:
    async with open_cli_client(args) as client:
        missing = await client.cas.find_missing(args.digests)
    for digest in missing:
        print(digest)
    return 1 if missing else 0


async def run_verify(args: argparse.Namespace) -> int:
    request = {"digests": [d.to_wire() for d in args.digests]} if args.digests else {}
    async with open_cli_client(args) as client:
        reply = await client.connection.call("cas.verify", request)
    damaged = Digest.from_wire_list(reply["damaged"])
    for digest in damaged:
        print(f"damaged  {digest}  (removed)")
    for digest in Digest.from_wire_list(reply["missing"]):
        print(f"missing  {digest}")
    print(f"verified {reply['checked']} blob(s), {reply['bytes']} bytes: "
          f"{len(damaged)} damaged" + (" (removed: upload them again)" if damaged else ""),
          file=sys.stderr)
    return 1 if damaged else 0
