"""The proxy recovers losses as the link model decides: fast retransmission in a bulk, the RTO for a tail loss."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from channel.link import LinkModel, LinkParameters
from channel.proxy import TIMER_SLACK_S, LinkProxy
from tests.channel.test_proxy import UNLIMITED, blast_on_request, echo, tcp_server, wait_until

BULK_BYTES = 600_000
LOSSY = LinkParameters(rate_bps=10_000_000, delay_s=0.005, loss=0.03)  # 0.5 s of airtime, ~12 losses


async def bulk(link: LinkParameters) -> tuple[float, LinkProxy]:
    """Carry BULK_BYTES downlink through a proxy of ``link``: the seconds it took and the (closed) proxy."""
    loop = asyncio.get_running_loop()
    async with tcp_server(blast_on_request(BULK_BYTES)) as port, \
            LinkProxy("127.0.0.1", port, link, UNLIMITED, seed=3) as proxy:
        reader, writer = await asyncio.open_connection(*proxy.address)
        start = loop.time()
        writer.write(b"g")
        received = await asyncio.wait_for(reader.readexactly(BULK_BYTES), 60)
        elapsed = loop.time() - start
        writer.close()
        await writer.wait_closed()
        assert len(received) == BULK_BYTES
        segments = proxy.downlink_counters.segments + proxy.uplink_counters.segments
        await wait_until(lambda: proxy.lateness.count == segments, 10, "every segment's release")
    assert proxy.errors == 0
    return elapsed, proxy


async def test_fast_recovery_carries_a_lossy_bulk_in_a_fraction_of_the_rto_time() -> None:
    fast_s, fast = await bulk(LOSSY)
    rto_s, rto = await bulk(dataclasses.replace(LOSSY, recovery="rto"))
    fast_model, rto_model = fast.downlink_model, rto.downlink_model
    assert isinstance(fast_model, LinkModel) and isinstance(rto_model, LinkModel)
    assert fast.downlink_counters.lost_segments >= 5 and rto.downlink_counters.lost_segments >= 5
    assert fast_model.recovery.fast_retransmits >= 1 and rto_model.recovery.fast_retransmits == 0
    # rto: every loss idles the link for 200 ms (>= 1 s in all); fast: the airtime plus a few round trips.
    # A busy machine makes both later, not the rto run faster.
    assert rto_s >= 0.2 * rto.downlink_counters.lost_segments
    assert fast_s < rto_s / 2, (fast_s, rto_s)
    # the timing accounting still sees every segment, late or not
    assert fast.timing_stats().count == fast.downlink_counters.segments + fast.uplink_counters.segments


def seed_losing_the_first_segment(link: LinkParameters) -> int:
    """A proxy seed whose downlink model loses its first segment (the proxy seeds downlink from [seed, 0])."""
    for seed in range(1000):
        if LinkModel(link, np.random.default_rng([seed, 0])).send(0.0, 5) == []:
            return seed
    raise AssertionError("no seed loses the first segment")


async def echo_round_trip(proxy: LinkProxy) -> float:
    """Seconds for 5 bytes to come back through ``proxy`` (to an echo server) on a new connection."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(*proxy.address)
    start = loop.time()
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 10) == b"hello"
    elapsed = loop.time() - start
    writer.close()
    await writer.wait_closed()
    return elapsed


async def test_a_lost_reply_with_nothing_after_it_comes_after_the_rto() -> None:
    link = LinkParameters(rate_bps=None, delay_s=0.01, loss=0.5)  # rto 200 ms
    seed = seed_losing_the_first_segment(link)
    async with tcp_server(echo) as port, LinkProxy("127.0.0.1", port, link, UNLIMITED, seed=seed) as proxy:
        elapsed = await echo_round_trip(proxy)
        model = proxy.downlink_model
        assert isinstance(model, LinkModel)
        # the reply was lost; nothing followed it, so its RTO resent it (the proxy woke for that decision)
        assert model.recovery.timeout_retransmits >= 1 and model.recovery.fast_retransmits == 0
        assert elapsed >= link.rto_s + link.delay_s - TIMER_SLACK_S
        assert proxy.timing_stats().count == 2  # the request and the reply
