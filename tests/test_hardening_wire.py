"""Issue #18, items 3-7: the attacks that worked against a node, and the protocol fixes.

Each attack runs against a node on loopback (a real ``triode node`` process where its
memory or its file descriptors are what is measured) and checks both halves: the node
stays bounded, and a well-behaved client is served all the while.
"""

from __future__ import annotations

import logging
import os
import resource
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
import zstandard

import triode
from triode import errors
from triode.chunks import READ_CHUNK
from triode.engine import executor as executor_module
from triode.model.action import Action
from triode.model.digest import Digest
from triode.model.result import ActionResult, CapturedStream, OutputSymlink
from triode.node.node import TOKEN_BURST, TokenThrottle
from triode.procgroup import open_process_group
from triode.testing import no_leaks
from triode.wire import codec
from triode.wire.codec import CALL, ERROR, HELLO
from triode.wire.connection import PROTOCOL_VERSION, ByteBudget
from triode.wire.framing import MAX_PAYLOAD, Decoder

from .cli.test_node_cli import triode_node
from .wire.test_node_wire import raw, read_all

MiB = 1024 * 1024


def hello(**overrides: Any) -> bytes:
    body = {"version": PROTOCOL_VERSION, "node": "attacker", "features": ["zstd"], "window": 65536,
            "max_frame": 1 << 20, "max_calls": 1000}
    body.update(overrides)
    return codec.encode([HELLO, body])


def rss(pid: int) -> int:
    """Resident bytes of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def until(condition: Callable[[], bool], within: float = 10) -> None:
    with trio.fail_after(within):
        while not condition():  # noqa: ASYNC110 - the node's state, polled
            await trio.sleep(0.01)


async def first_error(stream: trio.abc.Stream) -> list[Any]:
    """The ERROR id 0 the node sends before it hangs up."""
    answers = await read_all(stream)
    refusals = [m for m in answers if m[0] == ERROR and m[1] == 0]
    assert refusals, answers
    return refusals[0]


# -- 3. bounded memory: unread downloads -------------------------------------------------


async def test_unread_downloads_leave_node_memory_bounded(tmp_path: Path) -> None:
    """The attack, scaled down: one connection opens 64 downloads of a 48 MiB blob with a
    1 KiB window and never reads; another opens 64 with a 4 MiB window and never reads its
    socket. Before, each download held ~15 MB (2 GB in all here); now the node reads no
    more than the credit and holds at most its per-connection budget for the second."""
    async with no_leaks(), triode_node(tmp_path) as node:
        async with triode.connect(node.address) as client:
            blob = os.urandom(MiB) * 48
            digest = await client.cas.put(blob)
            assert await client.cas.get(digest) == blob  # warm: the reads' buffers exist once
            before = rss(node.proc.pid)
            calls = b"".join(codec.encode([CALL, 1 + 2 * i, "cas.get", {"digest": digest.to_wire()},
                                           {"down": True}]) for i in range(64))
            async with await raw(node.address) as small, await raw(node.address) as large:
                await small.send_all(hello(window=1024) + calls)
                await large.send_all(hello(window=4 * MiB) + calls)
                peak = before
                with trio.fail_after(30):
                    for _ in range(3):  # the node keeps serving others meanwhile
                        assert await client.ping() >= 0
                        assert await client.cas.get(digest) == blob
                        peak = max(peak, rss(node.proc.pid))
                    for _ in range(10):
                        await trio.sleep(0.1)
                        peak = max(peak, rss(node.proc.pid))
                info = await client.info()
        growth = peak - before
        assert growth < 96 * MiB, f"node RSS grew by {growth / MiB:.0f} MiB under unread downloads"
        # What the two attackers hold now: 1 KiB of credit each at most, and the large one
        # its connection's budget (8 MiB): the node's accounting says so too.
        assert info["buffered"]["bytes"] <= 8 * MiB + 64 * 1024, info["buffered"]


@pytest.mark.parametrize("in_memory", [False, True])
@pytest.mark.parametrize("encoding", ["identity", "zstd"])
async def test_a_download_reads_no_further_than_its_credit(
    tmp_path: Path, in_memory: bool, encoding: str
) -> None:
    """A client with a 1 KiB window that reads slowly: the node holds at most that window
    (reads of a stored file are cut to the credit), or one store chunk for a node that
    keeps its blobs in memory; the blob arrives whole and verified in both encodings."""
    blob = os.urandom(MiB) + bytes(2 * MiB)  # half random, half compressible
    data = None if in_memory else tmp_path / "data"
    async with no_leaks(), triode.open_node(listen="127.0.0.1:0", data=data) as node:
        async with triode.connect(node.address, window=1024) as client:
            digest = await client.cas.put(blob)
            peak = 0
            got = bytearray()
            async with client.cas.open_read(digest, encoding=encoding) as chunks:
                async for chunk in chunks:
                    got += chunk
                    peak = max(peak, node.budget.used)
                    if len(got) < 64 * 1024:
                        await trio.sleep(0.001)  # a slow reader first
            assert got == blob
            assert peak <= (READ_CHUNK + 1024 if in_memory else 1024 + 5), peak  # + a zstd header
            assert node.budget.used == 0


async def test_byte_budget_serves_in_order_within_its_parent() -> None:
    node = ByteBudget(100)
    conn = ByteBudget(60, parent=node)
    other = ByteBudget(60, parent=node)
    await conn.acquire(60)
    assert (conn.used, node.used) == (60, 60)
    order: list[str] = []

    async def take(budget: ByteBudget, n: int, name: str) -> None:
        await budget.acquire(n)
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, conn, 10, "conn")  # waits: its connection's share is full
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, other, 50, "other-big")  # waits: the node has 40 left
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, other, 10, "other-small")  # the node has room, but it came second
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and (conn.waiting, other.waiting, node.waiting) == (1, 0, 2)
        conn.release(60)
    assert sorted(order) == ["conn", "other-big", "other-small"]
    assert (conn.used, other.used, node.used) == (10, 60, 70)
    # Larger than the limit: granted once nothing is held, never a deadlock.
    lone = ByteBudget(5)
    await lone.acquire(50)
    assert lone.used == 50
    lone.release(50)
    assert lone.used == 0


async def test_byte_budget_a_waiter_that_leaves_lets_the_next_in() -> None:
    budget = ByteBudget(10)
    await budget.acquire(8)
    got: list[int] = []
    scope = trio.CancelScope()

    async def big() -> None:
        with scope:
            await budget.acquire(9)  # waits: 8 + 9 > 10
            got.append(9)

    async def small() -> None:
        await budget.acquire(2)  # fits, but waits behind big: first come, first served
        got.append(2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(big)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(small)
        await trio.testing.wait_all_tasks_blocked()
        assert got == [] and budget.waiting == 2
        scope.cancel()  # big leaves the queue: small fits now
        await trio.testing.wait_all_tasks_blocked()
        assert got == [2] and budget.used == 10 and budget.waiting == 0


# -- 4. admission ------------------------------------------------------------------------


#: The attacker of the next test, in a process of its own (as an attacker would be): it
#: holds N idle connections, opening each again as soon as the node closes it.
HOLD_IDLE = """
import resource, sys, trio
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

