"""Statistics of a comparison over seeds: paired differences, Student t intervals, sign-flip p-values, verdicts."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from testbed.core.errors import TestbedError

CONFIDENCE = 0.95
EXACT_SIGN_FLIP_MAX_N = 16
"""Up to this many seeds the sign-flip test enumerates all 2^n sign patterns; beyond, it samples them."""
SIGN_FLIP_SAMPLES = 100_000
SIGN_FLIP_SEED = 20240601
"""Fixed, so a sampled p-value (n > EXACT_SIGN_FLIP_MAX_N) is the same on every run."""
INTERVAL_METHOD = "Student t over seeds"


class StatisticsError(TestbedError):
    """Series that cannot be paired (other seeds or rounds), or a statistic asked of too few values."""


@dataclass(frozen=True)
class PairedDifference:
    """Mean over seeds of the per-seed mean difference (a − b), with its 95% interval and sign-flip p.

    `low`/`high` are NaN and `p_sign_flip` is 1.0 with one seed: one seed gives no interval.
    """

    mean: float
    low: float
    high: float
    seeds: int
    p_sign_flip: float

    @property
    def has_interval(self) -> bool:
        return self.seeds >= 2

    @property
    def verdict(self) -> str:
        """"tie" when the interval covers 0, "higher"/"lower" when it lies above/below, "one seed" without one."""
        if not self.has_interval:
            return "one seed"
        if self.low <= 0.0 <= self.high:
            return "tie"
        return "higher" if self.low > 0.0 else "lower"


def _continued_fraction_beta(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return fraction
    raise StatisticsError(f"incomplete beta ({a}, {b}, {x}) did not converge")


def regularised_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if a <= 0.0 or b <= 0.0 or not 0.0 <= x <= 1.0:
        raise StatisticsError(f"need a, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction_beta(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction_beta(b, a, 1.0 - x) / b


def _central_mass(t: float, degrees_of_freedom: float) -> float:
    """P(0 ≤ T ≤ |t|), accurate for small |t| (where 1 − tail would cancel)."""
    return 0.5 * regularised_incomplete_beta(0.5, degrees_of_freedom / 2.0, t * t / (degrees_of_freedom + t * t))


def _tail_mass(t: float, degrees_of_freedom: float) -> float:
    """P(T > |t|), accurate for large |t|."""
    return 0.5 * regularised_incomplete_beta(degrees_of_freedom / 2.0, 0.5,
                                             degrees_of_freedom / (degrees_of_freedom + t * t))


def _check_degrees_of_freedom(degrees_of_freedom: float) -> None:
    if not degrees_of_freedom > 0:
        raise StatisticsError(f"degrees of freedom must be > 0, got {degrees_of_freedom}")


def t_cdf(t: float, degrees_of_freedom: float) -> float:
    """P(T ≤ t) for Student's t with `degrees_of_freedom` > 0."""
    _check_degrees_of_freedom(degrees_of_freedom)
    if t * t < degrees_of_freedom:
        central = _central_mass(t, degrees_of_freedom)
        return 0.5 + central if t >= 0 else 0.5 - central
    tail = _tail_mass(t, degrees_of_freedom)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(probability: float, degrees_of_freedom: float) -> float:
    """The t with P(T ≤ t) = `probability`: bisection to float precision on the central mass P(0 ≤ T ≤ t) for
    probabilities up to 0.75, on the tail mass P(T > t) above (each exact as a float: p − 0.5, 1 − p)."""
    _check_degrees_of_freedom(degrees_of_freedom)
    if not 0.0 < probability < 1.0:
        raise StatisticsError(f"probability must be in (0, 1), got {probability}")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, degrees_of_freedom)
    if probability <= 0.75:
        central = probability - 0.5

        def below(t: float) -> bool:
            return _central_mass(t, degrees_of_freedom) < central
    else:
        tail = 1.0 - probability

        def below(t: float) -> bool:
            return _tail_mass(t, degrees_of_freedom) > tail
    low, high = 0.0, 1.0
    while below(high):
        low, high = high, 2.0 * high
    for _ in range(2000):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if below(middle):
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high): the Student t interval for the mean of `values` (at least two)."""
    if len(values) < 2:
        raise StatisticsError(f"a t interval needs at least 2 values, got {len(values)}")
    if min(values) == max(values):  # no spread: the interval is the value (a rounded mean would leave an ulp)
        return values[0], values[0], values[0]
    # Exactly rounded sums: a sample repeated gives the same mean and a doubled sum of squares, to the bit.
    n = len(values)
    mean = math.fsum(values) / n
    deviation = math.sqrt(math.fsum((value - mean) ** 2 for value in values) / (n - 1))
    half_width = t_quantile(0.5 + confidence / 2.0, n - 1) * deviation / math.sqrt(n)
    return mean, mean - half_width, mean + half_width


def sign_flip_p(values: Sequence[float]) -> float:
    """Two-sided p of the sign-flip test of mean 0: the share of sign patterns with |mean| ≥ the observed one.

    Exact (all 2^n patterns) up to EXACT_SIGN_FLIP_MAX_N values, else from SIGN_FLIP_SAMPLES seeded patterns.
    """
    if not values:
        raise StatisticsError("a sign-flip test needs at least one value")
    magnitudes = np.abs(np.asarray(values, dtype=np.float64))
    if len(magnitudes) <= EXACT_SIGN_FLIP_MAX_N:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(magnitudes))))
    else:
        signs = np.random.default_rng(SIGN_FLIP_SEED).choice((1.0, -1.0), size=(SIGN_FLIP_SAMPLES, len(magnitudes)))
    observed = abs(float(np.sum(values)))
    sums = np.abs(signs @ magnitudes)
    # A relative tolerance, so the observed pattern itself (the same sum in another order) always counts.
    return float(np.mean(sums >= observed - 1e-12 * max(1.0, observed)))


def per_seed_mean_differences(a: Mapping[int, Mapping[int, float]],
                              b: Mapping[int, Mapping[int, float]]) -> list[float]:
    """Per seed (sorted), the mean over rounds of a[seed][round] − b[seed][round].

    Rounds of one seed are correlated (each starts from the last deployment), so a seed, not a
    (seed, round) cell, is the unit of replication. Both must hold the same seeds and, per seed, rounds.
    """
    if set(a) != set(b):
        raise StatisticsError(f"cannot pair seeds {sorted(a)} with seeds {sorted(b)}")
    differences = []
    for seed in sorted(a):
        if set(a[seed]) != set(b[seed]) or not a[seed]:
            raise StatisticsError(f"seed {seed}: cannot pair rounds {sorted(a[seed])} with rounds {sorted(b[seed])}")
        differences.append(math.fsum(a[seed][r] - b[seed][r] for r in sorted(a[seed])) / len(a[seed]))
    return differences


def paired_difference(a: Mapping[int, Mapping[int, float]], b: Mapping[int, Mapping[int, float]],
                      confidence: float = CONFIDENCE) -> PairedDifference:
    """The mean paired difference a − b over seeds (per seed averaged over rounds), its interval and p."""
    differences = per_seed_mean_differences(a, b)
    if len(differences) < 2:
        return PairedDifference(differences[0], math.nan, math.nan, 1, 1.0)
    mean, low, high = t_interval(differences, confidence)
    return PairedDifference(mean, low, high, len(differences), sign_flip_p(differences))


def mean_band(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float, float]:
    """(mean, low, high) of `values` for a plotted band: the t interval, or the mean alone for one value."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    return t_interval(values, confidence)
