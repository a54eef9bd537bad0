"""Loss recovery of a cell's flows (SharedLink.send/decide): each flow's fast retransmit and tail-loss RTOs, as on one link."""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Hashable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkParameters
from channel.recovery import DUPLICATE_ACK_THRESHOLD, Recovery
from channel.shared import SharedLink
from testbed.links import DeviceLinks
from tests.channel.test_recovery import ScriptedDraws
from tests.faults.matrix import fault_scenario


def recorded(link: SharedLink, *flows: Hashable) -> SharedLink:
    for flow in flows:
        link.recovery(flow).recoveries = []
    return link


def carry(link: SharedLink, handovers: list[tuple[float, Hashable, int]]) -> dict[Hashable, list[float]]:
    """Send every (time, flow, size), then let each flow's time run until its segments are decided."""
    deliveries: dict[Hashable, list[float]] = defaultdict(list)
    for now, flow, size in handovers:
        deliveries[flow] += link.send(flow, now, size)
    for flow in sorted(link.flows, key=str):
        while (due := link.next_decision_s(flow)) is not None:
            deliveries[flow] += link.decide(flow, due)
    return dict(deliveries)


def test_a_flows_loss_with_three_later_segments_of_its_own_is_resent_one_round_trip_after() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.05, loss=0.5)
    link = recorded(SharedLink(params, ScriptedDraws([True] + [False] * 8)), "a")  # type: ignore[arg-type]
    assert link.send("a", 0.0, 100) == []
    assert link.send("b", 0.005, 100) == pytest.approx([0.055])  # b is not held behind a's hole
    assert link.send("a", 0.01, 100) == [] and link.send("a", 0.02, 100) == []
    assert link.send("a", 0.03, 100) == pytest.approx([0.18] * 4)  # third later arrival 0.08, resent 0.13
    assert link.recovery("a").recoveries == [Recovery(0, 0.0, pytest.approx(0.13), "fast", 3)]
    assert link.flow_counters("a").lost_segments == 1 and link.flow_counters("b").lost_segments == 0


def test_other_flows_arrivals_are_no_duplicate_acks_of_a_flows_hole() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.05, loss=0.5)
    link = recorded(SharedLink(params, ScriptedDraws([True] + [False] * 8)), "a")  # type: ignore[arg-type]
    link.send("a", 0.0, 100)
    for index in range(5):
        link.send("b", 0.01 * (index + 1), 100)
    assert link.next_decision_s("a") == pytest.approx(0.2) and link.next_decision_s("b") is None
    assert link.decide("a", 0.2) == pytest.approx([0.25])  # a tail loss of its own flow: resent at its RTO
    assert link.recovery("a").recoveries[0].kind == "timeout"


def test_rto_recovery_through_send_is_transmit() -> None:
    params = LinkParameters(rate_bps=200e3, delay_s=0.05, jitter_s=0.01, loss=0.1, recovery="rto")
    handovers = [(0.01 * i, "ab"[i % 2], 1000) for i in range(300)]
    by_send = carry(SharedLink(params, np.random.default_rng(3)), handovers)
    by_transmit = SharedLink(params, np.random.default_rng(3))
    expected: dict[Hashable, list[float]] = defaultdict(list)
    for now, flow, size in handovers:
        expected[flow].append(by_transmit.transmit(flow, now, size))
    assert by_send == expected


def test_transmit_refuses_while_send_left_a_flows_segments_undecided() -> None:
    link = SharedLink(LinkParameters(rate_bps=None, loss=0.5), ScriptedDraws([True]))  # type: ignore[arg-type]
    link.send("a", 0.0, 100)
    assert link.transmit("b", 0.1, 100) == pytest.approx(0.1)  # another flow is free to
    with pytest.raises(ChannelError, match=r"^transmit at 0.1: 1 segments of flow 'a' sent with 'send' are undecided"):
        link.transmit("a", 0.1, 100)


def test_a_new_stream_drops_only_that_flows_undecided_segments() -> None:
    link = SharedLink(LinkParameters(rate_bps=None, loss=0.5),
                      ScriptedDraws([True, True, False, False]))  # type: ignore[arg-type]
    link.send("a", 0.0, 100)
    link.send("b", 0.0, 100)
    link.new_stream("a", 0.1)
    assert link.next_decision_s("a") is None and link.send("a", 0.1, 100) == [0.1]
    assert link.next_decision_s("b") == pytest.approx(0.2)


flows = st.lists(st.tuples(st.floats(0.0, 0.05), st.sampled_from("abc"), st.integers(1, 1460)),
                 min_size=1, max_size=200)


@settings(max_examples=150, deadline=None)
@given(rate=st.sampled_from([None, 20e3, 1e6, 10e6]), delay=st.floats(0.0, 0.2), jitter_share=st.floats(0.0, 1.0),
       loss=st.floats(0.0, 0.4), recovery=st.sampled_from(["fast", "rto"]), gaps=flows,
       seed=st.integers(0, 2**32 - 1))
