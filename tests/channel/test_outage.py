"""Tests of scheduled and random outages (channel.outage) in both link semantics."""

from __future__ import annotations

import numpy as np
import pytest

from channel.errors import ChannelError
from channel.link import MAX_RTO_S, LinkModel, LinkParameters
from channel.outage import OutageTimeline, RandomOutages, ScheduledOutage


def model(params: LinkParameters, seed: int = 0) -> LinkModel:
    return LinkModel(params, np.random.default_rng(seed))


def test_stream_bytes_wait_for_the_end_of_the_outage_on_the_rto_schedule() -> None:
    link = model(LinkParameters(rate_bps=None, delay_s=0.01, outages=[{"at_s": 1.0, "duration_s": 2.0}]))
    assert link.transmit(0.0, 100) == pytest.approx(0.01)  # first use: the epoch is 0
    # handed over at 1.5 (link down 1..3): attempts at 1.5, 1.7, 2.1, 2.9 are lost, 4.5 gets through
    assert link.transmit(1.5, 100) == pytest.approx(1.5 + 0.2 + 0.4 + 0.8 + 1.6 + 0.01)
    assert link.counters.outage_losses == 4
    assert link.counters.retransmissions == 4
    # a segment in flight when the outage starts is lost too: departs 0.995, would arrive 1.005
    late = model(LinkParameters(rate_bps=None, delay_s=0.01, outages=[{"at_s": 1.0, "duration_s": 2.0}]))
    late.transmit(0.0, 100)
    assert late.transmit(0.995, 100) >= 3.0


def test_stream_delivers_nothing_inside_an_outage_and_resumes_after() -> None:
    params = LinkParameters(rate_bps=200_000, delay_s=0.05, jitter_s=0.01, loss=0.02,
                            outages=[ScheduledOutage(at_s=2.0, duration_s=3.0)])
    link = model(params, seed=4)
    deliveries = [link.transmit(i * 0.01, 1000) for i in range(1000)]  # 10 s of handovers
    assert not any(2.0 <= t < 5.0 for t in deliveries)
    assert any(t >= 5.0 for t in deliveries) and any(t < 2.0 for t in deliveries)
    first_after = min(t for t in deliveries if t >= 5.0)
    assert first_after <= 5.0 + MAX_RTO_S
    assert link.outage_at(3.0) == (2.0, 5.0)
    assert link.outage_at(5.0) is None and link.outage_at(1.99) is None


def test_long_outage_backoff_is_capped_at_max_rto() -> None:
    link = model(LinkParameters(rate_bps=None, outages=[{"at_s": 0.0, "duration_s": 1000.0}]))
    delivered = link.transmit(0.0, 100)
    assert 1000.0 <= delivered <= 1000.0 + MAX_RTO_S


def test_packets_are_dropped_inside_an_outage() -> None:
    link = model(LinkParameters(rate_bps=None, delay_s=0.02, outages=[{"at_s": 1.0, "duration_s": 1.0}]))
    fates = {round(t, 2): link.packet_fates(t, 500) for t in np.arange(0.0, 3.0, 0.01)}
    assert fates[0.5] == [pytest.approx(0.52)]
    assert fates[1.5] == [] and fates[0.99] == []  # 0.99 would still be in flight at 1.0
    assert fates[2.0] == [pytest.approx(2.02)]
    assert link.counters.outage_losses == sum(1 for f in fates.values() if not f)


def test_outage_times_count_from_first_use() -> None:
    link = model(LinkParameters(rate_bps=None, outages=[{"at_s": 10.0, "duration_s": 5.0}]))
    assert link.outage_at(112.0) is None  # not used yet
    link.transmit(100.0, 10)
    assert link.epoch_s == 100.0
    assert link.outage_at(112.0) == (110.0, 115.0)
    assert link.outage_at(109.0) is None


def test_overlapping_outages_merge() -> None:
    timeline = OutageTimeline(0.0, (ScheduledOutage(1, 2), ScheduledOutage(2.5, 2), ScheduledOutage(10, 1)), None, None)
    assert timeline.outage_at(2.7) == (1.0, 4.5)
    assert timeline.overlapping(5.0, 9.9) is None
    assert timeline.overlapping(5.0, 10.0) == (10.0, 11.0)