async def main():
    opened = 0
    async def hold():
        nonlocal opened
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.01)
                continue
            opened += 1
            if opened == n:
                print("holding", flush=True)
            async with stream:
                try:
                    while await stream.receive_some():
                        pass
                except trio.BrokenResourceError:
                    pass
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(hold)

trio.run(main)
"""


async def test_idle_connections_do_not_keep_an_authenticated_client_out(tmp_path: Path) -> None:
    """2,000 idle connections held against a node with a token, each opened again as soon
    as the node closes it: a client with the token is still served at once (before,
    connection 1,025 waited in the kernel's backlog for the idle ones' 10 s hello
    timeout, again and again)."""
    held = 2000
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < held + 500:
        pytest.skip("the open-file limit is too low to hold 2,000 connections")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    async with no_leaks(), triode_node(tmp_path, "--token-file", str(token)) as node:
        host, port = node.address.rsplit(":", 1)
        argv = [sys.executable, "-c", HOLD_IDLE, host, port, str(held)]
        async with open_process_group(argv, env=dict(os.environ), grace=1) as attacker:
            assert attacker.stdout is not None
            with trio.fail_after(60):
                assert b"holding" in await attacker.stdout.receive_some()
            await trio.sleep(1)
            waits = []
            for _ in range(15):  # over 5 s: through the idle ones' deadlines and their return
                start = trio.current_time()
                with trio.fail_after(10):
                    async with triode.connect(node.address, token="s3cret") as client:
                        assert await client.ping() >= 0
                waits.append(trio.current_time() - start)
                await trio.sleep(0.3)
            async with triode.connect(node.address, token="s3cret") as client:
                admission = (await client.info())["admission"]
    assert max(waits) < 2.0, f"an authenticated client waited {max(waits):.2f}s (all: {waits})"
    # The idle ones were closed at their hello deadline and came back: the node held them.
    assert admission["accepted"] > held + 15
    assert admission["in_hello"] <= admission["max_unauthenticated"]


async def test_past_the_limits_unauthenticated_connections_go_first(tmp_path: Path) -> None:
    async with no_leaks(), triode.open_node(
        listen="127.0.0.1:0", data=tmp_path / "data", token="s3cret",
        max_connections=2, max_unauthenticated=2,
        connection={"handshake_timeout": 60},  # the hello deadline plays no part here
    ) as node:
        async with triode.connect(node.address, token="s3cret") as first:
            async with await raw(node.address) as idle1:
                await until(lambda: len(node._greetings) == 1)
                async with await raw(node.address) as idle2:
                    await until(lambda: len(node._greetings) == 2)
                    # Two connections in their hello, the most there may be: a newcomer takes
                    # the oldest one's place, which is told why before it is closed.
                    async with triode.connect(node.address, token="s3cret") as second:
                        assert await second.ping() >= 0
                        refusal = await first_error(idle1)
                        assert refusal[2] == "RESOURCE_EXHAUSTED" and "connection limit" in refusal[3]
                        assert refusal[4]["retry_after"] > 0
                        # Both slots hold connections past their hello: a newcomer is told so
                        # and closed at once, whoever it is.
                        async with await raw(node.address) as idle3:
                            refusal = await first_error(idle3)
                            assert refusal[2] == "RESOURCE_EXHAUSTED" and "connection limit" in refusal[3]
                        with pytest.raises(errors.ResourceExhausted, match="connection limit") as info:
                            async with triode.connect(node.address, token="s3cret"):
                                pass
                        assert info.value.retry_after is not None
                        # One that was already in its hello is refused when it says it.
                        await idle2.send_all(hello(token="s3cret"))
                        assert (await first_error(idle2))[2] == "RESOURCE_EXHAUSTED"
                        assert await first.ping() >= 0
                    # A slot is free again, once the node has seen the second one go.
                    await until(lambda: node._connection_slots.available_tokens == 1)
                    async with triode.connect(node.address, token="s3cret") as third:
                        assert await third.ping() >= 0
            admission = node.info()["admission"]
    assert admission["evicted"] == 1 and admission["refused_full"] == 3


async def test_a_connection_without_a_hello_is_closed_after_two_seconds(node: triode.Node) -> None:
    async with await raw(node.address) as idle:
        start = trio.current_time()
        with trio.fail_after(10):
            assert await idle.receive_some() == b""
        waited = trio.current_time() - start
    assert 1.5 <= waited <= 5, waited


async def test_a_wrong_token_flood_is_throttled_per_address(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with no_leaks(), triode.open_node(listen="127.0.0.1:0", data=data, token="s3cret") as node:
        codes = []
        start = trio.current_time()
        for i in range(40):
            async with await raw(node.address) as stream:
                await stream.send_all(hello(token=f"guess-{i}"))
                refusal = await first_error(stream)
                codes.append(refusal[2])
                if refusal[2] == "RESOURCE_EXHAUSTED":
                    assert "too many wrong tokens" in refusal[3] and refusal[4]["retry_after"] > 0
        elapsed = trio.current_time() - start
        compared = codes.count("UNAUTHENTICATED")
        # The burst, plus what the address earned back while the flood ran (1 a second).
        assert TOKEN_BURST <= compared <= TOKEN_BURST + elapsed + 1, (codes, elapsed)
        assert codes[:TOKEN_BURST] == ["UNAUTHENTICATED"] * TOKEN_BURST
        assert codes.count("RESOURCE_EXHAUSTED") == 40 - compared
        # The node serves everyone else; the flood is counted.
        async with node.connect() as local:
            admission = (await local.info())["admission"]
        assert admission["wrong_tokens"] == compared and admission["throttle_refusals"] == 40 - compared


def test_token_throttle_counts_only_wrong_tokens_and_refills() -> None:
    now = [0.0]
    t = TokenThrottle(burst=3, rate=0.5, size=2, clock=lambda: now[0])
    for _ in range(10):  # right tokens: each attempt is given back
        assert t.take("10.0.0.1") == 0.0
        t.give_back("10.0.0.1")
    assert len(t) == 0
    assert [t.take("10.0.0.1") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert t.take("10.0.0.1") == pytest.approx(2.0)  # one more in 2 s at 0.5 a second
    assert t.take("10.0.0.2") == 0.0  # another address is not affected
    now[0] += 2.0
    assert t.take("10.0.0.1") == 0.0 and t.take("10.0.0.1") > 0
    # IPv6 counts per /64; an IPv4-mapped address as the IPv4 address.
    assert TokenThrottle.key("2001:db8:1:2::5") == TokenThrottle.key("2001:db8:1:2:ffff::1")
    assert TokenThrottle.key("::ffff:10.0.0.1") == "10.0.0.1"
    # The table is bounded: the least recently seen address is forgotten.
    t.take("10.0.0.3")
    assert len(t) == 2


# -- 5. the action cache's write policy -----------------------------------------------------


async def _poison(client: triode.Client, action: Action) -> None:
    fake = await client.cas.put(b"made up\n")
    await client.ac.update(action.digest(), ActionResult(0, stdout=CapturedStream(fake)))


@pytest.mark.parametrize("ac_writes", ["any", "executor"])
async def test_ac_writes_executor_refuses_ac_update_and_execute_stays_honest(
    tmp_path: Path, ac_writes: str
) -> None:
    action = Action(argv=("sh", "-c", "echo real"))
    async with no_leaks(), triode.open_node(listen=None, data=tmp_path / "data", ac_writes=ac_writes) as node:
        async with node.connect() as client:
            if ac_writes == "any":  # the default trusts every client: poisoning works
                await _poison(client, action)
                outcome = await client.execute(action)
                assert outcome.cached and await client.cas.get(outcome.result.stdout.digest) == b"made up\n"
                return
            with pytest.raises(errors.PermissionDenied, match="--ac-writes executor") as info:
                await _poison(client, action)
            assert info.value.code == "PERMISSION_DENIED"
            assert await client.ac.get(action.digest()) is None
            outcome = await client.execute(action)
            assert not outcome.cached and await client.cas.get(outcome.result.stdout.digest) == b"real\n"
            again = await client.execute(action)
            assert again.cached and again.result == outcome.result  # its own result is cached


def test_ac_writes_must_be_known() -> None:
    with pytest.raises(ValueError, match="ac_writes"):
        triode.NodeConfig(ac_writes="everyone")


async def test_ac_get_reads_the_nodes_own_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine writes a result to the cache behind its answer; ac.get serves it meanwhile."""
    monkeypatch.setattr(executor_module, "BATCH_WINDOW", 3.0)  # the write lands 3 s late
    async with no_leaks(), triode.open_node(listen=None, data=tmp_path / "data") as node:
        async with node.connect() as client:
            outcome = await client.execute(Action(argv=("sh", "-c", "echo hi")))
            assert node.info()["engine"]["cache_writes_pending"] == 1  # not in the cache yet
            assert await client.ac.get(outcome.action_digest) == outcome.result


