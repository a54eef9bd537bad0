"""Reconnect delays: jittered exponential backoff, so clients that lose the broker together do not return together."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    """Delays that grow from `first_s` by `factor` up to `max_s`; each is drawn from [ceiling / 2, ceiling]
    ("equal jitter": never less than half the ceiling, so a retry is never instant, and a thousand clients
    dropped at once spread their retries over the upper half of each step instead of arriving in lockstep)."""

    first_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.first_s <= self.max_s:
            raise ValueError(f"backoff needs 0 < first_s <= max_s, got {self.first_s} and {self.max_s}")
        if self.factor < 1:
            raise ValueError(f"backoff factor must be at least 1, got {self.factor}")

    def ceiling(self, attempt: int) -> float:
        """The largest delay before retry number `attempt` (0 for the first retry)."""
        ceiling = self.first_s
        for _ in range(attempt):
            ceiling = min(self.max_s, ceiling * self.factor)
            if ceiling >= self.max_s:
                break
        return ceiling

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The delay before retry number `attempt`, drawn with `rng` (seed it per client for repeatable runs)."""
        ceiling = self.ceiling(attempt)
        return rng.uniform(ceiling / 2, ceiling)


class Backoff:
    """One client's retry state: `next_delay()` after each failure, `reset()` once a session came up."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random) -> None:
        self.policy = policy
        self.rng = rng
        self.attempt = 0

    def next_delay(self) -> float:
        delay = self.policy.delay(self.attempt, self.rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


RECONNECT = BackoffPolicy(first_s=0.5, factor=2.0, max_s=10.0)
"""Devices, bridges and watchers: the first retry within 0.25-0.5 s, later ones at most 10 s apart."""


def client_backoff(client_id: str, policy: BackoffPolicy = RECONNECT) -> Backoff:
    """A client's backoff with jitter seeded from its id: the same client retries on the same schedule."""
    return Backoff(policy, random.Random(f"backoff:{client_id}"))
