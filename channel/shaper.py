"""Rate shapers of a link model: when may ``cost`` bytes leave, given they are ready at ``start_s``.

Every shaper is called with non-decreasing ``start_s`` (the link serialises its packets) and
returns the departure time (>= ``start_s``). Three kinds:

* ``TokenBucket`` — a fixed rate (or unlimited) with a bucket of ``depth_bytes``;
* ``RateScheduleBucket`` — the same bucket filling at a piecewise-constant rate (CSV trace);
* ``OpportunityShaper`` — Mahimahi's delivery opportunities (no bucket: unused opportunities are lost).
"""

from __future__ import annotations

from typing import Protocol

from channel.trace import MahimahiTrace, RateScheduleTrace, RateTrace

_TIME_TOLERANCE_MS = 1e-6  # absorbs float round-off when a packet is ready exactly at an opportunity


class Shaper(Protocol):
    def grant(self, start_s: float, cost: int) -> float:
        """Consume ``cost`` bytes of capacity at or after ``start_s``; return the departure time."""
        ...

    def release_after(self, now_s: float) -> None:
        """Give back capacity granted for times after ``now_s`` (its sender is gone); the link is busy
        up to ``now_s``, so the bucket restarts empty there."""
        ...


class TokenBucket:
    """Bytes (payload + overhead) accumulate at ``rate_bps / 8`` up to ``depth_bytes``; None = unlimited."""

    def __init__(self, rate_bps: float | None, depth_bytes: int) -> None:
        self._bytes_per_s = None if rate_bps is None else rate_bps / 8.0
        self._depth = float(depth_bytes)
        self._tokens = self._depth
        self._bucket_time: float | None = None

    def grant(self, start_s: float, cost: int) -> float:
        if self._bytes_per_s is None:
            return start_s
        if self._bucket_time is None:
            tokens = self._depth
        else:
            tokens = min(self._depth, self._tokens + (start_s - self._bucket_time) * self._bytes_per_s)
        if tokens >= cost:
            departure = start_s
            self._tokens = tokens - cost
        else:
            departure = start_s + (cost - tokens) / self._bytes_per_s
            self._tokens = 0.0
        self._bucket_time = departure
        return departure

    def release_after(self, now_s: float) -> None:
        if self._bucket_time is not None and self._bucket_time > now_s:
            self._bucket_time = now_s
            self._tokens = 0.0


class RateScheduleBucket:
    """A token bucket of ``depth_bytes`` whose fill rate follows a rate schedule from ``epoch_s``."""

    def __init__(self, trace: RateScheduleTrace, depth_bytes: int, epoch_s: float) -> None:
        self._trace = trace
        self._depth = float(depth_bytes)
        self._epoch = epoch_s
        self._tokens = self._depth
        self._capacity = 0.0  # trace capacity (bytes since epoch) at the last update

    def grant(self, start_s: float, cost: int) -> float:
        capacity = max(self._capacity, self._trace.capacity_bytes(start_s - self._epoch))
        # the fill is monotone, so capping once at the end equals capping continuously
        tokens = min(self._depth, self._tokens + capacity - self._capacity)
        if tokens >= cost:
            self._tokens = tokens - cost
            self._capacity = capacity
            return start_s
        target = capacity + cost - tokens
        self._tokens = 0.0
        self._capacity = target
        return max(start_s, self._epoch + self._trace.time_for_capacity(target))

    def release_after(self, now_s: float) -> None:
        capacity_now = self._trace.capacity_bytes(max(0.0, now_s - self._epoch))
        if self._capacity > capacity_now:
            self._capacity = capacity_now
            self._tokens = 0.0


class OpportunityShaper:
    """Mahimahi's link: bytes leave only at delivery opportunities, FIFO, packets may span several."""

    def __init__(self, trace: MahimahiTrace, epoch_s: float) -> None:
        self._trace = trace
        self._epoch = epoch_s
        self._index = -1  # current opportunity
        self._left = 0  # bytes left in it

    def grant(self, start_s: float, cost: int) -> float:
        trace = self._trace
        ready_ms = (start_s - self._epoch) * 1000.0 - _TIME_TOLERANCE_MS
        if not (self._left > 0 and trace.opportunity_ms(self._index) >= ready_ms):
            # the packet arrived after the current opportunity: wait for the next one at or after it
            self._index = max(trace.first_opportunity_at_or_after(ready_ms), self._index + 1)
            self._left = trace.bytes_per_opportunity
        while cost > self._left:
            cost -= self._left
            self._index += 1
            self._left = trace.bytes_per_opportunity
        self._left -= cost
        return max(start_s, self._epoch + trace.opportunity_ms(self._index) / 1000.0)

    def release_after(self, now_s: float) -> None:
        now_ms = (now_s - self._epoch) * 1000.0
        if self._index >= 0 and self._trace.opportunity_ms(self._index) > now_ms:
            self._index = self._trace.first_opportunity_at_or_after(now_ms) - 1
            self._left = 0


def make_shaper(rate_bps: float | None, trace: RateTrace | None, depth_bytes: int, epoch_s: float) -> Shaper:
    """The shaper for a link's rate: the trace if given (timed from ``epoch_s``), else a token bucket."""
    if isinstance(trace, MahimahiTrace):
        return OpportunityShaper(trace, epoch_s)
    if isinstance(trace, RateScheduleTrace):
        return RateScheduleBucket(trace, depth_bytes, epoch_s)
    return TokenBucket(rate_bps, depth_bytes)