# -- 6. the protocol, as docs/protocol.md now says ----------------------------------------


@pytest.mark.parametrize("meta, key", [({"down": 1}, "down"), ({"down": "x"}, "down"),
                                       ({"timeout": True}, "timeout"), ({"up": 1}, "up")])
async def test_meta_of_the_wrong_type_closes_the_connection(node: triode.Node, meta: dict[str, Any],
                                                            key: str) -> None:
    digest = Digest.of(b"")
    async with await raw(node.address) as stream:
        call = codec.encode([CALL, 1, "cas.get", {"digest": digest.to_wire()}, meta])
        await stream.send_all(hello() + call)
        refusal = await first_error(stream)
    assert refusal[2] == "PROTOCOL_ERROR" and f"'{key}'" in refusal[3]


async def test_streams_asked_for_the_wrong_way_are_invalid_arguments(client: triode.Client) -> None:
    digest = await client.cas.put(b"x" * 100_000)
    with pytest.raises(errors.InvalidArgument, match="meta.down = true"):
        await client.connection.call("cas.get", {"digest": digest.to_wire()})
    with pytest.raises(errors.InvalidArgument, match="meta.up = true") as info:
        await client.connection.call("cas.put", {"digest": digest.to_wire()})
    assert type(info.value) is errors.InvalidArgument  # not DIGEST_MISMATCH
    assert await client.ping() >= 0


