"""Statistical tests of the delay distributions (channel.delay) as seen through LinkModel.packet_fates."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.delay import DELAY_DISTRIBUTIONS, get_delay_distribution, pareto_tail_probability
from channel.errors import ChannelError
from channel.link import LinkModel, LinkParameters

N = 40_000


def delays(distribution: str, delay_s: float, jitter_s: float, seed: int = 1, n: int = N) -> np.ndarray:
    """One-way delays of ``n`` packets on an unlimited link (packet level: no in-order clamping)."""
    params = LinkParameters(rate_bps=None, delay_s=delay_s, jitter_s=jitter_s, delay_distribution=distribution)
    link = LinkModel(params, np.random.default_rng(seed))
    out = np.empty(n)
    for i in range(n):
        (arrival,) = link.packet_fates(float(i), 100)
        out[i] = arrival - i
    return out


@pytest.mark.parametrize("name", ["uniform", "normal", "pareto"])
def test_sample_mean_and_std_match_the_closed_form(name: str) -> None:
    delay, jitter = 0.2, 0.02  # far from 0, so clipping never bites
    samples = delays(name, delay, jitter)
    law = DELAY_DISTRIBUTIONS[name]
    mean, std = law.mean_s(delay, jitter), law.std_s(delay, jitter)
    assert abs(samples.mean() - mean) <= 4 * std / math.sqrt(N)  # z = 4: a fixed seed never flakes
    if name != "pareto":  # finite fourth moment: the sample std converges at 1/sqrt(n)
        assert samples.std() == pytest.approx(std, rel=0.02)
    else:  # infinite fourth moment: loose bound on the std, exact checks on the tail below
        assert samples.std() == pytest.approx(std, rel=0.15)


def test_uniform_stays_within_delay_plus_minus_jitter() -> None:
    samples = delays("uniform", 0.1, 0.03)
    assert samples.min() >= 0.07 - 1e-12 and samples.max() <= 0.13 + 1e-12


def test_pareto_has_netems_support_and_heavy_tail() -> None:
    delay, jitter = 0.2, 0.02
    samples = delays("pareto", delay, jitter)
    assert samples.min() >= delay - 2 / 3 * jitter - 1e-12  # X >= 1 ⇒ value >= -2/3
    for z in (0.0, 1.0, 2.0, 4.0, 8.0):
        expected = pareto_tail_probability(z)
        measured = float(np.mean(samples > delay + z * jitter))
        half_width = 4 * math.sqrt(expected * (1 - expected) / N) + 1 / N
        assert abs(measured - expected) <= half_width, (z, measured, expected)
    assert pareto_tail_probability(2.0) == pytest.approx(1 / 27)
    # heavier than normal: beyond +4 jitter a normal law has ~3e-5, this one ~1e-2
    assert np.mean(samples > delay + 4 * jitter) > 100 * 3.2e-5


def test_normal_is_clipped_at_zero() -> None:
    samples = delays("normal", 0.0, 0.01, n=10_000)
    assert samples.min() == 0.0
    assert 0.45 < np.mean(samples == 0.0) < 0.55


@given(name=st.sampled_from(sorted(DELAY_DISTRIBUTIONS)), delay=st.floats(0, 5), jitter=st.floats(0, 5),
       seed=st.integers(0, 2**32 - 1))
@settings(max_examples=200, deadline=None)
def test_every_sample_is_finite_and_non_negative(name: str, delay: float, jitter: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(20):
        value = get_delay_distribution(name).sample(rng, delay, jitter)
        assert math.isfinite(value) and value >= 0.0


def test_no_jitter_means_constant_delay_and_no_draws() -> None:
    class NoDraws:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"drew {name}")

    for name in DELAY_DISTRIBUTIONS:
        assert get_delay_distribution(name).sample(NoDraws(), 0.3, 0.0) == 0.3  # type: ignore[arg-type]


def test_same_seed_same_delays() -> None:
    for name in DELAY_DISTRIBUTIONS:
        assert np.array_equal(delays(name, 0.1, 0.05, seed=9, n=500), delays(name, 0.1, 0.05, seed=9, n=500))


def test_unknown_distribution_names_the_field() -> None:
    with pytest.raises(ChannelError, match=r"delay_distribution='cauchy'.*normal, pareto, uniform"):
        LinkParameters(rate_bps=None, delay_distribution="cauchy")
