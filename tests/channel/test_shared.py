"""Tests of SharedLink (channel.shared): several flows behind one bottleneck."""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from channel.errors import ChannelError
from channel.link import LinkParameters
from channel.loss import GilbertElliottLoss
from channel.shared import SharedLink


class ScriptedRng:
    def __init__(self, randoms: list[float]) -> None:
        self.randoms = list(randoms)

    def random(self) -> float:
        return self.randoms.pop(0) if self.randoms else 1.0


def saturate(link: SharedLink, flows: list[str], window: int, duration_s: float) -> dict[str, int]:
    """ACK-clocked senders: each flow keeps ``window`` full segments in flight until ``duration_s``.

    Returns the payload bytes each flow had delivered by ``duration_s``.
    """
    events: list[tuple[float, int, str]] = []
    order = 0
    for flow in flows:
        for _ in range(window):
            heapq.heappush(events, (link.transmit(flow, 0.0, 1460), order, flow))
            order += 1
    delivered = dict.fromkeys(flows, 0)
    while events:
        when, _, flow = heapq.heappop(events)
        if when > duration_s:
            break
        delivered[flow] += 1460
        heapq.heappush(events, (link.transmit(flow, when, 1460), order, flow))
        order += 1
    return delivered


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_two_saturating_flows_split_the_rate(loss: float) -> None:
    params = LinkParameters(rate_bps=1_000_000, delay_s=0.02, jitter_s=0.005, loss=loss)
    link = SharedLink(params, np.random.default_rng(1))
    duration = 30.0
    delivered = saturate(link, ["a", "b"], window=10, duration_s=duration)
    goodput = params.goodput_bps
    assert goodput is not None
    rates = {flow: bytes_ * 8 / duration for flow, bytes_ in delivered.items()}
    total = sum(rates.values())
    assert total <= goodput * 1.001  # the bottleneck is never exceeded
    assert total >= goodput * (0.9 if loss == 0 else 0.6)  # and is kept busy
    for rate in rates.values():
        assert rate == pytest.approx(total / 2, rel=0.1)


def test_each_flow_keeps_in_order_delivery_and_rates_add_up() -> None:
    params = LinkParameters(rate_bps=2_000_000, delay_s=0.05, jitter_s=0.03, loss=0.05)
    link = SharedLink(params, np.random.default_rng(4))
    last: dict[int, float] = {}
    for i in range(6000):
        flow = i % 3
        delivered = link.transmit(flow, i * 0.001, 1000)
        assert delivered >= last.get(flow, -1.0)
        last[flow] = delivered
    assert link.flows == [0, 1, 2]
    assert link.flow_payload_bytes == {0: 2_000_000, 1: 2_000_000, 2: 2_000_000}
    elapsed = max(last.values())
    # every wire byte went through the one bucket: at most depth + rate * elapsed
    assert link.counters.wire_bytes <= params.bucket_depth_bytes + 2_000_000 / 8 * elapsed


def test_one_flows_retransmission_does_not_stall_the_other() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.01, loss=0.5)
    link = SharedLink(params, ScriptedRng([0.0]))  # type: ignore[arg-type]  # first attempt lost
    assert link.transmit("a", 0.0, 100) == pytest.approx(0.21)  # resent after the 200 ms RTO
    assert link.transmit("b", 0.001, 100) == pytest.approx(0.011)  # b is not held behind a's resend
    assert link.transmit("a", 0.002, 100) == pytest.approx(0.21)  # a's own order is kept
    assert link.last_delivery_s("b") == pytest.approx(0.011)


def test_shared_outage_and_ge_fade_hit_every_flow_and_are_seeded() -> None:
    params = LinkParameters(rate_bps=500_000, delay_s=0.02, loss_model=GilbertElliottLoss(p=0.01, r=0.2),
                            outages=[{"at_s": 1.0, "duration_s": 1.0}])
    runs = []
    for _ in range(2):
        link = SharedLink(params, np.random.default_rng(8))
        runs.append([link.transmit(i % 4, i * 0.002, 500) for i in range(2000)])
        assert link.outage_at(1.5) == (1.0, 2.0)
    assert runs[0] == runs[1]
    assert not any(1.0 <= t < 2.0 for t in runs[0])


def test_bad_segment_is_rejected() -> None:
    link = SharedLink(LinkParameters(rate_bps=None), np.random.default_rng(0))
    with pytest.raises(ChannelError, match="segment size"):
        link.transmit("a", 0.0, 2000)


def test_shared_flow_is_one_flow_of_the_shared_link() -> None:
    params = LinkParameters(rate_bps=1_000_000, delay_s=0.02, loss=0.05)
    direct = SharedLink(params, np.random.default_rng(9))
    shared = SharedLink(params, np.random.default_rng(9))
    flows = {"a": shared.flow("a"), "b": shared.flow("b")}
    assert flows["a"].params is params and flows["a"].flow_id == "a"
    for i in range(400):
        flow = "ab"[i % 2]
        assert flows[flow].transmit(i * 0.001, 1000) == direct.transmit(flow, i * 0.001, 1000)
    assert flows["a"].last_delivery_s == direct.last_delivery_s("a")
    assert flows["a"].shared_counters is shared.counters


def test_flow_counters_are_per_flow_and_add_up_to_the_shared_ones() -> None:
    params = LinkParameters(rate_bps=500_000, delay_s=0.01, loss=0.1)
    shared = SharedLink(params, np.random.default_rng(2))
    a, b = shared.flow("a"), shared.flow("b")
    for i in range(300):
        a.transmit(i * 0.002, 1460)
        if i % 3 == 0:
            b.transmit(i * 0.002, 500)
    assert a.counters.segments == 300 and b.counters.segments == 100
    assert a.counters.payload_bytes == 300 * 1460 and b.counters.payload_bytes == 100 * 500
    assert a.counters.lost_segments > 0 and b.counters.lost_segments > 0
    total = shared.counters
    for name in ("segments", "payload_bytes", "wire_bytes", "lost_segments", "retransmissions"):
        assert getattr(a.counters, name) + getattr(b.counters, name) == getattr(total, name), name
    assert a.counters.queueing_delay_s + b.counters.queueing_delay_s == pytest.approx(total.queueing_delay_s)
    assert shared.flow_payload_bytes == {"a": 300 * 1460, "b": 100 * 500}


def test_new_stream_resets_only_that_flows_in_order_hold_back() -> None:
    params = LinkParameters(rate_bps=None, delay_s=0.01, loss=0.5)
    shared = SharedLink(params, ScriptedRng([0.0]))  # type: ignore[arg-type]  # a's first attempt lost
    a, b = shared.flow("a"), shared.flow("b")
    held = a.transmit(0.0, 100)  # delivered after an RTO
    assert held > 0.2
    b_first = b.transmit(0.0, 100)
    assert a.transmit(0.001, 100) == held  # in order behind the retransmission
    a.new_stream(0.002)
    assert a.transmit(0.002, 100) == pytest.approx(0.012)  # the new connection is not held back
    assert b.last_delivery_s == b_first  # b's stream untouched
    assert b.transmit(0.003, 100) == pytest.approx(0.013)


def test_shared_outages_reach_every_flow() -> None:
    params = LinkParameters(rate_bps=None, outages=({"at_s": 1.0, "duration_s": 2.0},))
    shared = SharedLink(params, np.random.default_rng(0))
    a, b = shared.flow("a"), shared.flow("b")
    a.transmit(0.0, 100)  # the outage timeline starts at the link's first use
    assert a.outage_at(1.5) == b.outage_at(1.5) == (1.0, 3.0)
    assert b.outage_at(0.5) is None
