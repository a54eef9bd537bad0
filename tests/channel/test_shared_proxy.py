"""Proxies carrying a cell's flows over real TCP: each device's losses recovered as its flow decides, a tail loss after
its RTO (the proxy wakes for that flow's decision), a lossy bulk of two devices at once delivered whole."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np

from channel.link import LinkParameters
from channel.proxy import TIMER_SLACK_S, LinkProxy
from channel.shared import SharedLink
from tests.channel.test_proxy import UNLIMITED, blast_on_request, echo, tcp_server
from tests.channel.test_proxy_recovery import echo_round_trip


def cell(downlink: LinkParameters, seed: int) -> tuple[SharedLink, SharedLink]:
    return SharedLink(downlink, np.random.default_rng([seed, 0])), SharedLink(UNLIMITED, np.random.default_rng([seed, 1]))


def seed_losing_the_first_segment(link: LinkParameters) -> int:
    """A seed whose cell downlink loses the first segment handed to it."""
    for seed in range(1000):
        if cell(link, seed)[0].send("probe", 0.0, 5) == []:
            return seed
    raise AssertionError("no seed loses the first segment")


async def test_a_lost_reply_to_one_member_with_nothing_after_it_comes_after_its_rto() -> None:
    link = LinkParameters(rate_bps=None, delay_s=0.01, loss=0.5)  # rto 200 ms
    downlink, uplink = cell(link, seed_losing_the_first_segment(link))
    async with tcp_server(echo) as port, \
            LinkProxy("127.0.0.1", port, downlink_model=downlink.flow("a"), uplink_model=uplink.flow("a")) as proxy:
        elapsed = await echo_round_trip(proxy)
    recovery = downlink.recovery("a")
    assert recovery.timeout_retransmits >= 1 and recovery.fast_retransmits == 0  # (a resend may be lost again)
    assert elapsed >= link.rto_s + link.delay_s - TIMER_SLACK_S
    assert proxy.errors == 0


async def test_two_members_lossy_bulks_arrive_whole_with_fast_recovery_per_flow() -> None:
    size = 400_000
    link = LinkParameters(rate_bps=10_000_000, delay_s=0.005, loss=0.03)
    downlink, uplink = cell(link, 4)
    async with tcp_server(blast_on_request(size)) as port, \
            LinkProxy("127.0.0.1", port, name="a", downlink_model=downlink.flow("a"),
                      uplink_model=uplink.flow("a")) as first, \
            LinkProxy("127.0.0.1", port, name="b", downlink_model=downlink.flow("b"),
                      uplink_model=uplink.flow("b")) as second:
        async def fetch(proxy: LinkProxy) -> bytes:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"g")
            try:
                return await asyncio.wait_for(reader.readexactly(size), 60)
            finally:
                writer.close()
                await writer.wait_closed()

        received = await asyncio.gather(fetch(first), fetch(second))
    assert [len(data) for data in received] == [size, size]
    assert first.errors == second.errors == 0
    for flow in ("a", "b"):
        counters, recovery = downlink.flow_counters(flow), downlink.recovery(flow)
        assert counters.lost_segments >= 3, flow
        assert recovery.fast_retransmits + recovery.timeout_retransmits == counters.lost_segments
        assert recovery.fast_retransmits >= 1
    assert dataclasses.astuple(downlink.counters)[:2] == (
        downlink.flow_counters("a").segments + downlink.flow_counters("b").segments,
        downlink.flow_counters("a").payload_bytes + downlink.flow_counters("b").payload_bytes)
