"""Jittered exponential backoff: bounded, growing, capped, and spread across clients."""

from __future__ import annotations

import random
import statistics
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.core.backoff import Backoff, BackoffPolicy, client_backoff

policies = st.builds(BackoffPolicy, first_s=st.floats(0.01, 5), factor=st.floats(1, 4),
                     max_s=st.floats(5, 120))


@given(policies, st.integers(0, 200), st.integers(0, 2**32))
def test_every_delay_lies_in_the_upper_half_of_its_capped_ceiling(policy: BackoffPolicy, attempt: int, seed: int) -> None:
    ceiling = policy.ceiling(attempt)
    assert policy.first_s <= ceiling <= policy.max_s
    assert ceiling / 2 <= policy.delay(attempt, random.Random(seed)) <= ceiling


@given(policies, st.integers(0, 60))
def test_ceilings_never_shrink(policy: BackoffPolicy, attempt: int) -> None:
    assert policy.ceiling(attempt + 1) >= policy.ceiling(attempt)


def test_the_default_schedule_doubles_to_its_cap_and_reset_starts_over() -> None:
    backoff = Backoff(BackoffPolicy(first_s=0.5, factor=2, max_s=10), random.Random(1))
    ceilings = [backoff.policy.ceiling(attempt) for attempt in range(8)]
    assert ceilings == [0.5, 1, 2, 4, 8, 10, 10, 10]
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() <= 0.5


def test_clients_dropped_together_spread_their_retries() -> None:
    """A thousand devices that lost the broker at once: their first retries are spread over the step, not one instant."""
    first = [client_backoff(f"rpi4-{index}").next_delay() for index in range(1000)]
    assert min(first) >= 0.25 and max(first) <= 0.5
    assert statistics.pstdev(first) > 0.06  # uniform on [0.25, 0.5] has 0.072
    busiest_10ms = max(Counter(int(delay * 100) for delay in first).values())
    assert busiest_10ms < 100  # 25 bins of 10 ms: about 40 retries each, never a crowd in one
    assert client_backoff("rpi4-7").next_delay() == client_backoff("rpi4-7").next_delay()  # per-client repeatable


@pytest.mark.parametrize(("first_s", "factor", "max_s", "message"), [
    (0, 2, 10, "0 < first_s <= max_s"), (20, 2, 10, "0 < first_s <= max_s"), (1, 0.5, 10, "factor must be at least 1"),
])
def test_a_nonsense_policy_is_refused(first_s: float, factor: float, max_s: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackoffPolicy(first_s=first_s, factor=factor, max_s=max_s)
