"""Pure, seeded model of one direction of a link: a TCP stream (``transmit``) or IP packets (``packet_fates``)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from channel.delay import get_delay_distribution
from channel.errors import ChannelError
from testbed.core.units import format_duration, format_rate
from channel.loss import BernoulliLoss, GilbertElliottLoss, LossModel
from channel.recovery import RECOVERY_MODES, FastRecovery, PendingSegment, in_order
from channel.outage import OutageTimeline, RandomOutages, ScheduledOutage, scheduled_outages
from channel.shaper import Shaper, TokenBucket, make_shaper
from channel.trace import MahimahiTrace, RateScheduleTrace, RateTrace

#: Linux's TCP_RTO_MAX: retransmissions into an outage back off at most this far apart.
MAX_RTO_S = 120.0
#: Largest IP packet ``packet_fates`` accepts.
MAX_IP_PACKET_BYTES = 65535


def _require(condition: bool, field: str, value: object, expected: str) -> None:
    if not condition:
        raise ChannelError(f"LinkParameters.{field}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class LinkParameters:
    """One direction of a link: rate, delay ± jitter, loss, duplication, reordering, outages, TCP details.

    ``rate_bps`` counts every byte on the wire (payload plus ``overhead_bytes`` per packet);
    ``None`` means unlimited. ``burst_bytes`` is the token-bucket depth (``None`` = one full packet).

    Additions (netem/Mahimahi names; all default to "off", leaving the original model unchanged):

    * ``delay_distribution``: ``uniform`` (delay ± jitter, the default), ``normal`` (σ = jitter) or
      ``pareto`` (netem's table law), all clipped at 0 — see ``channel.delay``.
    * ``loss_model``: a ``BernoulliLoss`` or ``GilbertElliottLoss``; ``None`` = ``BernoulliLoss(loss)``.
      Give either ``loss`` or ``loss_model``, not both.
    * ``duplicate`` / ``reorder``: netem's ``duplicate P`` / ``reorder P`` (packet level only).
    * ``outages``: ``[{at_s, duration_s}]`` (or ``ScheduledOutage``) from the model's first use;
      ``random_outages``: ``RandomOutages(mean_up_s, mean_down_s)`` (or a dict of the two).
    * ``trace``: a ``MahimahiTrace`` or ``RateScheduleTrace`` replacing the fixed rate
      (``rate_bps`` must then be ``None``).
    * ``queue_bytes``: the drop-tail queue in front of the bottleneck at the packet level
      (``packet_fates``; netem's ``limit``, Mahimahi's ``droptail bytes=``): a packet that would
      make the bytes waiting for the rate exceed it is dropped (``LinkCounters.queue_drops``).
      ``None`` = unbounded. Not bounded by default: a shallow queue cuts the kernel's initial
      window (10 packets) at low rates, and a short transfer then waits out tail-loss RTOs (at
      100 kbit/s, 12-40 packet transfers measured 0.46-0.61 of the rate with 4-10 packet queues).
      The TCP-stream view (``transmit``) has no queue: there the sender's window is the model's.
    * ``recovery``: how the TCP stream (``send``/``decide``) recovers a lost segment: ``fast`` (the
      default: fast retransmit once three later segments arrived, an RTO only for a tail loss; see
      ``channel.recovery``) or ``rto`` (every loss waits for its RTO, holding back what follows).
    """

    rate_bps: float | None
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    overhead_bytes: int = 40
    mss_bytes: int = 1460
    min_rto_s: float = 0.2
    max_backoffs: int = 6
    burst_bytes: int | None = None
    delay_distribution: str = "uniform"
    loss_model: LossModel | None = None
    duplicate: float = 0.0
    reorder: float = 0.0
    outages: tuple[ScheduledOutage, ...] = ()
    random_outages: RandomOutages | None = None
    trace: RateTrace | None = None
    queue_bytes: int | None = None
    recovery: str = "fast"

    def __post_init__(self) -> None:
        if self.rate_bps is not None:
            _require(
                math.isfinite(self.rate_bps) and self.rate_bps > 0,
                "rate_bps", self.rate_bps, "a positive finite number of bit/s, or None for unlimited",
            )
        _require(math.isfinite(self.delay_s) and self.delay_s >= 0, "delay_s", self.delay_s,
                 "a finite number of seconds >= 0")
        _require(math.isfinite(self.jitter_s) and self.jitter_s >= 0, "jitter_s", self.jitter_s,
                 "a finite number of seconds >= 0")
        _require(0.0 <= self.loss < 1.0, "loss", self.loss, "a probability in [0, 1)")
        _require(self.overhead_bytes >= 0, "overhead_bytes", self.overhead_bytes, "an integer >= 0")
        _require(self.mss_bytes > 0, "mss_bytes", self.mss_bytes, "an integer > 0")
        _require(math.isfinite(self.min_rto_s) and self.min_rto_s > 0, "min_rto_s", self.min_rto_s,
                 "a finite number of seconds > 0")
        _require(self.max_backoffs >= 0, "max_backoffs", self.max_backoffs, "an integer >= 0")
        if self.burst_bytes is not None:
            packet = self.mss_bytes + self.overhead_bytes
            _require(self.burst_bytes >= packet, "burst_bytes", self.burst_bytes,
                     f"at least one full packet (mss_bytes + overhead_bytes = {packet}), or None")
        if self.queue_bytes is not None:
            packet = self.mss_bytes + self.overhead_bytes
            _require(isinstance(self.queue_bytes, int) and self.queue_bytes >= packet, "queue_bytes",
                     self.queue_bytes, f"at least one full packet (mss_bytes + overhead_bytes = {packet}), or None")
        get_delay_distribution(self.delay_distribution)
        _require(self.recovery in RECOVERY_MODES, "recovery", self.recovery, f"one of {', '.join(RECOVERY_MODES)}")
        if self.loss_model is not None:
            _require(isinstance(self.loss_model, (BernoulliLoss, GilbertElliottLoss)), "loss_model",
                     self.loss_model, "a BernoulliLoss or GilbertElliottLoss, or None")
            _require(self.loss == 0, "loss_model", self.loss_model,
                     f"loss=0 when a loss_model is given (got loss={self.loss!r}); set one of them")
        for name in ("duplicate", "reorder"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and 0.0 <= value < 1.0, name, value, "a probability in [0, 1)")
        object.__setattr__(self, "outages", scheduled_outages(self.outages, "LinkParameters.outages"))
        if isinstance(self.random_outages, Mapping):
            _require(set(self.random_outages) == {"mean_up_s", "mean_down_s"}, "random_outages",
                     self.random_outages, "{'mean_up_s': s, 'mean_down_s': s}")
            try:
                object.__setattr__(self, "random_outages", RandomOutages(**self.random_outages))
            except ChannelError as error:
                raise ChannelError(f"LinkParameters.random_outages: {error}") from None
        if self.random_outages is not None:
            _require(isinstance(self.random_outages, RandomOutages), "random_outages", self.random_outages,
                     "a RandomOutages(mean_up_s, mean_down_s), a dict of the two, or None")
        if self.trace is not None:
            _require(isinstance(self.trace, (MahimahiTrace, RateScheduleTrace)), "trace", self.trace,
                     "a MahimahiTrace or RateScheduleTrace (see channel.trace.load_trace), or None")
            _require(self.rate_bps is None, "trace", self.trace,
                     f"rate_bps=None when a trace gives the rate (got rate_bps={self.rate_bps!r})")

    @property
    def loss_process(self) -> LossModel:
        """The loss model in use: ``loss_model``, or ``BernoulliLoss(loss)``."""
        return self.loss_model if self.loss_model is not None else BernoulliLoss(self.loss)

    @property
    def mean_rate_bps(self) -> float | None:
        """The fixed rate, or the trace's mean rate; None if unlimited."""
        return self.trace.mean_rate_bps if self.trace is not None else self.rate_bps

    @property
    def packet_bytes(self) -> int:
        """Wire size of one full segment: MSS plus per-packet overhead."""
        return self.mss_bytes + self.overhead_bytes

    @property
    def bucket_depth_bytes(self) -> int:
        """Token-bucket depth in bytes (``burst_bytes`` or one full packet)."""
        return self.packet_bytes if self.burst_bytes is None else self.burst_bytes

    @property
    def queue_capacity_bytes(self) -> int | None:
        """The packet-level drop-tail queue in bytes, None = unbounded (no rate: nothing waits either)."""
        return self.queue_bytes if self.mean_rate_bps is not None else None

    @property
    def goodput_bps(self) -> float | None:
        """Payload rate of a saturated link: ``rate * mss / (mss + overhead)`` (None if unlimited).

        With a trace, ``rate`` is the trace's mean rate.
        """
        rate = self.mean_rate_bps
        if rate is None:
            return None
        return rate * self.mss_bytes / self.packet_bytes

    @property
    def rto_s(self) -> float:
        """Initial retransmission timeout: ``max(min_rto_s, 2 * delay_s + 4 * jitter_s)``.

        Like Linux (RTO = SRTT + 4 * RTTVAR, floored at 200 ms), with the round trip
        estimated as twice this direction's delay and the variation as its jitter.
        """
        return max(self.min_rto_s, 2.0 * self.delay_s + 4.0 * self.jitter_s)

    @property
    def description(self) -> str:
        """One human line, e.g. ``"50 kbit/s, 100 ms ± 10 ms, 1.00% loss"``.

        Features that are on add their own phrase, e.g. ``"100 ms ± 20 ms (pareto)"``,
        ``"GE loss 2.00% (p=0.01, ...)"``, ``"1.00% duplicate"``, ``"outage at 10 s for 5 s"``.
        """
        if self.trace is not None:
            rate = self.trace.description
        else:
            rate = "unlimited" if self.rate_bps is None else format_rate(self.rate_bps)
        delay = format_duration(self.delay_s)
        if self.jitter_s > 0:
            delay += f" ± {format_duration(self.jitter_s)}"
            if self.delay_distribution != "uniform":
                delay += f" ({self.delay_distribution})"
        loss = self.loss_model.description if self.loss_model is not None else f"{self.loss * 100:.2f}% loss"
        parts = [rate, delay, loss]
        if self.duplicate > 0:
            parts.append(f"{self.duplicate * 100:.2f}% duplicate")
        if self.reorder > 0:
            parts.append(f"{self.reorder * 100:.2f}% reorder")
        shown = [f"outage at {o.at_s:g} s for {o.duration_s:g} s" for o in self.outages[:3]]
        if len(self.outages) > 3:
            shown.append(f"{len(self.outages) - 3} more outages")
        parts.extend(shown)
        if self.recovery != "fast":
            parts.append(f"{self.recovery} recovery")
        if self.random_outages is not None:
            parts.append(f"random outages (mean up {self.random_outages.mean_up_s:g} s, "
                         f"down {self.random_outages.mean_down_s:g} s)")
        return ", ".join(parts)

    def __str__(self) -> str:
        return self.description


@dataclass
class LinkCounters:
    """What a LinkModel has carried so far."""

    segments: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    lost_segments: int = 0
    retransmissions: int = 0
    queueing_delay_s: float = 0.0
    outage_losses: int = 0
    duplicates: int = 0
    reordered: int = 0
    queue_drops: int = 0  # packets tail-dropped by a full bottleneck queue (packet level; not in lost_segments)


def segment_sizes(n_bytes: int, mss: int) -> list[int]:
    """Split ``n_bytes`` into TCP segment sizes of at most ``mss`` (all full but the last)."""
    if mss <= 0:
        raise ChannelError(f"mss={mss!r} is invalid: expected an integer > 0")
    if n_bytes < 0:
        raise ChannelError(f"n_bytes={n_bytes!r} is invalid: expected an integer >= 0")
    full, rest = divmod(n_bytes, mss)
    return [mss] * full + ([rest] if rest else [])


class LinkModel:
    """One direction of a link; ``transmit`` (TCP stream) and ``packet_fates`` (IP packets) give delivery times.

    Model, per segment handed to the link at ``now_s`` (``transmit``):

    * rate: a token bucket in bytes (payload + overhead) filling at ``rate_bps / 8`` up to
      ``bucket_depth_bytes`` (or the trace's shaper, see ``channel.shaper``); the segment departs
      once the bucket holds its cost. Segments are sent in order, so departures never decrease
      (a retransmission holds back later segments).
    * delay: arrival = departure + a sample of ``delay_distribution`` (default
      ``max(0, delay + uniform(-jitter, +jitter))``).
    * loss: each attempt is lost when the loss process says so; the sender resends it ``rto``
      after the lost attempt departed, doubling ``rto`` for each further loss of the same segment.
      After ``max_backoffs`` doublings the next attempt is delivered regardless. Every attempt
      costs tokens at the time it is sent.
    * outages: an attempt whose flight ``[departure, arrival]`` meets an outage is lost and resent
      on the same backoff schedule (each wait capped at ``MAX_RTO_S``, never "delivered
      regardless"): the bytes wait until the outage ends plus up to one RTO-aligned backoff.
    * duplication and reordering do not apply: TCP delivers one in-order copy, and a reordered
      segment only waits for its predecessors, which in-order delivery already does.
    * in-order delivery: delivery = max(arrival, previous segment's delivery) (head-of-line blocking).

    ``transmit`` recovers every loss by RTO as above. ``send``/``decide`` carry the same stream with
    ``params.recovery``: with ``fast`` (the default) a lost segment waits, undecided, for three later
    segments to arrive (then it is resent about one round trip after its loss) or for its RTO (a tail
    loss), so ``send`` returns the delivery times it decided, oldest first, and ``decide(now)`` those
    that time decided (see ``channel.recovery``).

    ``packet_fates`` is the packet-level view (netem semantics, no retransmission, no ordering);
    see its docstring. Traces and outages are timed from the model's first use (``epoch_s``).

    Only ``rng`` supplies randomness: the same seed and inputs give the same outputs.
    """

    #: SharedLink sets this: a retransmission's tokens are charged when it is scheduled, so a
    #: flow waiting for its RTO does not hold the shared queue (see ``channel.shared``).
    _defer_retransmissions = False

    def __init__(self, params: LinkParameters, rng: np.random.Generator) -> None:
        self.params = params
        self.counters = LinkCounters()
        self._rng = rng
        self._loss = params.loss_process.fresh()
        self._sample_delay = get_delay_distribution(params.delay_distribution).sample
        # random outages draw from their own stream, so querying them never shifts loss or delay draws
        self._outage_rng = (
            None if params.random_outages is None
            else np.random.default_rng(int(rng.integers(2**63)))
        )
        self._shaper: Shaper = TokenBucket(params.rate_bps, params.bucket_depth_bytes)
        self._outages: OutageTimeline | None = None
        self._epoch: float | None = None
        self._last_departure = -math.inf
        self._last_delivery = -math.inf
        self._queue_capacity = params.queue_capacity_bytes
        self._queue: deque[tuple[float, int]] = deque()  # (departure, bytes) of packets waiting for the rate
        self._queued_bytes = 0
        self.recovery = FastRecovery(params.delay_s)
        """The stream's undecided segments and its recovery counts (``send``/``decide``)."""
        self._segments_sent = 0

    def new_stream(self, now_s: float) -> None:
        """A new TCP connection starts: the old one's in-order and retransmission hold-backs end with it.

        The rate, loss and outage processes (and their random streams) carry on unchanged; segments of the old
        stream still undecided are dropped with it.
        """
        self.recovery.clear()
        self._last_delivery = -math.inf
        self._last_departure = min(self._last_departure, now_s)
        if self._epoch is not None:
            self._shaper.release_after(now_s)

    @property
    def last_delivery_s(self) -> float:
        """Delivery time of the latest segment (-inf before the first)."""
        return self._last_delivery

    @property
    def epoch_s(self) -> float | None:
        """Time of the first ``transmit``/``packet_fates`` call (traces and outages count from it)."""
        return self._epoch

    def outage_at(self, t: float) -> tuple[float, float] | None:
        """``(start, end)`` of the outage covering time ``t``, or None (always None before first use)."""
        if self._outages is None:
            return None
        return self._outages.outage_at(t)

    def reconfigure(self, params: LinkParameters, now_s: float) -> None:
        """Carry what is handed over from ``now_s`` with ``params`` (a link changed while it runs).

        The rate (a full bucket, or the trace from ``now_s``), loss process and delay law start afresh; the random
        streams go on; outages are rebuilt from ``now_s`` only if the new parameters change them. Segments
        already given a delivery time keep it.
        """
        self._begin(now_s)
        old = self.params
        self.params = params
        self._loss = params.loss_process.fresh()
        self._sample_delay = get_delay_distribution(params.delay_distribution).sample
        self.recovery.ack_delay_s = params.delay_s
        self._shaper = (make_shaper(params.rate_bps, params.trace, params.bucket_depth_bytes, now_s)
                        if params.trace is not None else TokenBucket(params.rate_bps, params.bucket_depth_bytes))
        self._queue_capacity = params.queue_capacity_bytes
        self._queue.clear()
        self._queued_bytes = 0
        if (params.outages, params.random_outages) != (old.outages, old.random_outages):
            if params.random_outages is not None and self._outage_rng is None:
                self._outage_rng = np.random.default_rng(int(self._rng.integers(2**63)))
            self._outages = (OutageTimeline(now_s, params.outages, params.random_outages, self._outage_rng)
                             if params.outages or params.random_outages is not None else None)

    def add_outage(self, start_s: float, end_s: float) -> None:
        """The link is down over ``[start_s, end_s)`` (the clock ``transmit`` is given), besides its own outages.

        Segments handed over from then on wait for it as for any outage; a delivery time given out before is kept.
        """
        self._begin(start_s)
        if self._outages is None:
            assert self._epoch is not None
            self._outages = OutageTimeline(self._epoch, (), None, None)
        self._outages.add(start_s, end_s)

    def _begin(self, now_s: float) -> None:
        if self._epoch is not None:
            return
        params = self.params
        self._epoch = now_s
        if params.trace is not None:
            self._shaper = make_shaper(params.rate_bps, params.trace, params.bucket_depth_bytes, now_s)
        if params.outages or params.random_outages is not None:
            self._outages = OutageTimeline(now_s, params.outages, params.random_outages, self._outage_rng)

    def _depart(self, ready_s: float, cost: int) -> float:
        """Consume ``cost`` tokens at or after ``ready_s``; return the departure time."""
        departure = self._shaper.grant(max(ready_s, self._last_departure), cost)
        self._last_departure = departure
        self.counters.wire_bytes += cost
        self.counters.queueing_delay_s += departure - ready_s
        return departure

    def resend_departure(self, resend_s: float, cost: int, ahead: bool) -> float:
        """Departure of a retransmission due at ``resend_s``: queued behind every segment handed over so far, or
        (``ahead``) at ``resend_s``, ahead of the segments waiting for the rate as a TCP sender sends it before
        new data, its airtime charged to the bottleneck's next free slot (so the segments handed over next wait
        for it)."""
        if not ahead:
            return self._depart(resend_s, cost)
        self._last_departure = self._shaper.grant(self._last_departure, cost)
        self.counters.wire_bytes += cost
        return resend_s

    def _resend(self, resend_s: float, cost: int) -> float:
        """Departure of a retransmission scheduled for ``resend_s``."""
        if not self._defer_retransmissions:
            return self._depart(resend_s, cost)
        granted = self._shaper.grant(self._last_departure, cost)
        self._last_departure = granted
        departure = max(resend_s, granted)
        self.counters.wire_bytes += cost
        self.counters.queueing_delay_s += departure - resend_s
        return departure

    def _outage_meets(self, departure_s: float, arrival_s: float) -> bool:
        """Whether an attempt in flight over ``[departure_s, arrival_s]`` meets an outage (a cell's flow adds its own)."""
        return self._outages is not None and self._outages.overlapping(departure_s, arrival_s) is not None

    def _one_way_delay(self) -> float:
        return self._sample_delay(self._rng, self.params.delay_s, self.params.jitter_s)

    def _check_segment(self, now_s: float, size_bytes: int) -> None:
        if not 0 < size_bytes <= self.params.mss_bytes:
            raise ChannelError(
                f"segment size {size_bytes!r} is invalid: expected 1..mss_bytes={self.params.mss_bytes}"
            )
        if not math.isfinite(now_s):
            raise ChannelError(f"now_s={now_s!r} is invalid: expected a finite time in seconds")

    def _new_segment(self, now_s: float, size_bytes: int) -> tuple[PendingSegment, float]:
        """Count a segment handed over at ``now_s``; return it and its first departure."""
        self._begin(now_s)
        cost = size_bytes + self.params.overhead_bytes
        self.counters.segments += 1
        self.counters.payload_bytes += size_bytes
        segment = PendingSegment(self._segments_sent, cost)
        self._segments_sent += 1
        return segment, self._depart(now_s, cost)

    def attempt(self, segment: PendingSegment, departure_s: float) -> None:
        """Carry one attempt of ``segment`` departing at ``departure_s``: its ``arrival_s``, or a hole to resend.

        A loss drawn from the loss process leaves ``arrival_s`` None, with the lost attempt's departure and the
        RTO deadline (``rto · 2^losses``); an attempt meeting an outage is resent at once on the backoff schedule.
        """
        params, counters = self.params, self.counters
        rto = params.rto_s
        while True:
            if segment.losses <= params.max_backoffs and self._loss.lost(self._rng):
                counters.lost_segments += 1
                counters.retransmissions += 1
                segment.arrival_s = None
                segment.lost_departure_s = departure_s
                segment.deadline_s = departure_s + rto * 2.0**segment.losses
                segment.losses += 1
                return
            arrival = departure_s + self._one_way_delay()
            if self._outage_meets(departure_s, arrival):
                counters.outage_losses += 1
                counters.retransmissions += 1
                departure_s = self._resend(departure_s + min(MAX_RTO_S, rto * 2.0 ** min(segment.losses, 64)),
                                           segment.cost)
                segment.losses += 1
                continue
            segment.arrival_s = arrival
            return

    def _send_segment(self, now_s: float, size_bytes: int) -> float:
        """Carry one TCP segment, every loss resent after its RTO; its arrival time (before in-order delivery)."""
        segment, departure = self._new_segment(now_s, size_bytes)
        while True:
            self.attempt(segment, departure)
            if segment.arrival_s is not None:
                return segment.arrival_s
            departure = self._resend(segment.deadline_s, segment.cost)

    def transmit(self, now_s: float, size_bytes: int) -> float:
        """Send one segment of ``size_bytes`` (1..mss) handed over at ``now_s``, losses recovered by RTO; return its
        delivery time. ChannelError while ``send`` has left segments undecided."""
        self._check_segment(now_s, size_bytes)
        if self.recovery.undecided:
            raise ChannelError(f"transmit at {now_s!r}: {len(self.recovery.undecided)} segments sent with 'send' "
                               "are undecided; carry on with send/decide")
        arrival = self._send_segment(now_s, size_bytes)
        self._last_delivery = max(arrival, self._last_delivery)
        return self._last_delivery

    def send(self, now_s: float, size_bytes: int) -> list[float]:
        """Send one segment of ``size_bytes`` (1..mss) handed over at ``now_s``, losses recovered as
        ``params.recovery`` says; return the delivery times this call decided, oldest segment first (in-order).

        Each segment sent gets exactly one delivery time, from this call or a later ``send``/``decide``; calls
        come in non-decreasing time. RTOs due by ``now_s`` fire first.
        """
        self._check_segment(now_s, size_bytes)
        recovery = self.recovery
        if self.params.recovery == "rto" and not recovery.undecided:
            return [self.transmit(now_s, size_bytes)]
        decided = self.decide(now_s)
        segment, departure = self._new_segment(now_s, size_bytes)
        self.attempt(segment, departure)
        recovery.add(segment, departure, self, count_arrivals=self.params.recovery == "fast")
        return decided + self._in_order(recovery.decided_arrivals())

    def decide(self, now_s: float) -> list[float]:
        """Time has reached ``now_s``: resend the tail losses whose RTO fired; return the delivery times decided."""
        if not self.recovery.holes:
            return []
        self.recovery.expire(now_s, self)
        return self._in_order(self.recovery.decided_arrivals())

    @property
    def next_decision_s(self) -> float | None:
        """When ``decide`` will next decide something if nothing is sent (the earliest RTO of a hole), or None."""
        return self.recovery.next_deadline_s

    def _in_order(self, arrivals: list[float]) -> list[float]:
        deliveries = in_order(arrivals, self._last_delivery)
        if deliveries:
            self._last_delivery = deliveries[-1]
        return deliveries

    def packet_fates(self, now_s: float, size_bytes: int) -> list[float]:
        """Delivery times of the copies of ONE IP packet of ``size_bytes`` handed over at ``now_s``.

        ``[]`` = dropped, ``[t]`` = delivered once, ``[t1, t2]`` (ascending) = duplicated. No
        retransmission and no in-order delivery: jitter and ``reorder`` may reorder packets.
        ``size_bytes`` is the whole IP packet (1..65535), headers included, so ``overhead_bytes``
        is not added. Per packet, in netem's order (``netem_enqueue``):

        1. duplicate: with probability ``duplicate`` there are two copies;
        2. loss: one draw of the loss process removes one copy (a lost duplicated packet still
           delivers one copy); a dropped packet uses no link capacity, as in netem;
        3. the extra copy, if any, passes through the link once more: its own loss draw, then
           step 4; then the original goes through step 4;
        4. reorder: with probability ``reorder`` the copy is sent immediately (arrival = ``now_s``,
           bypassing rate, queue and delay, as netem puts it at the head of its queue); otherwise it
           departs through the shaper (FIFO) and arrives after a delay sample;
        5. queue: a copy that would overfill the drop-tail queue (``queue_capacity_bytes`` of
           packets not yet departed) is dropped without using capacity (``counters.queue_drops``);
        6. outage: a copy whose flight ``[departure, arrival]`` meets an outage is dropped.
        """
        if not 0 < size_bytes <= MAX_IP_PACKET_BYTES:
            raise ChannelError(
                f"packet size {size_bytes!r} is invalid: expected 1..{MAX_IP_PACKET_BYTES} bytes"
            )
        if not math.isfinite(now_s):
            raise ChannelError(f"now_s={now_s!r} is invalid: expected a finite time in seconds")
        self._begin(now_s)
        params, counters, rng = self.params, self.counters, self._rng
        counters.segments += 1
        counters.payload_bytes += size_bytes
        copies = 1
        if params.duplicate > 0 and rng.random() < params.duplicate:
            copies = 2
            counters.duplicates += 1
        if self._loss.lost(rng):
            copies -= 1
            counters.lost_segments += 1
        fates: list[float] = []
        if copies == 2:
            if self._loss.lost(rng):
                counters.lost_segments += 1
            else:
                fates.extend(self._packet_copy(now_s, size_bytes))
        if copies >= 1:
            fates.extend(self._packet_copy(now_s, size_bytes))
        return sorted(fates)

    def _packet_copy(self, now_s: float, size_bytes: int) -> list[float]:
        """``[arrival]`` of one copy that survived the loss draw, or ``[]`` if an outage drops it."""
        params = self.params
        if params.reorder > 0 and self._rng.random() < params.reorder:
            self.counters.reordered += 1
            self.counters.wire_bytes += size_bytes
            departure = arrival = now_s
        else:
            if not self._enqueue(now_s, size_bytes):
                self.counters.queue_drops += 1
                return []
            departure = self._depart(now_s, size_bytes)
            if self._queue_capacity is not None:
                self._queue.append((departure, size_bytes))
            arrival = departure + self._one_way_delay()
        if self._outages is not None and self._outages.overlapping(departure, arrival) is not None:
            self.counters.outage_losses += 1
            return []
        return [arrival]

    def _enqueue(self, now_s: float, size_bytes: int) -> bool:
        """Whether a packet arriving at ``now_s`` fits the drop-tail queue (those departed by now have left it)."""
        if self._queue_capacity is None:
            return True  # unbounded: nothing to track
        queue = self._queue
        while queue and queue[0][0] <= now_s:
            self._queued_bytes -= queue.popleft()[1]
        if self._queued_bytes + size_bytes > self._queue_capacity:
            return False
        self._queued_bytes += size_bytes
        return True
