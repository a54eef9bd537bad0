"""A connection ramp: at most `limit` of a process's connects in flight at once, the others wait their turn in order."""

from __future__ import annotations

import asyncio
import collections

CONNECTS_IN_FLIGHT = 32
"""A process's device connects in flight at once (TCP connect through the device's link, MQTT CONNECT, subscriptions
and the first publishes). Ten thousand devices over five workers all connecting at once kept Mosquitto and the workers'
loops so busy that connects timed out and were retried, each retry taking more ephemeral ports (issue 13)."""


class RampSlot:
    """One connect's place in the ramp: `release()` it once connected, or when the connect failed (again: no-op)."""

    def __init__(self, ramp: ConnectRamp) -> None:
        self._ramp: ConnectRamp | None = ramp

    def release(self) -> None:
        ramp, self._ramp = self._ramp, None
        if ramp is not None:
            ramp._hand_on()


class ConnectRamp:
    """Bounds the connects in flight: `slot = await ramp.acquire()`, connect, `slot.release()` (in a `finally`).

    Waiters get their slot first come, first served; a slot is handed straight to the oldest waiter when released,
    so a stream of new arrivals cannot overtake it. A waiter cancelled before its turn leaves the queue; one
    cancelled just as its turn came passes the slot on. Not a timer: nothing waits longer than the connects ahead.
    """

    def __init__(self, limit: int = CONNECTS_IN_FLIGHT) -> None:
        if limit < 1:
            raise ValueError(f"a connect ramp needs a limit of at least 1 connect in flight, got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.peak_in_flight = 0
        """The most connects that were in flight at once so far."""
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Connects waiting for a slot."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self) -> RampSlot:
        """A slot, once fewer than `limit` connects are in flight and every earlier waiter has had its turn."""
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            return RampSlot(self)
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # the slot was handed over as the wait was cancelled
                self._hand_on()
            elif waiter in self._waiters:  # (a release meanwhile may have dropped it already)
                self._waiters.remove(waiter)
            raise
        return RampSlot(self)

    def _hand_on(self) -> None:
        """A slot is free: give it to the oldest waiter still waiting, else count one connect fewer in flight."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1
