"""Several device flows behind one bottleneck (a shared cell): one shaper, loss, delay and outage process."""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np

from channel.errors import ChannelError
from channel.link import LinkCounters, LinkModel, LinkParameters
from channel.outage import OutageTimeline
from channel.recovery import FastRecovery, PendingSegment, in_order

_COUNTER_FIELDS = tuple(field.name for field in dataclasses.fields(LinkCounters))
_counter_values = operator.attrgetter(*_COUNTER_FIELDS)


class _SharedBottleneck(LinkModel):
    """A LinkModel whose retransmissions never hold the shared queue, and whose attempts also meet the outages of
    the flow being carried (``flow_outages``, set by SharedLink around each call).

    An attempt meeting the flow's own cut (not the link's outage) is a probe that costs the cell no airtime: the
    device is out of reach, and a real sender in RTO backoff probes with one segment per RTO, not with each. The
    attempt that gets past the cut is charged as any retransmission of a cell is (the bucket's next free slot, in
    call order; it leaves then if that is later), so a device back from a cut does not burst past the rate.
    """

    _defer_retransmissions = True
    flow_outages: OutageTimeline | None = None
    _probing = False  # the attempt just carried met the flow's own cut: its resend is an uncharged probe
    _probe_departure_s: float | None = None  # departure of the uncharged probe being carried

    def _outage_meets(self, departure_s: float, arrival_s: float) -> bool:
        self._probing = False
        if super()._outage_meets(departure_s, arrival_s):
            return True
        own = self.flow_outages
        self._probing = own is not None and own.overlapping(departure_s, arrival_s) is not None
        return self._probing

    def _resend(self, resend_s: float, cost: int) -> float:
        if not self._probing:
            return super()._resend(resend_s, cost)
        self._probing = False
        self._probe_departure_s = resend_s
        return resend_s

    def attempt(self, segment: PendingSegment, departure_s: float) -> None:
        super().attempt(segment, departure_s)
        while self._probe_departure_s is not None:  # its last attempt left uncharged: it got past the cut (or was lost)
            probe_s, self._probe_departure_s = self._probe_departure_s, None
            granted = self._shaper.grant(self._last_departure, segment.cost)
            self._last_departure = granted
            self.counters.wire_bytes += segment.cost
            if segment.arrival_s is None or granted <= probe_s:
                return
            self.counters.queueing_delay_s += granted - probe_s
            arrival = segment.arrival_s + (granted - probe_s)
            if not self._outage_meets(granted, arrival):
                segment.arrival_s = arrival
                return
            self._probing = False
            super().attempt(segment, granted)  # moved into an outage: a fresh attempt from its slot


@dataclass
class _Flow:
    """What one flow keeps of its own: its counters, TCP stream (recovery, in-order delivery) and outages."""

    recovery: FastRecovery
    counters: LinkCounters = field(default_factory=LinkCounters)
    last_delivery_s: float = -math.inf
    segments_sent: int = 0
    outages: OutageTimeline | None = None

    def in_order(self, arrivals: list[float]) -> list[float]:
        deliveries = in_order(arrivals, self.last_delivery_s)
        if deliveries:
            self.last_delivery_s = deliveries[-1]
        return deliveries


