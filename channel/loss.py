"""Packet loss processes (netem's ``loss P`` and ``loss gemodel p r 1-h 1-k``), pure and seeded.

A loss model in ``LinkParameters`` is a template: every ``LinkModel`` takes its own
``fresh()`` copy, so the Gilbert-Elliott state of one link never leaks into another.
Each draw consumes numbers only from the ``numpy.random.Generator`` it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from channel.errors import ChannelError


class LossModel(Protocol):
    """What a link needs from a loss process."""

    def lost(self, rng: np.random.Generator) -> bool:
        """Decide the fate of the next packet (advancing any internal state)."""
        ...

    def fresh(self) -> LossModel:
        """A copy with the same parameters in the initial state."""
        ...

    @property
    def stationary_loss_rate(self) -> float:
        """Long-run fraction of packets lost."""
        ...

    @property
    def mean_burst_length(self) -> float:
        """Mean number of consecutive lost packets in a loss burst (0 if nothing is ever lost)."""
        ...

    @property
    def description(self) -> str:
        """One human phrase, e.g. ``"1.00% loss"``."""
        ...


def _probability(owner: str, name: str, value: float, upper_open: bool = False) -> None:
    valid = isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value
    valid = valid and (value < 1.0 if upper_open else value <= 1.0)
    if not valid:
        expected = "a probability in [0, 1)" if upper_open else "a probability in [0, 1]"
        raise ChannelError(f"{owner}.{name}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class BernoulliLoss:
    """Independent loss with probability ``p`` per packet (netem ``loss p``, no correlation).

    Draws exactly one ``rng.random()`` per packet when ``p > 0`` and none when ``p == 0``
    (so a loss-free link consumes no random numbers, as before loss models existed).
    """

    p: float

    def __post_init__(self) -> None:
        _probability("BernoulliLoss", "p", self.p, upper_open=True)

    def lost(self, rng: np.random.Generator) -> bool:
        return self.p > 0 and rng.random() < self.p

    def fresh(self) -> BernoulliLoss:
        return self

    @property
    def stationary_loss_rate(self) -> float:
        return self.p

    @property
    def mean_burst_length(self) -> float:
        """Runs of losses are geometric: mean ``1 / (1 - p)``."""
        return 0.0 if self.p == 0 else 1.0 / (1.0 - self.p)

    @property
    def description(self) -> str:
        return f"{self.p * 100:.2f}% loss"


@dataclass(unsafe_hash=True)
class GilbertElliottLoss:
    """Two-state Markov loss, exactly as netem's ``loss gemodel p r 1-h 1-k``.

    States good (G) and bad (B); the chain starts in G (as netem does).
    ``p`` = P(G→B), ``r`` = P(B→G) per packet; a packet sent in B is lost with probability
    ``one_minus_h`` (1-h), in G with ``one_minus_k`` (1-k). netem's defaults when arguments are
    omitted: ``r = 1 - p``, ``1-h = 1``, ``1-k = 0`` (the simple Gilbert model).

    Per packet, like ``loss_gilb_ell`` in ``net/sched/sch_netem.c``: one draw decides the
    transition, a second draw decides the loss *with the loss probability of the state the packet
    was sent in* (the state before the transition). So with ``s_n`` the state of packet n,
    ``P(loss_n) = e(s_n)`` and ``s_{n+1}`` follows the transition matrix
    ``T = [[1-p, p], [r, 1-r]]`` with ``e(G) = 1-k``, ``e(B) = 1-h``.

    Analytic properties (stationary chain; ``π_B = p / (p + r)``, ``π_G = r / (p + r)``;
    if ``p + r = 0`` the chain stays in G):

    * loss rate ``P(L) = π_G (1-k) + π_B (1-h)``;
    * consecutive losses ``P(LL) = π_G e_G [(1-p) e_G + p e_B] + π_B e_B [r e_G + (1-r) e_B]``;
    * a burst (maximal run of losses) starts wherever a loss follows a non-loss, so the rate of
      burst starts is ``P(L) - P(LL)`` and the mean burst length is ``P(L) / (P(L) - P(LL))``.
      For the simple Gilbert model (h = 0, k = 1: lose everything in B, nothing in G) this is
      ``π_B / (π_B r) = 1 / r``.

    Note when comparing with a real kernel: netem stores the third argument as ``a3`` and drops
    in B when ``random > a3``; check your iproute2/kernel pair by measuring, since a mismatch
    there makes the third argument act as ``h`` rather than ``1-h``.
    """

    p: float
    r: float | None = None
    one_minus_h: float = 1.0
    one_minus_k: float = 0.0
    bad: bool = field(default=False, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        _probability("GilbertElliottLoss", "p", self.p)
        if self.r is None:
            self.r = 1.0 - self.p
        _probability("GilbertElliottLoss", "r", self.r)
        _probability("GilbertElliottLoss", "one_minus_h", self.one_minus_h)
        _probability("GilbertElliottLoss", "one_minus_k", self.one_minus_k)
        if self.stationary_loss_rate >= 1.0:
            raise ChannelError(
                f"GilbertElliottLoss(p={self.p!r}, r={self.r!r}, one_minus_h={self.one_minus_h!r}, "
                f"one_minus_k={self.one_minus_k!r}) is invalid: it loses every packet in the long run; "
                "lower one_minus_h/one_minus_k or let the chain leave the lossy state"
            )

    def lost(self, rng: np.random.Generator) -> bool:
        sent_in_bad = self.bad
        if sent_in_bad:
            if rng.random() < self.r:  # type: ignore[operator]
                self.bad = False
            return rng.random() < self.one_minus_h
        if rng.random() < self.p:
            self.bad = True
        return rng.random() < self.one_minus_k

    def fresh(self) -> GilbertElliottLoss:
        return GilbertElliottLoss(self.p, self.r, self.one_minus_h, self.one_minus_k)

    @property
    def bad_state_probability(self) -> float:
        """Stationary probability of the bad state, ``p / (p + r)`` (0 if the chain never moves)."""
        total = self.p + (self.r or 0.0)
        return 0.0 if total == 0 else self.p / total

    @property
    def stationary_loss_rate(self) -> float:
        bad = self.bad_state_probability
        return (1.0 - bad) * self.one_minus_k + bad * self.one_minus_h

    @property
    def consecutive_loss_probability(self) -> float:
        """Stationary ``P(packet n lost and packet n+1 lost)``."""
        r = self.r or 0.0
        bad = self.bad_state_probability
        good = 1.0 - bad
        e_good, e_bad = self.one_minus_k, self.one_minus_h
        return (good * e_good * ((1.0 - self.p) * e_good + self.p * e_bad)
                + bad * e_bad * (r * e_good + (1.0 - r) * e_bad))

    @property
    def mean_burst_length(self) -> float:
        loss = self.stationary_loss_rate
        if loss == 0:
            return 0.0
        starts = loss - self.consecutive_loss_probability
        return math.inf if starts <= 0 else loss / starts

    @property
    def description(self) -> str:
        return (f"GE loss {self.stationary_loss_rate * 100:.2f}% (p={self.p:g}, r={self.r:g}, "
                f"1-h={self.one_minus_h:g}, 1-k={self.one_minus_k:g}; "
                f"mean burst {self.mean_burst_length:.2g})")
