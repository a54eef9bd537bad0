"""Loss recovery of a link model's TCP stream as TCP does it: fast retransmit after three later arrivals, else an RTO.

``LinkModel.send`` hands segments to a ``FastRecovery``; a segment lost on the link is a *hole*
whose delivery is not decided until either

* three segments handed over after it before its RTO fires have arrived: the receiver's
  duplicate ACKs (or SACKs) reach the sender one delay later, and the segment is resent then,
  about one round trip after it was lost (a *fast* retransmission; the RTO a real sender keeps is
  above the round trips it measures, serialisation and queueing included, so the model does not
  let ``rto_s``, which counts only the delay, overtake these ACKs); or
* its RTO, ``rto · 2^k`` after the lost attempt departed, comes first, with fewer than three later
  segments handed over that arrived: a *tail* loss, resent by *timeout*.

A fast retransmission leaves at its resend time, ahead of the segments waiting for the rate (a
TCP sender sends it before new data), its airtime charged to the bottleneck's next free slot: the
link carries the later segments meanwhile instead of idling for an RTO. A timeout's resend queues behind what was
handed over before it fired. A lost retransmission is a hole again, with the next backoff.
Segments behind a hole wait for it (in-order delivery), so decisions come out in send order.

Pure: every decision is a function of the calls (times and sizes) and the model's random stream.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

#: Segments arriving after a lost one that make the sender resend it (three duplicate ACKs, RFC 5681).
DUPLICATE_ACK_THRESHOLD = 3
RECOVERY_MODES = ("fast", "rto")


@dataclass(frozen=True)
class Recovery:
    """How one lost attempt was recovered: which segment, when it was lost, when and why it was resent."""

    segment: int  # index of the segment in send order (from 0; a new stream does not restart it)
    lost_departure_s: float
    resend_s: float
    kind: Literal["fast", "timeout"]
    later_arrivals: int  # later segments handed over (and arrived) before the decision


@dataclass
class PendingSegment:
    """A segment whose delivery is not decided yet: lost (``arrival_s`` None) or behind a loss."""

    index: int
    cost: int
    arrival_s: float | None = None
    losses: int = 0
    lost_departure_s: float = -math.inf
    deadline_s: float = math.inf  # when its RTO fires
    later_arrivals: list[float] = field(default_factory=list)


class AttemptCarrier(Protocol):
    """What FastRecovery needs of the link model: one attempt at a departure, and the bottleneck's slots."""

    def attempt(self, segment: PendingSegment, departure_s: float) -> None:
        """Carry one attempt departing at ``departure_s``: set ``arrival_s``, or make it a hole (deadline set)."""
        ...

    def resend_departure(self, resend_s: float, cost: int, ahead: bool) -> float:
        """Departure of a retransmission due at ``resend_s`` (ahead of the queued segments, or behind them)."""
        ...


class FastRecovery:
    """The undecided tail of one TCP stream: its holes, the segments behind them, and the decisions."""

    def __init__(self, delay_s: float) -> None:
        self.ack_delay_s = delay_s  # the duplicate ACKs' way back, taken as this direction's delay
        self.undecided: deque[PendingSegment] = deque()
        self.holes: list[PendingSegment] = []
        self.recoveries: list[Recovery] | None = None  # a list records every recovery (tests, benchmarks)
        self.fast_retransmits = 0
        self.timeout_retransmits = 0

    @property
    def next_deadline_s(self) -> float | None:
        """The earliest RTO among the holes (None if every segment is decided)."""
        return min((hole.deadline_s for hole in self.holes), default=None)

    def clear(self) -> None:
        """Forget every undecided segment (their stream is gone)."""
        self.undecided.clear()
        self.holes.clear()

    def add(self, segment: PendingSegment, departure_s: float, carrier: AttemptCarrier, count_arrivals: bool) -> None:
        """A newly sent segment, its first attempt carried (departing at ``departure_s``): queue it; if it
        arrived and ``count_arrivals``, it counts towards the fast retransmission of every hole lost before."""
        self.undecided.append(segment)
        if segment.arrival_s is None:
            self.holes.append(segment)
            return
        if not count_arrivals:
            return
        for hole in list(self.holes):
            if hole.lost_departure_s >= departure_s:
                continue  # a retransmission lost after this segment left: this one is no later segment of it
            hole.later_arrivals.append(segment.arrival_s)
            if len(hole.later_arrivals) == DUPLICATE_ACK_THRESHOLD:
                self._resend(hole, max(hole.later_arrivals) + self.ack_delay_s, "fast", carrier)

    def expire(self, now_s: float, carrier: AttemptCarrier) -> None:
        """Resend by timeout every hole whose RTO fired by ``now_s`` (earliest first)."""
        while True:
            due = [hole for hole in self.holes if hole.deadline_s <= now_s]
            if not due:
                return
            hole = min(due, key=lambda pending: pending.deadline_s)
            self._resend(hole, hole.deadline_s, "timeout", carrier)

    def _resend(self, hole: PendingSegment, resend_s: float, kind: Literal["fast", "timeout"],
                carrier: AttemptCarrier) -> None:
        self.holes.remove(hole)
        if kind == "fast":
            self.fast_retransmits += 1
        else:
            self.timeout_retransmits += 1
        if self.recoveries is not None:
            self.recoveries.append(Recovery(hole.index, hole.lost_departure_s, resend_s, kind,
                                            len(hole.later_arrivals)))
        hole.later_arrivals = []
        carrier.attempt(hole, carrier.resend_departure(resend_s, hole.cost, ahead=kind == "fast"))
        if hole.arrival_s is None:
            self.holes.append(hole)

    def decided_arrivals(self) -> list[float]:
        """Pop the oldest undecided segments whose arrival is now known (up to the first hole); their arrivals."""
        arrivals: list[float] = []
        undecided = self.undecided
        while undecided:
            arrival = undecided[0].arrival_s
            if arrival is None:
                break
            undecided.popleft()
            arrivals.append(arrival)
        return arrivals


def in_order(arrivals: list[float], last_delivery_s: float) -> list[float]:
    """Delivery times of a stream's next segments arriving at ``arrivals`` after one delivered at ``last_delivery_s``:
    each no sooner than the one before it (in-order delivery, head-of-line blocking)."""
    deliveries = []
    for arrival in arrivals:
        last_delivery_s = max(arrival, last_delivery_s)
        deliveries.append(last_delivery_s)
    return deliveries