class SharedLink:
    """N flows (one per device) sharing one link direction: ``send(flow_id, now_s, size_bytes)``.

    * One FIFO shaper (token bucket or trace), one loss process (a Gilbert-Elliott fade hits every
      flow), one delay process and one outage timeline, all drawn from ``rng`` in call order.
    * Each flow keeps TCP semantics of its own: in-order delivery (a flow's delivery never precedes
      its previous delivery) independent of the other flows' deliveries, and loss recovery as
      ``params.recovery`` says (``channel.recovery``, as ``LinkModel.send``/``decide``): ``fast``
      resends a lost segment once three later segments *of the same flow* arrived (its receiver's
      duplicate ACKs), about one round trip after the loss, and only a tail loss waits for its RTO;
      ``rto`` waits for the RTO every time. Each flow's decisions come in its own calls
      (``send``/``decide`` of that flow), so a flow's RTO is charged when that flow's clock reaches
      it; ``next_decision_s(flow_id)`` says when.
    * A retransmission's bytes are charged to the shared bucket when it is decided (in call order):
      a timeout's or an outage's resend leaves at ``max(resend time, granted time)``, a fast one at
      its resend time, its airtime taking the next free slot (as on one link); so one flow waiting
      for its RTO does not idle the bottleneck for the others. (``LinkModel.transmit`` instead
      queues a resend at its resend time, holding back its own later segments — right for one
      flow, wrong for a cell.)
    * Fairness is that of a FIFO bottleneck: flows share the rate in proportion to what they
      offer, so window-limited flows with equal windows split it evenly. It does not model a
      proportional-fair radio scheduler.
    * At run time: ``reconfigure(params, now_s)`` changes the whole link from ``now_s`` (as
      ``LinkModel.reconfigure``), ``add_outage`` takes it down for every flow, ``add_flow_outage``
      cuts one flow only (a device out of coverage: its attempts meeting the cut are lost and
      resent on the RTO backoff, the probes into the cut costing the cell no airtime, while the other
      flows go on).
    * ``flow(flow_id)`` gives a SharedFlow: one flow with the surface of a LinkModel direction, so
      a ``LinkProxy`` per device can carry its connection through the shared bottleneck.

    ``transmit(flow_id, ...)`` is the RTO-only stream of one flow that decides each segment at once
    (``LinkModel.transmit``'s counterpart). Pure and seeded like LinkModel: the same seed and call
    sequence give the same results.
    """

    def __init__(self, params: LinkParameters, rng: np.random.Generator) -> None:
        self._bottleneck = _SharedBottleneck(params, rng)
        self._flows: dict[Hashable, _Flow] = {}

    @property
    def params(self) -> LinkParameters:
        """The link's parameters now (``reconfigure`` changes them)."""
        return self._bottleneck.params

    @property
    def counters(self) -> LinkCounters:
        """Counters of the shared bottleneck (all flows together)."""
        return self._bottleneck.counters

    @property
    def flows(self) -> list[Hashable]:
        """Flow ids seen so far (by ``transmit``, ``send`` or ``flow``), in order of first use."""
        return list(self._flows)

    @property
    def flow_payload_bytes(self) -> dict[Hashable, int]:
        """Payload bytes each flow has handed to the link."""
        return {flow_id: flow.counters.payload_bytes for flow_id, flow in self._flows.items()}

    def _flow(self, flow_id: Hashable) -> _Flow:
        flow = self._flows.get(flow_id)
        if flow is None:
            flow = self._flows[flow_id] = _Flow(FastRecovery(self.params.delay_s))
        return flow

    def flow_counters(self, flow_id: Hashable) -> LinkCounters:
        """What the link has carried for ``flow_id`` alone (the flows' counters add up to ``counters``)."""
        return self._flow(flow_id).counters

    def recovery(self, flow_id: Hashable) -> FastRecovery:
        """``flow_id``'s undecided segments and recovery counts (set its ``recoveries`` to a list to record them)."""
        return self._flow(flow_id).recovery

    def flow(self, flow_id: Hashable) -> SharedFlow:
        """``flow_id``'s view of this link, with the surface of one LinkModel direction (see SharedFlow)."""
        return SharedFlow(self, flow_id)

    def last_delivery_s(self, flow_id: Hashable) -> float:
        """Delivery time of ``flow_id``'s latest segment (-inf before its first)."""
        flow = self._flows.get(flow_id)
        return -math.inf if flow is None else flow.last_delivery_s

    def outage_at(self, t: float) -> tuple[float, float] | None:
        """``(start, end)`` of the shared link's outage covering ``t``, or None."""
        return self._bottleneck.outage_at(t)

    def flow_outage_at(self, flow_id: Hashable, t: float) -> tuple[float, float] | None:
        """``(start, end)`` of what keeps ``flow_id`` down at ``t`` (the link's outage or its own, merged), or None."""
        shared = self._bottleneck.outage_at(t)
        flow = self._flows.get(flow_id)
        own = None if flow is None or flow.outages is None else flow.outages.outage_at(t)
        if shared is None or own is None:
            return shared or own
        return min(shared[0], own[0]), max(shared[1], own[1])

    def reconfigure(self, params: LinkParameters, now_s: float) -> None:
        """Carry what any flow hands over from ``now_s`` with ``params`` (``LinkModel.reconfigure``: rate, loss and
        delay start afresh, the random stream goes on, delivery times given out are kept)."""
        self._bottleneck.reconfigure(params, now_s)
        for flow in self._flows.values():
            flow.recovery.ack_delay_s = params.delay_s

    def add_outage(self, start_s: float, end_s: float) -> None:
        """The whole link is down over ``[start_s, end_s)`` for every flow (``LinkModel.add_outage``)."""
        self._bottleneck.add_outage(start_s, end_s)

    def add_flow_outage(self, flow_id: Hashable, start_s: float, end_s: float) -> None:
        """Flow ``flow_id`` alone is cut over ``[start_s, end_s)``: its attempts meeting the cut are lost and resent on
        the RTO backoff (as for the link's outages, but these probes cost the cell no airtime) while the other flows
        carry on."""
        if not (math.isfinite(start_s) and math.isfinite(end_s) and end_s > start_s):
            raise ChannelError(f"add_flow_outage({flow_id!r}, {start_s!r}, {end_s!r}) is invalid: expected finite "
                               "start < end")
        bottleneck = self._bottleneck
        bottleneck._begin(start_s)
        flow = self._flow(flow_id)
        if flow.outages is None:
            assert bottleneck.epoch_s is not None
            flow.outages = OutageTimeline(bottleneck.epoch_s, (), None, None)
        flow.outages.add(start_s, end_s)

    def new_stream(self, flow_id: Hashable, now_s: float) -> None:
        """Flow ``flow_id`` starts a new TCP connection: its in-order hold-back and undecided segments end with the old.

        Unlike ``LinkModel.new_stream``, capacity already granted stays granted: the bottleneck is
        a FIFO queue of every flow's bytes, and what the old connection queued still drains through
        it (as in a router's queue), so the other flows' schedule is never rewritten.
        """
        flow = self._flows.get(flow_id)
        if flow is not None:
            flow.recovery.clear()
            flow.last_delivery_s = -math.inf

    def _carry(self, flow: _Flow) -> tuple[float, ...]:
        """Start carrying ``flow``'s segments: its outages apply; the counters before (see ``_carried``)."""
        self._bottleneck.flow_outages = flow.outages
        return _counter_values(self._bottleneck.counters)  # type: ignore[no-any-return]

    def _carried(self, flow: _Flow, before: tuple[float, ...]) -> None:
        """Done carrying ``flow``'s segments: what the bottleneck's counters gained since ``before`` is the flow's."""
        self._bottleneck.flow_outages = None
        for name, was, now in zip(_COUNTER_FIELDS, before, _counter_values(self._bottleneck.counters)):
            if now != was:
                setattr(flow.counters, name, getattr(flow.counters, name) + (now - was))

    def transmit(self, flow_id: Hashable, now_s: float, size_bytes: int) -> float:
        """Send one segment of flow ``flow_id`` handed over at ``now_s``, losses recovered by RTO; return its in-order
        delivery time. ChannelError while ``send`` has left segments of this flow undecided."""
        bottleneck = self._bottleneck
        bottleneck._check_segment(now_s, size_bytes)
        flow = self._flow(flow_id)
        if flow.recovery.undecided:
            raise ChannelError(f"transmit at {now_s!r}: {len(flow.recovery.undecided)} segments of flow {flow_id!r} "
                               "sent with 'send' are undecided; carry on with send/decide")
        before = self._carry(flow)
        try:
            arrival = bottleneck._send_segment(now_s, size_bytes)
        finally:
            self._carried(flow, before)
        flow.segments_sent += 1
        return flow.in_order([arrival])[0]

    def send(self, flow_id: Hashable, now_s: float, size_bytes: int) -> list[float]:
        """Send one segment of flow ``flow_id`` handed over at ``now_s``, losses recovered as ``params.recovery`` says;
        return the delivery times of this flow's segments this call decided, oldest first (``LinkModel.send``).

        Each segment gets exactly one delivery time, from this call or a later ``send``/``decide`` of its flow; a
        flow's calls come in non-decreasing time. Its RTOs due by ``now_s`` fire first.
        """
        bottleneck = self._bottleneck
        bottleneck._check_segment(now_s, size_bytes)
        flow = self._flow(flow_id)
        mode = bottleneck.params.recovery
        if mode == "rto" and not flow.recovery.undecided:
            return [self.transmit(flow_id, now_s, size_bytes)]
        before = self._carry(flow)
        try:
            flow.recovery.expire(now_s, bottleneck)
            segment, departure = bottleneck._new_segment(now_s, size_bytes)
            segment.index = flow.segments_sent
            flow.segments_sent += 1
            bottleneck.attempt(segment, departure)
            flow.recovery.add(segment, departure, bottleneck, count_arrivals=mode == "fast")
        finally:
            self._carried(flow, before)
        return flow.in_order(flow.recovery.decided_arrivals())

    def decide(self, flow_id: Hashable, now_s: float) -> list[float]:
        """Flow ``flow_id``'s clock reached ``now_s``: resend its tail losses whose RTO fired; the delivery times
        decided."""
        flow = self._flow(flow_id)
        if not flow.recovery.holes:
            return []
        before = self._carry(flow)
        try:
            flow.recovery.expire(now_s, self._bottleneck)
        finally:
            self._carried(flow, before)
        return flow.in_order(flow.recovery.decided_arrivals())

    def next_decision_s(self, flow_id: Hashable) -> float | None:
        """When ``decide(flow_id, ...)`` will next decide something if the flow sends nothing (its earliest RTO)."""
        flow = self._flows.get(flow_id)
        return None if flow is None else flow.recovery.next_deadline_s