async def test_a_hello_without_features_is_accepted(node: triode.Node) -> None:
    body = {"version": PROTOCOL_VERSION, "node": "plain", "window": 65536, "max_frame": 1 << 20,
            "max_calls": 1}
    async with await raw(node.address) as stream:
        await stream.send_all(codec.encode([HELLO, body]) + codec.encode([CALL, 1, "node.ping", None, {}]))
        decoder = codec.Decoder(2**31)
        got: list[Any] = []
        with trio.fail_after(5):
            while len(got) < 2:
                decoder.receive_data(await stream.receive_some())
                got += list(decoder)
    assert got[0][0] == HELLO and got[1] == [2, 1, None]


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_content_size=True).compress(data)


def _chunk(flag: int, payload: bytes) -> bytes:
    return struct.pack(">BI", flag, len(payload)) + payload


def test_zstd_chunk_over_4_mib_decompressed_says_so() -> None:
    frame = _zstd(bytes(MAX_PAYLOAD + 1))
    with pytest.raises(errors.InvalidArgument, match="decompresses to 4194305 bytes, over the limit") as info:
        Decoder(10 * MiB).feed(_chunk(1, frame))
    assert type(info.value) is errors.InvalidArgument and info.value.details["limit"] == MAX_PAYLOAD
    # Past the digest (and under 4 MiB) it is still a mismatch with the digest.
    with pytest.raises(errors.DigestMismatch):
        Decoder(10).feed(_chunk(1, _zstd(bytes(11))))


