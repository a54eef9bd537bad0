"""Several device flows behind one bottleneck (a shared cell): one shaper, loss, delay and outage process."""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np

from channel.link import LinkCounters, LinkModel, LinkParameters


class _SharedBottleneck(LinkModel):
    """A LinkModel whose retransmissions never hold the shared queue (see SharedLink)."""

    _defer_retransmissions = True


class SharedLink:
    """N flows (one per device) sharing one link direction: ``transmit(flow_id, now_s, size_bytes)``.

    * One FIFO shaper (token bucket or trace), one loss process (a Gilbert-Elliott fade hits every
      flow), one delay process and one outage timeline, all drawn from ``rng`` in call order.
    * Each flow keeps TCP semantics of its own: retransmission after its RTO with backoff and
      in-order delivery (a flow's delivery never precedes its previous delivery), independent of
      the other flows' deliveries.
    * A retransmission's bytes are charged to the shared bucket when the loss is detected (in call
      order) and the copy leaves at ``max(resend time, granted time)``; so one flow waiting for its
      RTO does not idle the bottleneck for the others. (``LinkModel`` instead queues the resend at
      its resend time, holding back its own later segments — right for one flow, wrong for a cell.)
    * Fairness is that of a FIFO bottleneck: flows share the rate in proportion to what they
      offer, so window-limited flows with equal windows split it evenly. It does not model a
      proportional-fair radio scheduler.

    Pure and seeded like LinkModel: the same seed and call sequence give the same results.
    """

    def __init__(self, params: LinkParameters, rng: np.random.Generator) -> None:
        self.params = params
        self._bottleneck = _SharedBottleneck(params, rng)
        self._last_delivery: dict[Hashable, float] = {}
        self.flow_payload_bytes: dict[Hashable, int] = {}

    @property
    def counters(self) -> LinkCounters:
        """Counters of the shared bottleneck (all flows together)."""
        return self._bottleneck.counters

    @property
    def flows(self) -> list[Hashable]:
        """Flow ids seen so far, in order of first use."""
        return list(self._last_delivery)

    def last_delivery_s(self, flow_id: Hashable) -> float:
        """Delivery time of ``flow_id``'s latest segment (-inf before its first)."""
        return self._last_delivery.get(flow_id, -math.inf)

    def outage_at(self, t: float) -> tuple[float, float] | None:
        """``(start, end)`` of the shared link's outage covering ``t``, or None."""
        return self._bottleneck.outage_at(t)

    def transmit(self, flow_id: Hashable, now_s: float, size_bytes: int) -> float:
        """Send one segment of flow ``flow_id`` handed over at ``now_s``; return its in-order delivery time."""
        self._bottleneck._check_segment(now_s, size_bytes)
        arrival = self._bottleneck._send_segment(now_s, size_bytes)
        delivery = max(arrival, self._last_delivery.get(flow_id, -math.inf))
        self._last_delivery[flow_id] = delivery
        self.flow_payload_bytes[flow_id] = self.flow_payload_bytes.get(flow_id, 0) + size_bytes
        return delivery
