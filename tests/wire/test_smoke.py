import trio

import triode
from triode.testing import no_leaks


async def test_ping_and_info(client: triode.Client, node: triode.Node) -> None:
    assert await client.ping() >= 0
    info = await client.info()
    assert info["node"] == node.id
    assert "node.ping" in info["methods"]


async def test_embedded_client(tmp_path) -> None:
    async with no_leaks():
        async with triode.open_node(listen=None, data=tmp_path) as node:
            async with node.connect() as client:
                assert (await client.info())["node"] == node.id
                async with trio.open_nursery() as n:
                    for _ in range(50):
                        n.start_soon(client.ping)