@pytest.mark.parametrize("tail", [b"", b"junk"])
def test_zstd_payload_with_a_second_frame_is_refused(tail: bytes) -> None:
    payload = _zstd(b"a" * 1000) + (_zstd(b"b" * 1000) if not tail else tail)
    with pytest.raises(errors.InvalidArgument, match="exactly one frame"):
        Decoder(10_000).feed(_chunk(1, payload))
    assert Decoder(10_000).feed(_chunk(1, _zstd(b"a" * 1000))) == [b"a" * 1000]


async def test_cas_put_with_a_second_zstd_frame_is_refused(client: triode.Client) -> None:
    blob = b"a" * 1000 + b"b" * 1000
    digest = Digest.of(blob)
    framed = _chunk(1, _zstd(b"a" * 1000) + _zstd(b"b" * 1000))
    args = {"digest": digest.to_wire(), "encoding": "zstd"}
    async with client.connection.open_call("cas.put", args, upload=True) as call:
        await call.send(framed)
        with pytest.raises(errors.InvalidArgument, match="exactly one frame"):
            await call.result()
    assert not await client.cas.contains(digest)


async def test_ac_update_refuses_symlinks_out_of_the_root(client: triode.Client) -> None:
    key = Digest.of(b"some action")
    for target in ("/etc/passwd", "../../x"):
        result = ActionResult(0, output_symlinks=(OutputSymlink("out/link", target),))
        with pytest.raises(errors.InvalidPath, match="stays inside the input root") as info:
            await client.ac.update(key, result)
        assert info.value.details["field"] == "output_symlinks[0].target"
    await client.ac.update(key, ActionResult(0, output_symlinks=(OutputSymlink("out/link", "../a"),)))
    stored = await client.ac.get(key)
    assert stored is not None and stored.output_symlinks[0].target == "../a"


def test_internal_errors_have_one_code_and_the_old_one_is_still_read() -> None:
    assert errors.Internal("x").code == "INTERNAL" == errors.TriodeError.code
    assert type(errors.from_wire("INTERNAL", "x")) is errors.Internal
    assert type(errors.from_wire("INTERNAL_ERROR", "x")) is errors.Internal
    assert type(errors.from_wire("PERMISSION_DENIED", "x")) is errors.PermissionDenied


# -- 7. a download cut by a malformed frame is one log line ---------------------------------


async def test_a_malformed_frame_during_a_download_is_one_log_line(
    node: triode.Node, client: triode.Client, caplog: pytest.LogCaptureFixture
) -> None:
    digest = await client.cas.put(os.urandom(MiB) * 8)
    caplog.set_level(logging.DEBUG, logger="triode")
    for i in range(20):
        caplog.clear()
        async with await raw(node.address) as stream:
            call = codec.encode([CALL, 1, "cas.get", {"digest": digest.to_wire(),
                                 "encoding": "zstd" if i % 2 else "identity"}, {"down": True}])
            await stream.send_all(hello(node=f"bad-{i}") + call)
            if i % 3:
                await stream.receive_some()  # the download is under way
            await stream.send_all(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
            await read_all(stream)
        await trio.sleep(0.05)
        loud = [r for r in caplog.records if r.levelno >= logging.INFO]
        expected = f"closing connection to bad-{i}: frame is not valid msgpack"
        assert [r.getMessage().startswith(expected) for r in loud] == [True], [r.getMessage() for r in loud]
        assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert await client.ping() >= 0


async def test_end_and_data_after_the_full_size_are_waited_for(client: triode.Client) -> None:
    """cas.put answers once END comes after the last byte (not at the last byte)."""
    blob = os.urandom(100_000)
    digest = Digest.of(blob)
    async with client.connection.open_call("cas.put", {"digest": digest.to_wire()}, upload=True) as call:
        await call.send(blob)
        await trio.sleep(0.3)
        assert not call.done  # all the bytes, no END yet: no answer
        call.end()
        assert Digest.from_wire((await call.result())["digest"]) == digest