class SharedFlow:
    """One flow of a SharedLink seen as one link direction: what ``LinkProxy`` needs of a LinkModel.

    ``send(now_s, size_bytes)``/``decide(now_s)``/``next_decision_s`` (loss recovery as
    ``params.recovery`` says), ``transmit(now_s, size_bytes)`` (RTO only), ``outage_at(t)`` (the
    link's outage or this flow's own), ``add_outage`` (this flow only), ``new_stream(now_s)`` (this
    flow's stream only), ``params`` (the shared link's, as they are now) and ``last_delivery_s``.
    ``counters`` are this flow's own (so per-device link metrics add up to the cell's total without
    counting a byte twice); the whole bottleneck's are ``shared_counters``.
    """

    def __init__(self, shared: SharedLink, flow_id: Hashable) -> None:
        self.shared = shared
        self.flow_id = flow_id
        self.counters = shared.flow_counters(flow_id)

    @property
    def params(self) -> LinkParameters:
        """The shared link's parameters now."""
        return self.shared.params

    @property
    def shared_counters(self) -> LinkCounters:
        """Counters of the whole bottleneck (every flow of the cell)."""
        return self.shared.counters

    @property
    def recovery(self) -> FastRecovery:
        """This flow's undecided segments and recovery counts."""
        return self.shared.recovery(self.flow_id)

    @property
    def last_delivery_s(self) -> float:
        """Delivery time of this flow's latest segment (-inf before its first)."""
        return self.shared.last_delivery_s(self.flow_id)

    @property
    def next_decision_s(self) -> float | None:
        """When ``decide`` will next decide something if nothing is sent (this flow's earliest RTO), or None."""
        return self.shared.next_decision_s(self.flow_id)

    def outage_at(self, t: float) -> tuple[float, float] | None:
        """``(start, end)`` of the outage keeping this flow down at ``t`` (the shared link's or its own), or None."""
        return self.shared.flow_outage_at(self.flow_id, t)

    def add_outage(self, start_s: float, end_s: float) -> None:
        """This flow alone is down over ``[start_s, end_s)`` (``SharedLink.add_flow_outage``)."""
        self.shared.add_flow_outage(self.flow_id, start_s, end_s)

    def new_stream(self, now_s: float) -> None:
        """This flow starts a new TCP connection (see ``SharedLink.new_stream``)."""
        self.shared.new_stream(self.flow_id, now_s)

    def transmit(self, now_s: float, size_bytes: int) -> float:
        """Send one segment of this flow handed over at ``now_s`` (RTO recovery); return its in-order delivery time."""
        return self.shared.transmit(self.flow_id, now_s, size_bytes)

    def send(self, now_s: float, size_bytes: int) -> list[float]:
        """Send one segment of this flow handed over at ``now_s``; the delivery times decided (``SharedLink.send``)."""
        return self.shared.send(self.flow_id, now_s, size_bytes)

    def decide(self, now_s: float) -> list[float]:
        """This flow's clock reached ``now_s``: the delivery times its fired RTOs decided (``SharedLink.decide``)."""
        return self.shared.decide(self.flow_id, now_s)
