"""Pure, seeded model of one direction of a TCP stream over a rate-limited, delayed, lossy link."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from channel.errors import ChannelError


def _require(condition: bool, field: str, value: object, expected: str) -> None:
    if not condition:
        raise ChannelError(f"LinkParameters.{field}={value!r} is invalid: expected {expected}")


def _format_rate(rate_bps: float | None) -> str:
    if rate_bps is None:
        return "unlimited"
    for scale, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if rate_bps >= scale:
            return f"{rate_bps / scale:.1f} {unit}"
    return f"{rate_bps:.1f} bit/s"


@dataclass(frozen=True)
class LinkParameters:
    """One direction of a link: rate, delay ± jitter, segment loss, and TCP details.

    ``rate_bps`` counts every byte on the wire (payload plus ``overhead_bytes`` per packet);
    ``None`` means unlimited. ``burst_bytes`` is the token-bucket depth (``None`` = one full packet).
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

    @property
    def packet_bytes(self) -> int:
        """Wire size of one full segment: MSS plus per-packet overhead."""
        return self.mss_bytes + self.overhead_bytes

    @property
    def bucket_depth_bytes(self) -> int:
        """Token-bucket depth in bytes (``burst_bytes`` or one full packet)."""
        return self.packet_bytes if self.burst_bytes is None else self.burst_bytes

    @property
    def goodput_bps(self) -> float | None:
        """Payload rate of a saturated link: ``rate * mss / (mss + overhead)`` (None if unlimited)."""
        if self.rate_bps is None:
            return None
        return self.rate_bps * self.mss_bytes / self.packet_bytes

    @property
    def rto_s(self) -> float:
        """Initial retransmission timeout: ``max(min_rto_s, 2 * delay_s + 4 * jitter_s)``.

        Like Linux (RTO = SRTT + 4 * RTTVAR, floored at 200 ms), with the round trip
        estimated as twice this direction's delay and the variation as its jitter.
        """
        return max(self.min_rto_s, 2.0 * self.delay_s + 4.0 * self.jitter_s)

    @property
    def description(self) -> str:
        """One human line, e.g. ``"50.0 kbit/s, 100 ms ± 10 ms, 1.00% loss"``."""
        delay = f"{self.delay_s * 1e3:g} ms"
        if self.jitter_s > 0:
            delay += f" ± {self.jitter_s * 1e3:g} ms"
        return f"{_format_rate(self.rate_bps)}, {delay}, {self.loss * 100:.2f}% loss"

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


def segment_sizes(n_bytes: int, mss: int) -> list[int]:
    """Split ``n_bytes`` into TCP segment sizes of at most ``mss`` (all full but the last)."""
    if mss <= 0:
        raise ChannelError(f"mss={mss!r} is invalid: expected an integer > 0")
    if n_bytes < 0:
        raise ChannelError(f"n_bytes={n_bytes!r} is invalid: expected an integer >= 0")
    full, rest = divmod(n_bytes, mss)
    return [mss] * full + ([rest] if rest else [])


class LinkModel:
    """One direction of a TCP stream over a link; ``transmit`` returns each segment's delivery time.

    Model, per segment handed to the link at ``now_s``:

    * rate: a token bucket in bytes (payload + overhead) filling at ``rate_bps / 8`` up to
      ``bucket_depth_bytes``; the segment departs once the bucket holds its cost. Segments are
      sent in order, so departures never decrease (a retransmission holds back later segments).
    * delay: arrival = departure + max(0, delay + uniform(-jitter, +jitter)).
    * loss: each attempt is lost with probability ``loss``; the sender resends it ``rto`` after
      the lost attempt departed, doubling ``rto`` for each further loss of the same segment.
      After ``max_backoffs`` doublings the next attempt is delivered regardless. Every attempt
      costs tokens at the time it is sent.
    * in-order delivery: delivery = max(arrival, previous segment's delivery) (head-of-line blocking).

    Only ``rng`` supplies randomness: the same seed and inputs give the same outputs.
    """

    def __init__(self, params: LinkParameters, rng: np.random.Generator) -> None:
        self.params = params
        self.counters = LinkCounters()
        self._rng = rng
        self._bytes_per_s = None if params.rate_bps is None else params.rate_bps / 8.0
        self._depth = float(params.bucket_depth_bytes)
        self._tokens = self._depth
        self._bucket_time: float | None = None
        self._last_departure = -math.inf
        self._last_delivery = -math.inf

    @property
    def last_delivery_s(self) -> float:
        """Delivery time of the latest segment (-inf before the first)."""
        return self._last_delivery

    def _depart(self, ready_s: float, cost: int) -> float:
        """Consume ``cost`` tokens at or after ``ready_s``; return the departure time."""
        start = max(ready_s, self._last_departure)
        if self._bytes_per_s is None:
            departure = start
        else:
            if self._bucket_time is None:
                tokens = self._depth
            else:
                tokens = min(self._depth, self._tokens + (start - self._bucket_time) * self._bytes_per_s)
            if tokens >= cost:
                departure = start
                self._tokens = tokens - cost
            else:
                departure = start + (cost - tokens) / self._bytes_per_s
                self._tokens = 0.0
            self._bucket_time = departure
        self._last_departure = departure
        self.counters.wire_bytes += cost
        self.counters.queueing_delay_s += departure - ready_s
        return departure

    def _one_way_delay(self) -> float:
        params = self.params
        if params.jitter_s <= 0:
            return params.delay_s
        return max(0.0, params.delay_s + self._rng.uniform(-params.jitter_s, params.jitter_s))

    def transmit(self, now_s: float, size_bytes: int) -> float:
        """Send one segment of ``size_bytes`` (1..mss) handed over at ``now_s``; return its delivery time."""
        params = self.params
        if not 0 < size_bytes <= params.mss_bytes:
            raise ChannelError(
                f"segment size {size_bytes!r} is invalid: expected 1..mss_bytes={params.mss_bytes}"
            )
        if not math.isfinite(now_s):
            raise ChannelError(f"now_s={now_s!r} is invalid: expected a finite time in seconds")
        cost = size_bytes + params.overhead_bytes
        counters = self.counters
        counters.segments += 1
        counters.payload_bytes += size_bytes
        departure = self._depart(now_s, cost)
        rto = params.rto_s
        losses = 0
        while params.loss > 0 and losses <= params.max_backoffs and self._rng.random() < params.loss:
            counters.lost_segments += 1
            counters.retransmissions += 1
            departure = self._depart(departure + rto * 2.0**losses, cost)
            losses += 1
        arrival = departure + self._one_way_delay()
        self._last_delivery = max(arrival, self._last_delivery)
        return self._last_delivery
