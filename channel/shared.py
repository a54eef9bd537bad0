"""Several device flows behind one bottleneck (a shared cell): one shaper, loss, delay and outage process."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Hashable

import numpy as np

from channel.link import LinkCounters, LinkModel, LinkParameters

_COUNTER_FIELDS = tuple(field.name for field in dataclasses.fields(LinkCounters))
_counter_values = operator.attrgetter(*_COUNTER_FIELDS)


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
    * ``flow(flow_id)`` gives a SharedFlow: one flow with the surface of a LinkModel direction, so
      a ``LinkProxy`` per device can carry its connection through the shared bottleneck.

    Pure and seeded like LinkModel: the same seed and call sequence give the same results.
    """

    def __init__(self, params: LinkParameters, rng: np.random.Generator) -> None:
        self.params = params
        self._bottleneck = _SharedBottleneck(params, rng)
        self._last_delivery: dict[Hashable, float] = {}
        self._flow_counters: dict[Hashable, LinkCounters] = {}

    @property
    def counters(self) -> LinkCounters:
        """Counters of the shared bottleneck (all flows together)."""
        return self._bottleneck.counters

    @property
    def flows(self) -> list[Hashable]:
        """Flow ids seen so far (by ``transmit`` or ``flow``), in order of first use."""
        return list(self._flow_counters)

    @property
    def flow_payload_bytes(self) -> dict[Hashable, int]:
        """Payload bytes each flow has handed to the link."""
        return {flow: counters.payload_bytes for flow, counters in self._flow_counters.items()}

    def flow_counters(self, flow_id: Hashable) -> LinkCounters:
        """What the link has carried for ``flow_id`` alone (the flows' counters add up to ``counters``)."""
        return self._flow_counters.setdefault(flow_id, LinkCounters())

    def flow(self, flow_id: Hashable) -> SharedFlow:
        """``flow_id``'s view of this link, with the surface of one LinkModel direction (see SharedFlow)."""
        return SharedFlow(self, flow_id)

    def last_delivery_s(self, flow_id: Hashable) -> float:
        """Delivery time of ``flow_id``'s latest segment (-inf before its first)."""
        return self._last_delivery.get(flow_id, -math.inf)

    def outage_at(self, t: float) -> tuple[float, float] | None:
        """``(start, end)`` of the shared link's outage covering ``t``, or None."""
        return self._bottleneck.outage_at(t)

    def new_stream(self, flow_id: Hashable, now_s: float) -> None:
        """Flow ``flow_id`` starts a new TCP connection: its in-order hold-back ends with the old one.

        Unlike ``LinkModel.new_stream``, capacity already granted stays granted: the bottleneck is
        a FIFO queue of every flow's bytes, and what the old connection queued still drains through
        it (as in a router's queue), so the other flows' schedule is never rewritten.
        """
        self._last_delivery.pop(flow_id, None)

    def transmit(self, flow_id: Hashable, now_s: float, size_bytes: int) -> float:
        """Send one segment of flow ``flow_id`` handed over at ``now_s``; return its in-order delivery time."""
        bottleneck = self._bottleneck
        bottleneck._check_segment(now_s, size_bytes)
        total = bottleneck.counters
        before = _counter_values(total)
        arrival = bottleneck._send_segment(now_s, size_bytes)
        flow = self.flow_counters(flow_id)
        for field, was, now in zip(_COUNTER_FIELDS, before, _counter_values(total)):
            if now != was:
                setattr(flow, field, getattr(flow, field) + (now - was))
        delivery = max(arrival, self._last_delivery.get(flow_id, -math.inf))
        self._last_delivery[flow_id] = delivery
        return delivery


class SharedFlow:
    """One flow of a SharedLink seen as one link direction: what ``LinkProxy`` needs of a LinkModel.

    ``transmit(now_s, size_bytes)``, ``outage_at(t)``, ``new_stream(now_s)`` (this flow's in-order
    reset only), ``params`` (the shared link's) and ``last_delivery_s``. ``counters`` are this
    flow's own (so per-device link metrics add up to the cell's total without counting a byte
    twice); the whole bottleneck's are ``shared_counters``.
    """

    def __init__(self, shared: SharedLink, flow_id: Hashable) -> None:
        self.shared = shared
        self.flow_id = flow_id
        self.params = shared.params
        self.counters = shared.flow_counters(flow_id)

    @property
    def shared_counters(self) -> LinkCounters:
        """Counters of the whole bottleneck (every flow of the cell)."""
        return self.shared.counters

    @property
    def last_delivery_s(self) -> float:
        """Delivery time of this flow's latest segment (-inf before its first)."""
        return self.shared.last_delivery_s(self.flow_id)

    def outage_at(self, t: float) -> tuple[float, float] | None:
        """``(start, end)`` of the shared link's outage covering ``t``, or None."""
        return self.shared.outage_at(t)

    def new_stream(self, now_s: float) -> None:
        """This flow starts a new TCP connection (see ``SharedLink.new_stream``)."""
        self.shared.new_stream(self.flow_id, now_s)

    def transmit(self, now_s: float, size_bytes: int) -> float:
        """Send one segment of this flow handed over at ``now_s``; return its in-order delivery time."""
        return self.shared.transmit(self.flow_id, now_s, size_bytes)
