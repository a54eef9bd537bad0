"""The packet-level bottleneck's drop-tail queue (LinkParameters.queue_bytes): sizing, drops, accounting."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkModel, LinkParameters


def model(params: LinkParameters, seed: int = 0) -> LinkModel:
    return LinkModel(params, np.random.default_rng(seed))


def test_queue_is_unbounded_unless_given() -> None:
    assert LinkParameters(rate_bps=100_000).queue_capacity_bytes is None
    assert LinkParameters(rate_bps=100_000, queue_bytes=50_000).queue_capacity_bytes == 50_000
    assert LinkParameters(rate_bps=None, queue_bytes=50_000).queue_capacity_bytes is None  # nothing waits
    link = model(LinkParameters(rate_bps=100_000))
    assert all(link.packet_fates(0.0, 1500) for _ in range(1000)) and link.counters.queue_drops == 0


def test_queue_smaller_than_a_packet_is_rejected() -> None:
    with pytest.raises(ChannelError, match="queue_bytes"):
        LinkParameters(rate_bps=100_000, queue_bytes=1000)


def test_a_burst_beyond_the_queue_is_tail_dropped_without_using_capacity() -> None:
    link = model(LinkParameters(rate_bps=100_000, queue_bytes=3 * 1500))
    fates = [link.packet_fates(0.0, 1500) for _ in range(11)]
    # the first leaves at once (the bucket holds one packet), three wait, the other seven are dropped
    assert [len(fate) for fate in fates] == [1, 1, 1, 1] + [0] * 7
    assert [fate[0] for fate in fates[:4]] == pytest.approx([0.0, 0.12, 0.24, 0.36])
    counters = link.counters
    assert counters.queue_drops == 7 and counters.lost_segments == 0
    assert counters.wire_bytes == 4 * 1500  # dropped packets cost no airtime
    # once the head has left there is room again: the next packet departs right after the last accepted one
    assert link.packet_fates(0.13, 1500) == [pytest.approx(0.48)]


def test_the_tcp_stream_view_has_no_queue() -> None:
    link = model(LinkParameters(rate_bps=100_000, queue_bytes=1500))
    assert [link.transmit(0.0, 1460) for _ in range(5)] == pytest.approx([0.0, 0.12, 0.24, 0.36, 0.48])
    assert link.counters.queue_drops == 0


@settings(max_examples=200, deadline=None)
@given(
    rate_bps=st.sampled_from([10_000, 100_000, 1_000_000]),
    queue_packets=st.integers(min_value=1, max_value=8),
    arrivals=st.lists(st.tuples(st.floats(min_value=0.0, max_value=0.5), st.integers(min_value=40, max_value=1500)),
                      min_size=1, max_size=60),
    loss=st.sampled_from([0.0, 0.2]),
)
def test_queued_bytes_never_exceed_the_queue_and_every_packet_is_accounted(
        rate_bps: int, queue_packets: int, arrivals: list[tuple[float, int]], loss: float) -> None:
    params = LinkParameters(rate_bps=rate_bps, loss=loss, queue_bytes=queue_packets * 1500)
    link = model(params, seed=len(arrivals))
    now, accepted = 0.0, []  # (departure, size) of packets through the shaper
    delivered = 0
    for gap, size in arrivals:
        now += gap
        fates = link.packet_fates(now, size)
        assert len(fates) <= 1
        if fates:
            delivered += 1
            accepted.append((fates[0], size))  # no delay: arrival = departure
            waiting = sum(bytes_ for departure, bytes_ in accepted if departure > now)
            assert waiting <= params.queue_bytes
            assert fates[0] >= now
    counters = link.counters
    assert delivered + counters.queue_drops + counters.lost_segments == len(arrivals)
    assert counters.wire_bytes == sum(size for _, size in accepted)
    departures = [departure for departure, _ in accepted]
    assert departures == sorted(departures)  # FIFO


@settings(max_examples=50, deadline=None)
@given(burst=st.integers(min_value=1, max_value=40), queue_packets=st.integers(min_value=1, max_value=10))
def test_a_paced_sender_is_never_dropped(burst: int, queue_packets: int) -> None:
    """Packets handed over no faster than the rate never fill the queue, however small it is."""
    link = model(LinkParameters(rate_bps=100_000, queue_bytes=queue_packets * 1500))
    for index in range(burst):
        assert link.packet_fates(index * 0.12, 1500) != []
    assert link.counters.queue_drops == 0
