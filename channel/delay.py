"""One-way delay distributions by netem name (``uniform``, ``normal``, ``pareto``), seeded and clipped at 0."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from channel.errors import ChannelError

#: Shape of netem's ``pareto`` table (iproute2 ``netem/pareto.c`` builds it with ``a = 3``).
PARETO_SHAPE = 3.0
#: netem normalises its pareto table as ``(X - 1.5) * 4/3`` with X ~ Pareto(shape 3, scale 1).
PARETO_OFFSET = PARETO_SHAPE / (PARETO_SHAPE - 1.0)
PARETO_FACTOR = 4.0 / 3.0


@dataclass(frozen=True)
class DelayDistribution:
    """A named delay law: ``sample(rng, delay_s, jitter_s)`` and its unclipped mean/std in closed form."""

    name: str
    sample: Callable[[np.random.Generator, float, float], float]
    mean_s: Callable[[float, float], float]
    std_s: Callable[[float, float], float]
    summary: str


def _uniform(rng: np.random.Generator, delay_s: float, jitter_s: float) -> float:
    # exactly the link model's original jitter: one rng.uniform draw, none without jitter
    if jitter_s <= 0:
        return delay_s
    return max(0.0, delay_s + rng.uniform(-jitter_s, jitter_s))


def _normal(rng: np.random.Generator, delay_s: float, jitter_s: float) -> float:
    if jitter_s <= 0:
        return delay_s
    return max(0.0, rng.normal(delay_s, jitter_s))


def _pareto(rng: np.random.Generator, delay_s: float, jitter_s: float) -> float:
    if jitter_s <= 0:
        return delay_s
    # X = U^(-1/3) is Pareto(shape 3, scale 1); 1 - U keeps U in (0, 1] so X is finite.
    x = (1.0 - rng.random()) ** (-1.0 / PARETO_SHAPE)
    return max(0.0, delay_s + jitter_s * PARETO_FACTOR * (x - PARETO_OFFSET))


DELAY_DISTRIBUTIONS: dict[str, DelayDistribution] = {
    distribution.name: distribution
    for distribution in (
        DelayDistribution(
            name="uniform",
            sample=_uniform,
            mean_s=lambda delay, jitter: delay,
            std_s=lambda delay, jitter: jitter / math.sqrt(3.0),
            summary="delay + U(-jitter, +jitter) (netem without a distribution table)",
        ),
        DelayDistribution(
            name="normal",
            sample=_normal,
            mean_s=lambda delay, jitter: delay,
            std_s=lambda delay, jitter: jitter,
            summary="N(delay, jitter²) (netem 'distribution normal'), clipped at 0",
        ),
        DelayDistribution(
            name="pareto",
            # netem's table value is (X - 1.5) * 4/3 with X ~ Pareto(3, 1), used as delay + jitter * value.
            # Hence: mean = delay, minimum = delay - (2/3) jitter, std = (2/sqrt 3) jitter ≈ 1.155 jitter,
            # tail P(D > delay + z jitter) = (1.5 + 0.75 z)^-3. netem's table is 16-bit (scale 8192), so it
            # stops near +4 jitter; we keep the full tail (the cut lowers netem's mean by ~0.03 jitter).
            sample=_pareto,
            mean_s=lambda delay, jitter: delay,
            std_s=lambda delay, jitter: jitter * 2.0 / math.sqrt(3.0),
            summary="delay + jitter * 4/3 * (X - 1.5), X ~ Pareto(shape 3, scale 1) (netem 'distribution pareto')",
        ),
    )
}


def get_delay_distribution(name: str) -> DelayDistribution:
    """The registered distribution called ``name``; a ChannelError lists the known names."""
    try:
        return DELAY_DISTRIBUTIONS[name]
    except (KeyError, TypeError):
        raise ChannelError(
            f"LinkParameters.delay_distribution={name!r} is invalid: expected one of "
            f"{', '.join(sorted(DELAY_DISTRIBUTIONS))}"
        ) from None


def pareto_tail_probability(z: float) -> float:
    """``P(D > delay + z * jitter)`` of the pareto law above (for z >= -2/3)."""
    return min(1.0, (PARETO_OFFSET + z / PARETO_FACTOR) ** -PARETO_SHAPE)
