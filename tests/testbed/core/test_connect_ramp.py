"""The connect ramp: bounded connects in flight, first come first served, a failed or cancelled connect frees its slot."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings, strategies as st

from testbed.core.connect_ramp import ConnectRamp

WAIT_S = 10.0  # an inner bound on every wait below: nothing here should take more than a few loop passes


async def _passes(count: int = 5) -> None:
    """Let the loop run every ready callback a few times over."""
    for _ in range(count):
        await asyncio.sleep(0)


def test_a_limit_below_one_is_refused_in_one_line() -> None:
    with pytest.raises(ValueError, match="at least 1 connect in flight, got 0"):
        ConnectRamp(0)


@settings(max_examples=40, deadline=None)
@given(limit=st.integers(1, 6), connects=st.integers(0, 30), failing=st.sets(st.integers(0, 29)))
def test_never_more_than_limit_in_flight_and_every_connect_gets_its_turn(limit: int, connects: int,
                                                                        failing: set[int]) -> None:
    async def main() -> tuple[int, list[int]]:
        ramp = ConnectRamp(limit)
        in_flight, peak, done = 0, 0, []

        async def connect(number: int) -> None:
            nonlocal in_flight, peak
            slot = await ramp.acquire()
            try:
                in_flight += 1
                peak = max(peak, in_flight)
                await asyncio.sleep(0)
                if number in failing:
                    raise ConnectionRefusedError(f"connect {number} refused")
                done.append(number)
            finally:
                in_flight -= 1
                slot.release()

        results = await asyncio.wait_for(asyncio.gather(*(connect(n) for n in range(connects)),
                                                        return_exceptions=True), WAIT_S)
        assert [n for n, r in enumerate(results) if isinstance(r, ConnectionRefusedError)] == sorted(
            failing & set(range(connects)))
        assert ramp.in_flight == 0 and ramp.waiting == 0
        return peak, done

    peak, done = asyncio.run(main())
    assert peak <= limit
    assert peak == min(limit, connects)
    assert done == [n for n in range(connects) if n not in failing]  # in arrival order: first come, first served


def test_a_slot_goes_to_the_oldest_waiter_not_to_a_newcomer() -> None:
    async def main() -> list[str]:
        ramp = ConnectRamp(1)
        order: list[str] = []
        held = await ramp.acquire()

        async def connect(name: str) -> None:
            slot = await ramp.acquire()
            order.append(name)
            slot.release()

        early = asyncio.create_task(connect("waited first"))
        await _passes()
        held.release()  # handed to the waiter at once: a connect arriving now queues behind it
        late = asyncio.create_task(connect("arrived after the release"))
        await asyncio.wait_for(asyncio.gather(early, late), WAIT_S)
        return order

    assert asyncio.run(main()) == ["waited first", "arrived after the release"]


def test_a_connect_that_hangs_until_cancelled_does_not_stall_the_others() -> None:
    """One slot is held by a connect that never finishes; the others go through the remaining one, and cancelling the
    hung one (its own timeout) lets a last waiter in."""
    async def main() -> list[int]:
        ramp = ConnectRamp(2)
        done: list[int] = []

        async def hung() -> None:
            slot = await ramp.acquire()
            try:
                await asyncio.Event().wait()
            finally:
                slot.release()

        async def connect(number: int) -> None:
            slot = await ramp.acquire()
            try:
                await asyncio.sleep(0)
                done.append(number)
            finally:
                slot.release()

        stuck = asyncio.create_task(hung())
        await _passes()
        await asyncio.wait_for(asyncio.gather(*(connect(n) for n in range(10))), WAIT_S)
        assert ramp.in_flight == 1
        stuck.cancel()
        await asyncio.gather(stuck, return_exceptions=True)
        assert ramp.in_flight == 0
        return done

    assert asyncio.run(main()) == list(range(10))


def test_a_waiter_cancelled_before_or_at_its_turn_passes_the_slot_on() -> None:
    async def main() -> None:
        ramp = ConnectRamp(1)
        held = await ramp.acquire()
        gave_up = asyncio.create_task(ramp.acquire())  # cancelled while waiting
        handed = asyncio.create_task(ramp.acquire())  # cancelled just as its slot is handed over
        last = asyncio.create_task(ramp.acquire())
        await _passes()
        assert ramp.waiting == 3
        gave_up.cancel()
        await _passes()
        assert ramp.waiting == 2
        held.release()
        handed.cancel()  # its future is already resolved: the slot must go on to `last`
        slot = await asyncio.wait_for(last, WAIT_S)
        assert handed.cancelled() and ramp.in_flight == 1
        slot.release()
        slot.release()  # a second release changes nothing
        assert ramp.in_flight == 0 and ramp.waiting == 0

    asyncio.run(main())