def test_random_outages_availability_and_determinism() -> None:
    random = RandomOutages(mean_up_s=20.0, mean_down_s=5.0)
    params = LinkParameters(rate_bps=None, random_outages=random)
    link = model(params, seed=11)
    link.packet_fates(0.0, 100)
    grid = np.arange(0.0, 20_000.0, 0.5)
    down = np.array([link.outage_at(float(t)) is not None for t in grid])
    # ~800 up/down cycles: the down fraction is within a few percent of 5 / 25
    assert down.mean() == pytest.approx(1 - random.availability, abs=0.03)
    # the same seed gives the same timeline whatever the query order
    other = model(params, seed=11)
    other.packet_fates(0.0, 100)
    assert [other.outage_at(float(t)) for t in grid[::-1][:2000]] == [link.outage_at(float(t)) for t in grid[::-1][:2000]]
    assert model(params, seed=12).outage_at(0.0) is None


def test_random_outages_drop_packets_and_same_seed_same_fates() -> None:
    params = LinkParameters(rate_bps=1_000_000, delay_s=0.01, random_outages={"mean_up_s": 1.0, "mean_down_s": 0.5})
    runs = []
    for _ in range(2):
        link = model(params, seed=3)
        runs.append([link.packet_fates(i * 0.001, 200) for i in range(5000)])
        for t, fate in zip((i * 0.001 for i in range(5000)), runs[-1]):
            if fate:
                assert link.outage_at(fate[0]) is None
    assert runs[0] == runs[1]
    assert 0.15 < sum(1 for f in runs[0] if not f) / 5000 < 0.6


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outages": [{"at_s": -1.0, "duration_s": 1.0}]}, r"outages\[0\].*at_s=-1.0"),
        ({"outages": [{"at_s": 1.0, "duration_s": 0.0}]}, r"outages\[0\].*duration_s=0.0"),
        ({"outages": [{"at_s": 1.0, "duration_s": 1.0}, {"at": 1.0}]}, r"outages\[1\]"),
        ({"outages": {"at_s": 1.0, "duration_s": 1.0}}, r"LinkParameters.outages=.*expected a list"),
        ({"random_outages": {"mean_up_s": 0.0, "mean_down_s": 1.0}}, r"random_outages.*mean_up_s=0.0"),
        ({"random_outages": {"mean_up": 1.0}}, r"LinkParameters.random_outages="),
        ({"random_outages": 5}, r"LinkParameters.random_outages=5"),
    ],
)
def test_bad_outage_parameters_name_the_field(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ChannelError, match=message):
        LinkParameters(rate_bps=None, **kwargs)  # type: ignore[arg-type]


def test_an_outage_added_while_the_link_runs_holds_segments_until_it_ends() -> None:
    model = LinkModel(LinkParameters(rate_bps=None, delay_s=0.01), np.random.default_rng(1))
    assert model.transmit(100.0, 500) == pytest.approx(100.01)
    model.add_outage(101.0, 104.0)
    assert model.outage_at(102.0) == (101.0, 104.0) and model.outage_at(104.5) is None
    assert model.transmit(102.0, 500) >= 104.0  # handed over in the outage: resent after it
    assert model.transmit(105.0, 500) == pytest.approx(105.01)


def test_an_outage_is_added_to_a_link_that_never_ran_and_bad_ones_are_refused() -> None:
    model = LinkModel(LinkParameters(rate_bps=None, delay_s=0.0), np.random.default_rng(1))
    model.add_outage(5.0, 6.0)
    assert model.outage_at(5.5) == (5.0, 6.0)
    with pytest.raises(ChannelError):
        model.add_outage(7.0, 7.0)


def test_a_link_reconfigured_while_it_runs_carries_what_follows_with_its_new_parameters() -> None:
    model = LinkModel(LinkParameters(rate_bps=8_000, delay_s=0.0, overhead_bytes=0), np.random.default_rng(1))
    model.transmit(0.0, 1000)  # 1 s at 8 kbit/s (after the bucket's depth)
    model.reconfigure(LinkParameters(rate_bps=None, delay_s=0.5), 10.0)
    assert model.transmit(10.0, 1000) == pytest.approx(10.5)
    model.reconfigure(LinkParameters(rate_bps=None, delay_s=0.0, outages=[{"at_s": 1.0, "duration_s": 2.0}]), 20.0)
    assert model.outage_at(21.5) == (21.0, 23.0)
