"""Statistics of `testbed compare`: t quantiles, intervals, sign-flip p-values and paired differences over seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.compare_stats import (
    PairedDifference,
    StatisticsError,
    mean_band,
    paired_difference,
    per_seed_mean_differences,
    sign_flip_p,
    t_cdf,
    t_interval,
    t_quantile,
)

# Two-sided 95% critical values t(0.975, df), from the published table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2).
T_TABLE_0975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042,
                100: 1.984}

values = st.lists(st.floats(min_value=-100, max_value=100, allow_nan=False), min_size=2, max_size=30)


@pytest.mark.parametrize(("degrees_of_freedom", "expected"), sorted(T_TABLE_0975.items()))
def test_t_quantile_matches_the_published_table(degrees_of_freedom: int, expected: float) -> None:
    assert t_quantile(0.975, degrees_of_freedom) == pytest.approx(expected, abs=5e-4)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=0.001, max_value=0.999), st.floats(min_value=0.5, max_value=500))
def test_t_quantile_agrees_with_scipy_and_inverts_the_cdf(probability: float, degrees_of_freedom: float) -> None:
    from scipy import stats

    quantile = t_quantile(probability, degrees_of_freedom)
    assert quantile == pytest.approx(float(stats.t.ppf(probability, degrees_of_freedom)), rel=1e-9, abs=1e-9)
    assert t_cdf(quantile, degrees_of_freedom) == pytest.approx(probability, abs=1e-12)


def test_t_quantile_tends_to_the_normal_quantile_and_is_symmetric() -> None:
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)
    assert t_quantile(0.025, 7) == -t_quantile(0.975, 7)
    assert t_quantile(0.5, 3) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(StatisticsError, match="probability must be in"):
        t_quantile(1.0, 3)
    with pytest.raises(StatisticsError, match="degrees of freedom must be > 0"):
        t_cdf(1.0, 0)


@given(values)
def test_the_interval_contains_the_mean(sample: list[float]) -> None:
    mean, low, high = t_interval(sample)
    assert mean == pytest.approx(float(np.mean(sample)))
    assert low <= mean <= high


@given(values)
def test_the_interval_shrinks_with_n(sample: list[float]) -> None:
    # The same values twice: the same mean, more seeds, so a strictly narrower interval (unless all are equal).
    _, low, high = t_interval(sample)
    _, low_twice, high_twice = t_interval(sample + sample)
    if high > low:
        assert high_twice - low_twice < high - low
    else:
        assert high_twice - low_twice == 0.0


def test_the_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(7)
    trials = 4000
    covered = sum(low <= 1.5 <= high for _, low, high in (t_interval(list(rng.normal(1.5, 2.0, 5)))
                                                            for _ in range(trials)))
    # Binomial(4000, 0.95): standard deviation 0.0034; 4 of them either side.
    assert abs(covered / trials - 0.95) < 0.014


def test_the_interval_needs_two_values_and_a_band_takes_one() -> None:
    with pytest.raises(StatisticsError, match="at least 2 values"):
        t_interval([1.0])
    assert mean_band([0.7]) == (0.7, 0.7, 0.7)


def test_the_issue_example_dpu_minus_gcpu_over_five_seeds() -> None:
    # Issue 14: per seed DPU − GCPU was −0.03, −0.08, −0.61, +0.64, −0.56 pp: mean −0.13, 95% interval
    # [−0.76, +0.50] (the issue truncated −0.755 to −0.75), sign-flip p = 0.63.
    differences = [-0.03, -0.08, -0.61, 0.64, -0.56]
    mean, low, high = t_interval(differences)
    assert (round(mean, 2), round(low, 2), round(high, 2)) == (-0.13, -0.76, 0.50)
    assert sign_flip_p(differences) == 20 / 32


def test_sign_flip_p_is_exact_for_small_n_and_seeded_for_large() -> None:
    assert sign_flip_p([0.5] * 5) == 2 / 32  # only all + and all − reach |mean| = 0.5
    assert sign_flip_p([0.0, 0.0]) == 1.0
    large = list(np.random.default_rng(1).normal(0.3, 1.0, 20))
    assert sign_flip_p(large) == sign_flip_p(large)
    assert 0.0 < sign_flip_p(large) <= 1.0


@given(st.dictionaries(st.integers(0, 50), st.dictionaries(st.integers(1, 20), st.floats(0, 100), min_size=1),
                       min_size=1, max_size=8))
def test_a_series_against_itself_is_exactly_zero_and_a_tie(series: dict[int, dict[int, float]]) -> None:
    difference = paired_difference(series, series)
    assert difference.mean == 0.0 and difference.seeds == len(series)
    if len(series) >= 2:
        assert difference.low == difference.high == 0.0 and difference.verdict == "tie"
        assert difference.p_sign_flip == 1.0
    else:
        assert difference.verdict == "one seed" and math.isnan(difference.low)


def test_rounds_are_averaged_within_a_seed_before_seeds_are_compared() -> None:
    a = {1: {1: 90.0, 2: 92.0, 3: 94.0}, 2: {1: 80.0, 2: 80.0, 3: 80.0}}
    b = {1: {1: 89.0, 2: 91.0, 3: 91.0}, 2: {1: 81.0, 2: 81.0, 3: 81.0}}
    assert per_seed_mean_differences(a, b) == [pytest.approx(5 / 3), -1.0]
    difference = paired_difference(a, b)
    assert difference.seeds == 2  # not 6 (seed, round) cells
    assert difference.mean == pytest.approx((5 / 3 - 1.0) / 2)
    half_width = t_quantile(0.975, 1) * float(np.std([5 / 3, -1.0], ddof=1)) / math.sqrt(2)
    assert (difference.low, difference.high) == pytest.approx((difference.mean - half_width,
                                                               difference.mean + half_width))


def test_series_that_do_not_pair_are_refused() -> None:
    with pytest.raises(StatisticsError, match="cannot pair seeds"):
        paired_difference({1: {1: 1.0}}, {2: {1: 1.0}})
    with pytest.raises(StatisticsError, match="seed 1: cannot pair rounds"):
        paired_difference({1: {1: 1.0, 2: 1.0}}, {1: {1: 1.0}})


def test_verdicts_in_words() -> None:
    assert PairedDifference(-1.0, -2.0, -0.5, 5, 0.06).verdict == "lower"
    assert PairedDifference(1.0, 0.5, 2.0, 5, 0.06).verdict == "higher"
    assert PairedDifference(0.1, -0.5, 0.7, 5, 0.8).verdict == "tie"
    assert PairedDifference(0.1, math.nan, math.nan, 1, 1.0).verdict == "one seed"
