"""The proxy measures how late it releases segments (LinkProxy.timing_stats), and writes without a task per segment."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from channel.link import LinkParameters
from channel.proxy import LinkProxy
from channel.timing import LatenessSketch
from tests.channel.test_proxy import (LATENESS_MARGIN_S, UNLIMITED, blast_on_request, proxy_tasks, tcp_server,
                                      wait_until)

LINK = LinkParameters(rate_bps=1_000_000, delay_s=0.02)  # 1460 B segments every 12 ms
TRANSFER_BYTES = 200_000  # 1.7 s of airtime
BLOCK_S = 0.4
SEGMENTS_PER_READ = 64


send_on_request = blast_on_request(TRANSFER_BYTES)


async def transfer(proxy: LinkProxy, on_progress: Callable[[int], None]) -> float:
    """Ask upstream for TRANSFER_BYTES through the proxy, read them all; the seconds it took."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*proxy.address)
    start = loop.time()
    writer.write(b"g")
    received = 0
    while received < TRANSFER_BYTES:
        chunk = await asyncio.wait_for(reader.read(65536), 20)
        assert chunk, "the proxy closed the connection early"
        received += len(chunk)
        on_progress(received)
    elapsed = loop.time() - start
    writer.close()
    await writer.wait_closed()
    return elapsed


def segments_carried(proxy: LinkProxy) -> int:
    return proxy.downlink_counters.segments + proxy.uplink_counters.segments


async def test_a_quiet_link_measures_every_segment_it_releases() -> None:
    async with tcp_server(send_on_request) as port, LinkProxy("127.0.0.1", port, LINK, UNLIMITED, seed=1) as proxy:
        elapsed = await transfer(proxy, lambda received: None)
        await wait_until(lambda: proxy.lateness.count == segments_carried(proxy), 10, "every segment's release")
    lateness = proxy.timing_stats()
    assert lateness == proxy.lateness and lateness is not proxy.lateness  # a copy
    assert lateness.count == segments_carried(proxy) >= TRANSFER_BYTES // LINK.mss_bytes
    # Never faithful by assertion here (two CPU hogs may share the machine), only consistent: a busy loop
    # makes releases late in bursts, so the median stays within the margin the proxy tests measured...
    p50, worst = lateness.quantile(0.5), lateness.quantile(1.0)
    assert p50 is not None and worst is not None
    assert 0.0 <= p50 <= LATENESS_MARGIN_S, p50
    # ...and no segment can have left later than the whole transfer lasted.
    assert worst <= elapsed, (worst, elapsed)


async def test_a_blocked_event_loop_shows_as_lateness() -> None:
    blocked = False

    def block_once(received: int) -> None:
        nonlocal blocked
        if not blocked and received >= TRANSFER_BYTES // 4:
            blocked = True
            time.sleep(BLOCK_S)  # holds the event loop, as a slow synchronous step in a device or the broker would

    async with tcp_server(send_on_request) as port, LinkProxy("127.0.0.1", port, LINK, UNLIMITED, seed=1) as proxy:
        elapsed = await transfer(proxy, block_once)
        await wait_until(lambda: proxy.lateness.count == segments_carried(proxy), 10, "every segment's release")
    lateness = proxy.timing_stats()
    assert blocked and lateness.count == segments_carried(proxy)
    # A quarter into the transfer the proxy holds ~0.5 s of segments due later (its read-ahead at 1 Mbit/s);
    # those due during the block (one per 12 ms) all leave when it ends, the first ~BLOCK_S late. On any
    # machine the block only adds to that, so the p99 is far over the 10 ms limit, and within the transfer.
    p99, worst = lateness.quantile(0.99), lateness.quantile(1.0)
    assert p99 is not None and worst is not None
    assert p99 > 0.1, lateness
    assert BLOCK_S * 0.75 <= worst <= elapsed, (worst, elapsed)


async def test_the_write_path_makes_no_task_per_segment() -> None:
    loop = asyncio.get_running_loop()
    created: list[asyncio.Task[object]] = []
    default_factory = loop.get_task_factory()

    def counting_factory(loop: asyncio.AbstractEventLoop, coro, **kwargs):  # type: ignore[no-untyped-def]
        task = asyncio.Task(coro, loop=loop, **kwargs) if default_factory is None else default_factory(loop, coro,
                                                                                                       **kwargs)
        created.append(task)
        return task

    fast = LinkParameters(rate_bps=50_000_000)  # a segment every 0.24 ms: hundreds of releases
    async with tcp_server(send_on_request) as port, LinkProxy("127.0.0.1", port, fast, UNLIMITED, seed=2) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        writer.write(b"g")
        first = await asyncio.wait_for(reader.read(1), 10)  # the connection's tasks exist by now
        rest = asyncio.create_task(reader.readexactly(TRANSFER_BYTES - len(first)))
        loop.set_task_factory(counting_factory)
        try:
            await asyncio.wait([rest], timeout=20)  # waits on the task itself: creates none
        finally:
            loop.set_task_factory(default_factory)
        writer.close()
        await writer.wait_closed()
    assert len(rest.result()) == TRANSFER_BYTES - 1
    assert proxy.downlink_counters.segments >= TRANSFER_BYTES // fast.mss_bytes
    # Nothing else runs in this loop: every task made during the transfer was made to carry it.
    assert created == [], [task.get_coro() for task in created]


async def stream_until_cancelled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    block = os.urandom(65536)
    while True:
        writer.write(block)
        await writer.drain()


async def test_a_destination_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    async with tcp_server(stream_until_cancelled) as port:
        async with LinkProxy("127.0.0.1", port, UNLIMITED, UNLIMITED, seed=3, write_timeout_s=1.0) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)  # and never reads
            await wait_until(lambda: proxy.write_waits > 0, 20, "the client's buffers to fill")
            await wait_until(lambda: proxy.errors > 0, 20, "the write timeout")
            assert proxy.last_error is not None and "did not take data for 1.0 s" in proxy.last_error
            await wait_until(lambda: proxy.active_connections == 0, 10, "the proxy to end the connection")
            assert proxy.dropped_bytes > 0
            writer.close()
        assert proxy_tasks() == []
    assert proxy.errors == 1


async def test_exit_while_a_write_waits_for_its_destination() -> None:
    async with tcp_server(stream_until_cancelled) as port:
        proxy = LinkProxy("127.0.0.1", port, UNLIMITED, UNLIMITED, seed=4)
        async with proxy:
            _, writer = await asyncio.open_connection(*proxy.address)  # and never reads
            await wait_until(lambda: proxy.write_waits > 0, 20, "the client's buffers to fill")
            exit_started = asyncio.get_running_loop().time()
        assert asyncio.get_running_loop().time() - exit_started < proxy.write_timeout_s
        assert proxy_tasks() == []
        writer.close()
    assert proxy.errors == 0


def test_an_unused_proxy_has_measured_nothing() -> None:
    proxy = LinkProxy("127.0.0.1", 1, LINK, UNLIMITED, seed=5)
    assert proxy.timing_stats() == LatenessSketch()
    assert proxy.timing_stats().quantile(0.99) is None