def test_schedule_invariants_per_flow(rate: float | None, delay: float, jitter_share: float, loss: float,
                                      recovery: str, gaps: list[tuple[float, str, int]], seed: int) -> None:
    params = LinkParameters(rate_bps=rate, delay_s=delay, jitter_s=delay * jitter_share, loss=loss,
                            recovery=recovery)
    handovers, now = [], 0.0
    for gap, flow, size in gaps:
        now += gap
        handovers.append((now, flow, size))
    link = recorded(SharedLink(params, np.random.default_rng(seed)), "a", "b", "c")
    deliveries = carry(link, handovers)
    for flow in link.flows:
        handed = [(when, size) for when, flow_id, size in handovers if flow_id == flow]
        delivered = deliveries.get(flow, [])
        # every segment of the flow delivered once, in order, never before it was handed over
        assert len(delivered) == len(handed)
        assert all(later >= earlier for earlier, later in zip(delivered, delivered[1:]))
        assert all(delivery >= when for delivery, (when, _) in zip(delivered, handed))
        assert link.flow_counters(flow).payload_bytes == sum(size for _, size in handed)
        recoveries = link.recovery(flow).recoveries or []
        if recovery == "rto":
            assert recoveries == []  # decided at once, no hole left for recovery
            continue
        assert len(recoveries) == link.flow_counters(flow).lost_segments
        for lost in recoveries:
            waited = lost.resend_s - lost.lost_departure_s
            if lost.kind == "fast":  # three later arrivals of this flow, about one round trip
                assert lost.later_arrivals == DUPLICATE_ACK_THRESHOLD
                assert waited >= 2 * params.delay_s - params.jitter_s - 1e-9
            else:  # an RTO only for a tail loss of this flow
                assert lost.later_arrivals < DUPLICATE_ACK_THRESHOLD
                backoff = math.log2(waited / params.rto_s)
                assert backoff == pytest.approx(round(backoff), abs=1e-6)
    # the flows' counters add up to the bottleneck's, and the same seed gives the same schedule
    assert sum(link.flow_counters(flow).wire_bytes for flow in link.flows) == link.counters.wire_bytes
    assert carry(SharedLink(params, np.random.default_rng(seed)), handovers) == deliveries


@pytest.mark.parametrize(("flows", "rto_at_most"), [("a", 0.6), ("abc", 0.95)])
def test_fast_recovery_keeps_window_limited_flows_near_the_rate(flows: str, rto_at_most: float) -> None:
    """10 Mbit/s, 1% loss, each flow keeping 16 segments undelivered: fast recovery carries near the rate; with RTO
    recovery a lone flow idles for an RTO per loss, and other flows fill only part of that time."""
    params = LinkParameters(rate_bps=10e6, delay_s=0.0, loss=0.01)
    goodput = params.goodput_bps
    assert goodput is not None
    fast = window_limited_goodput_bps(SharedLink(params, np.random.default_rng(5)), 16, 10.0, flows)
    rto = window_limited_goodput_bps(SharedLink(dataclasses.replace(params, recovery="rto"),
                                                np.random.default_rng(5)), 16, 10.0, flows)
    assert fast >= 0.95 * goodput and rto <= rto_at_most * goodput


def window_limited_goodput_bps(link: SharedLink, window: int, duration_s: float, flows: str = "abc") -> float:
    """Each flow keeps ``window`` full segments undelivered, handing a new one over as each is delivered (or its
    RTO is due), until ``duration_s``; the payload rate delivered by then, all flows together."""
    deliveries: list[tuple[float, str]] = []
    clock = dict.fromkeys(flows, 0.0)

    def hand_out(flow: str, decided: list[float]) -> None:
        deliveries.extend((delivery, flow) for delivery in decided)

    for flow in flows:
        for _ in range(window):
            hand_out(flow, link.send(flow, 0.0, 1460))
    delivered_bytes = 0
    while True:
        deliveries.sort(reverse=True)
        due = [(when, flow) for flow in flows if (when := link.next_decision_s(flow)) is not None]
        next_delivery = deliveries[-1] if deliveries else None
        next_due = min(due) if due else None
        if next_delivery is not None and (next_due is None or next_delivery <= next_due):
            when, flow = deliveries.pop()
            if when > duration_s:
                break
            delivered_bytes += 1460
            clock[flow] = max(clock[flow], when)
            hand_out(flow, link.send(flow, clock[flow], 1460))
        elif next_due is not None and next_due[0] <= duration_s:
            when, flow = next_due
            clock[flow] = max(clock[flow], when)
            hand_out(flow, link.decide(flow, clock[flow]))
        else:
            break
    return delivered_bytes * 8 / duration_s


def test_a_cell_takes_its_recovery_from_the_scenario() -> None:
    scenario = fault_scenario([], channel={"downlink": {"rate": "200kbit", "recovery": "rto"}, "cells": [
        {"name": "tower", "devices": ["rpi4-0", "rpi4-1"], "uplink": {"rate": "50kbit"}}]})
    links = DeviceLinks(scenario.channel, scenario.seed)
    assert [params.recovery for params in links.parameters("rpi4-0")] == ["rto", "fast"]
    proxy = links.open("rpi4-1", ("127.0.0.1", 1), seed=0)
    assert (proxy.downlink.recovery, proxy.uplink.recovery) == ("rto", "fast")
