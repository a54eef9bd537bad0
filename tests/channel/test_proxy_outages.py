"""Long outages reset the proxy's connections and refuse new ones until the link is back."""

from __future__ import annotations

import asyncio

import pytest

from channel.errors import ChannelError
from channel.link import LinkParameters
from channel.proxy import LinkProxy


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


async def round_trip(port: int, payload: bytes, timeout_s: float = 5.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout_s)
    finally:
        writer.close()


async def test_a_long_outage_resets_connections_and_refuses_new_ones_until_it_ends() -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    down = LinkParameters(rate_bps=None, outages=[{"at_s": 0.3, "duration_s": 1.5}])
    async with server, LinkProxy("127.0.0.1", upstream_port, down, LinkParameters(rate_bps=None), seed=1,
                                 outage_reset_after_s=0.4) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"hello")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(5), 2) == b"hello"  # starts the link's clock
        # The connection idles into the outage; after 0.4 s of it the proxy closes it.
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
        assert proxy.outage_resets == 1
        loop = asyncio.get_running_loop()
        epoch = proxy.downlink_model.epoch_s
        assert epoch is not None
        outage_end = epoch + 0.3 + 1.5  # the model's clock, not a guess of how long the steps above took
        # Still inside the outage: a new connection is closed at once.
        assert proxy.long_outage_at(loop.time()) is not None, "the machine was too slow to test inside the outage"
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await round_trip(proxy.port, b"x", timeout_s=2)
        assert proxy.refused_during_outage >= 1
        await asyncio.sleep(max(0.0, outage_end - loop.time()) + 0.05)
        # The outage is over: traffic flows again.
        assert await round_trip(proxy.port, b"back again") == b"back again"
        assert proxy.errors == 0


async def test_short_outages_only_delay() -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    upstream_port = server.sockets[0].getsockname()[1]
    down = LinkParameters(rate_bps=None, outages=[{"at_s": 0.05, "duration_s": 0.3}])
    async with server, LinkProxy("127.0.0.1", upstream_port, down, LinkParameters(rate_bps=None), seed=1,
                                 outage_reset_after_s=5.0) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
        await asyncio.sleep(0.1)  # now inside the outage, unless the machine is very busy
        loop = asyncio.get_running_loop()
        sent = loop.time()
        writer.write(b"b")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(1), 5) == b"b"
        window = proxy.downlink_model.outage_at(sent)
        if window is not None:  # sent inside the outage: it waited for its end, and the link was kept
            assert loop.time() >= window[1]
        writer.close()
        assert proxy.outage_resets == 0


def test_reset_threshold_must_be_positive() -> None:
    with pytest.raises(ChannelError, match="outage_reset_after_s"):
        LinkProxy("127.0.0.1", 1, LinkParameters(rate_bps=None), LinkParameters(rate_bps=None), seed=0,
                  outage_reset_after_s=0)
