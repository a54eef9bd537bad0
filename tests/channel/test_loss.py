"""Tests of the loss processes (channel.loss): analytic properties against long seeded runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkModel, LinkParameters
from channel.loss import BernoulliLoss, GilbertElliottLoss

Z95 = 1.96


def loss_sequence(model: BernoulliLoss | GilbertElliottLoss, n: int, seed: int) -> np.ndarray:
    process = model.fresh()
    rng = np.random.default_rng(seed)
    return np.fromiter((process.lost(rng) for _ in range(n)), dtype=bool, count=n)


def batch_interval(numerators: np.ndarray, denominators: np.ndarray) -> tuple[float, float]:
    """Ratio estimate sum(num)/sum(den) and its 95% half-width from batch means (delta method)."""
    ratio = numerators.sum() / denominators.sum()
    residuals = numerators - ratio * denominators
    batches = len(numerators)
    std_error = math.sqrt((residuals**2).sum() / (batches * (batches - 1))) / denominators.mean()
    return float(ratio), Z95 * std_error


def measured_loss_and_burst(lost: np.ndarray, batches: int) -> tuple[tuple[float, float], tuple[float, float]]:
    starts = lost & ~np.concatenate(([False], lost[:-1]))  # a loss right after a non-loss
    loss_counts = lost.reshape(batches, -1).sum(axis=1).astype(float)
    start_counts = starts.reshape(batches, -1).sum(axis=1).astype(float)
    ones = np.full(batches, lost.size / batches)
    return batch_interval(loss_counts, ones), batch_interval(loss_counts, start_counts)


GE_CASES = [
    # simple Gilbert (h = 0, k = 1): mean burst 1/r
    GilbertElliottLoss(p=0.02, r=0.3),
    # general: loss in both states
    GilbertElliottLoss(p=0.01, r=0.1, one_minus_h=0.7, one_minus_k=0.005),
    # netem's defaults for "gemodel 5%": r = 1 - p, 1-h = 1, 1-k = 0 (Bernoulli-like)
    GilbertElliottLoss(p=0.05),
]


@pytest.mark.parametrize("model", GE_CASES, ids=["gilbert", "general", "netem-default"])
def test_ge_loss_rate_and_burst_length_within_95_percent_interval(model: GilbertElliottLoss) -> None:
    lost = loss_sequence(model, 200_000, seed=2024)
    (loss, loss_hw), (burst, burst_hw) = measured_loss_and_burst(lost, batches=100)
    assert abs(loss - model.stationary_loss_rate) <= loss_hw, (loss, loss_hw, model.stationary_loss_rate)
    assert abs(burst - model.mean_burst_length) <= burst_hw, (burst, burst_hw, model.mean_burst_length)


def test_ge_closed_forms() -> None:
    gilbert = GilbertElliottLoss(p=0.02, r=0.3)
    assert gilbert.stationary_loss_rate == pytest.approx(0.02 / 0.32)
    assert gilbert.mean_burst_length == pytest.approx(1 / 0.3)
    netem_default = GilbertElliottLoss(p=0.05)  # r = 0.95: i.i.d. in disguise
    assert netem_default.r == pytest.approx(0.95)
    assert netem_default.stationary_loss_rate == pytest.approx(0.05)
    assert netem_default.mean_burst_length == pytest.approx(BernoulliLoss(0.05).mean_burst_length)
    lossless_bad = GilbertElliottLoss(p=0.1, r=0.1, one_minus_h=0.0, one_minus_k=0.0)
    assert lossless_bad.stationary_loss_rate == 0 and lossless_bad.mean_burst_length == 0
    # loss only in the good state, which is left with probability p: bursts are geometric in (1-p)(1-k)
    good_only = GilbertElliottLoss(p=0.5, r=0.5, one_minus_h=0.0, one_minus_k=1.0)
    assert good_only.mean_burst_length == pytest.approx(1 / (1 - 0.5))


def test_ge_follows_netem_draw_order() -> None:
    class Scripted:
        def __init__(self, values: list[float]) -> None:
            self.values = values

        def random(self) -> float:
            return self.values.pop(0)

    model = GilbertElliottLoss(p=0.5, r=0.5, one_minus_h=0.9, one_minus_k=0.1)
    # in G: transition draw 0.4 < p → B, but the loss uses G's 1-k: 0.2 >= 0.1 → kept
    assert model.lost(Scripted([0.4, 0.2])) is False  # type: ignore[arg-type]
    assert model.bad
    # in B: 0.6 >= r stays B; loss draw 0.8 < 1-h → lost
    assert model.lost(Scripted([0.6, 0.8])) is True  # type: ignore[arg-type]
    assert model.fresh().bad is False  # a fresh copy starts in G


def test_bernoulli_measured_rate_and_geometric_bursts() -> None:
    model = BernoulliLoss(0.1)
    lost = loss_sequence(model, 100_000, seed=5)
    (loss, loss_hw), (burst, burst_hw) = measured_loss_and_burst(lost, batches=100)
    assert abs(loss - 0.1) <= loss_hw
    assert abs(burst - 1 / 0.9) <= burst_hw


def test_links_use_their_own_ge_state() -> None:
    template = GilbertElliottLoss(p=0.3, r=0.1)
    params = LinkParameters(rate_bps=None, loss_model=template, max_backoffs=60)
    first = LinkModel(params, np.random.default_rng(1))
    for i in range(200):
        first.transmit(float(i), 100)
    assert template.bad is False  # the template never moves
    second = LinkModel(params, np.random.default_rng(1))
    third = LinkModel(params, np.random.default_rng(1))
    assert [second.transmit(float(i), 100) for i in range(200)] == [third.transmit(float(i), 100) for i in range(200)]
    assert second.counters == third.counters == first.counters


def test_ge_loss_through_transmit_counts_every_attempt() -> None:
    model = GilbertElliottLoss(p=0.02, r=0.25, one_minus_h=0.8, one_minus_k=0.0)
    link = LinkModel(LinkParameters(rate_bps=None, loss_model=model, max_backoffs=60), np.random.default_rng(3))
    for i in range(30_000):
        link.transmit(float(i), 100)
    attempts = link.counters.segments + link.counters.retransmissions
    # retransmissions follow losses, so they sample the bad state more often: the per-attempt rate
    # is at least the stationary rate
    assert link.counters.lost_segments / attempts >= model.stationary_loss_rate * 0.9


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"p": 1.5}, "GilbertElliottLoss.p=1.5"),
        ({"p": 0.1, "r": -0.1}, "GilbertElliottLoss.r=-0.1"),
        ({"p": 0.1, "one_minus_h": math.nan}, "GilbertElliottLoss.one_minus_h=nan"),
        ({"p": 0.1, "one_minus_k": 2}, "GilbertElliottLoss.one_minus_k=2"),
        ({"p": 0.1, "r": 0.0}, "loses every packet"),  # absorbed in B with 1-h = 1
    ],
)
def test_bad_ge_parameters_raise_naming_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ChannelError, match=field):
        GilbertElliottLoss(**kwargs)


def test_bad_bernoulli_and_conflicting_loss_fields() -> None:
    with pytest.raises(ChannelError, match=r"BernoulliLoss.p=1.0"):
        BernoulliLoss(1.0)
    with pytest.raises(ChannelError, match=r"LinkParameters.loss_model=.*loss=0"):
        LinkParameters(rate_bps=None, loss=0.1, loss_model=GilbertElliottLoss(p=0.1, r=0.5))
    with pytest.raises(ChannelError, match=r"LinkParameters.loss_model='gemodel'"):
        LinkParameters(rate_bps=None, loss_model="gemodel")  # type: ignore[arg-type]


def test_default_loss_process_is_bernoulli_of_loss() -> None:
    assert LinkParameters(rate_bps=None, loss=0.03).loss_process == BernoulliLoss(0.03)


@given(p=st.floats(0, 1), r=st.floats(0, 1), h=st.floats(0, 1), k=st.floats(0, 1))
@settings(max_examples=300, deadline=None)
def test_ge_analytics_are_consistent(p: float, r: float, h: float, k: float) -> None:
    try:
        model = GilbertElliottLoss(p=p, r=r, one_minus_h=h, one_minus_k=k)
    except ChannelError:
        return
    loss = model.stationary_loss_rate
    assert 0.0 <= loss < 1.0
    assert 0.0 <= model.consecutive_loss_probability <= loss + 1e-12
    if loss > 0:
        assert model.mean_burst_length >= 1.0 - 1e-9
