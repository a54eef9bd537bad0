"""Tests of the LinkParameters fields added for netem/Mahimahi features: validation and description."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from channel.errors import ChannelError
from channel.link import LinkModel, LinkParameters
from channel.loss import GilbertElliottLoss
from channel.outage import RandomOutages, ScheduledOutage
from channel.trace import parse_rate_csv


def test_defaults_leave_the_description_unchanged() -> None:
    assert LinkParameters(rate_bps=50_000, delay_s=0.1, jitter_s=0.01, loss=0.01).description == (
        "50 kbit/s, 100 ms ± 10 ms, 1.00% loss"
    )


def test_description_covers_every_new_field() -> None:
    params = LinkParameters(
        rate_bps=None,
        trace=parse_rate_csv("0,50kbit\n10,100kbit\n", name="cell.csv"),
        delay_s=0.1,
        jitter_s=0.02,
        delay_distribution="pareto",
        loss_model=GilbertElliottLoss(p=0.02, r=0.3),
        duplicate=0.01,
        reorder=0.25,
        outages=[{"at_s": 10, "duration_s": 5}],
        random_outages={"mean_up_s": 60, "mean_down_s": 5},
    )
    assert params.description == (
        "rate trace cell.csv (mean 50 kbit/s, 2 steps), 100 ms ± 20 ms (pareto), "
        "GE loss 6.25% (p=0.02, r=0.3, 1-h=1, 1-k=0; mean burst 3.3), 1.00% duplicate, 25.00% reorder, "
        "outage at 10 s for 5 s, random outages (mean up 60 s, down 5 s)"
    )
    assert params.outages == (ScheduledOutage(10, 5),)
    assert params.random_outages == RandomOutages(60, 5)
    many = LinkParameters(rate_bps=None, outages=[{"at_s": i, "duration_s": 0.5} for i in range(5)])
    assert many.description.endswith("outage at 2 s for 0.5 s, 2 more outages")


def test_parameters_stay_hashable_and_comparable() -> None:
    a = LinkParameters(rate_bps=1e6, loss_model=GilbertElliottLoss(p=0.1, r=0.5), outages=[{"at_s": 1, "duration_s": 1}])
    b = LinkParameters(rate_bps=1e6, loss_model=GilbertElliottLoss(p=0.1, r=0.5), outages=[ScheduledOutage(1, 1)])
    assert a == b and hash(a) == hash(b)
    assert dataclasses.replace(a, rate_bps=2e6).loss_model == a.loss_model


def test_normal_delay_through_transmit_is_seeded() -> None:
    params = LinkParameters(rate_bps=1e6, delay_s=0.05, jitter_s=0.02, delay_distribution="normal")
    runs = [[LinkModel(params, np.random.default_rng(6)).transmit(i * 0.01, 1000) for i in range(50)] for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delay_distribution": "gamma"}, "delay_distribution='gamma'"),
        ({"delay_distribution": 3}, "delay_distribution=3"),
        ({"loss_model": GilbertElliottLoss(p=0.1, r=0.5), "loss": 0.1}, "loss_model="),
        ({"duplicate": 2.0}, "duplicate=2.0"),
        ({"reorder": 1.0}, "reorder=1.0"),
        ({"outages": [{"at_s": 1.0}]}, r"outages\[0\]"),
        ({"random_outages": {"mean_up_s": 1.0, "mean_down_s": -1.0}}, "mean_down_s=-1.0"),
        ({"rate_bps": 1e6, "trace": parse_rate_csv("0,1mbit\n")}, "trace="),
    ],
)
def test_bad_new_parameters_raise_naming_the_field(kwargs: dict[str, object], field: str) -> None:
    kwargs = {"rate_bps": None, **kwargs}
    with pytest.raises(ChannelError, match=field):
        LinkParameters(**kwargs)  # type: ignore[arg-type]


def test_a_new_stream_is_not_held_back_by_the_previous_ones_retransmissions() -> None:
    import numpy as np

    from channel.link import LinkModel, LinkParameters

    params = LinkParameters(rate_bps=1_000_000, delay_s=0.01, outages=[{"at_s": 0.0, "duration_s": 2.0}])
    model = LinkModel(params, np.random.default_rng(0))
    held_back = model.transmit(0.0, 1000)  # sent into the outage: resent on the RTO schedule
    assert held_back > 2.0
    model.new_stream(2.5)  # that connection was reset; a new one starts after the outage
    fresh = model.transmit(2.5, 1000)
    assert fresh == pytest.approx(2.5 + 0.01 + 1040 * 8 / 1_000_000, abs=1e-6)
