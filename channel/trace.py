"""Rate traces: Mahimahi delivery-opportunity files and ``t_seconds,rate`` CSV schedules, parsed strictly.

* Mahimahi (``mm-link``): one integer millisecond timestamp per line, non-decreasing; each line is
  one delivery opportunity of ``bytes_per_opportunity`` bytes (1500 here, the MTU; Mahimahi itself
  uses 1504, its TUN payload size). Several lines with the same timestamp give several
  opportunities at that instant. The trace loops with period = its last timestamp (which must be
  > 0). Unused opportunities are lost; one opportunity's bytes may serve several small packets.
* CSV: ``t_seconds,rate`` rows, times strictly increasing from 0, rate as bit/s (``50000``) or with
  a unit (``50kbit``, ``1.5Mbit``, ``2gbit``, ``800bit``; case-insensitive; ``/s`` optional).
  The rate is piecewise constant and the last row's rate holds for ever (it must be > 0).
  An optional first line ``t_seconds,rate``, blank lines and ``#`` comment lines are ignored.

Times are relative to the link model's first use. Parsers raise ``ChannelError`` naming the line.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from channel.errors import ChannelError
from testbed.core.units import format_rate

MAHIMAHI_BYTES_PER_OPPORTUNITY = 1500

_INTEGER = re.compile(r"[0-9]+", re.ASCII)
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_TIME = re.compile(_NUMBER, re.ASCII)
_RATE = re.compile(rf"({_NUMBER})\s*([kmg]?bit(?:/s)?)?", re.ASCII | re.IGNORECASE)
_RATE_UNITS = {"": 1.0, "bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9}


@dataclass(frozen=True)
class MahimahiTrace:
    """Delivery opportunities at ``opportunities_ms`` (looping every ``period_ms``)."""

    opportunities_ms: tuple[int, ...] = field(repr=False)
    bytes_per_opportunity: int = MAHIMAHI_BYTES_PER_OPPORTUNITY
    name: str = ""

    def __post_init__(self) -> None:
        times = self.opportunities_ms
        if not times:
            raise ChannelError("MahimahiTrace.opportunities_ms is empty: a trace needs at least one line")
        if any(not isinstance(t, int) or t < 0 for t in times):
            raise ChannelError("MahimahiTrace.opportunities_ms must hold integers >= 0")
        if any(b < a for a, b in zip(times, times[1:])):
            raise ChannelError("MahimahiTrace.opportunities_ms must not decrease")
        if times[-1] <= 0:
            raise ChannelError("MahimahiTrace.opportunities_ms: the last timestamp must be > 0 (it is the loop period)")
        if not isinstance(self.bytes_per_opportunity, int) or self.bytes_per_opportunity <= 0:
            raise ChannelError(
                f"MahimahiTrace.bytes_per_opportunity={self.bytes_per_opportunity!r} is invalid: expected an integer > 0"
            )

    @property
    def period_ms(self) -> int:
        return self.opportunities_ms[-1]

    @property
    def mean_rate_bps(self) -> float:
        """Bits per second if every opportunity is used."""
        return len(self.opportunities_ms) * self.bytes_per_opportunity * 8 / (self.period_ms / 1000.0)

    def opportunity_ms(self, index: int) -> int:
        """Time of the ``index``-th opportunity (0-based, counting across loops)."""
        loop, offset = divmod(index, len(self.opportunities_ms))
        return loop * self.period_ms + self.opportunities_ms[offset]

    def first_opportunity_at_or_after(self, t_ms: float) -> int:
        """Index of the earliest opportunity at time >= ``t_ms``."""
        if t_ms <= 0:
            return 0
        count, period = len(self.opportunities_ms), self.period_ms
        loop = max(0, int(t_ms // period) - 1)  # the previous loop's last line may sit exactly at t_ms
        while True:
            offset = bisect.bisect_left(self.opportunities_ms, t_ms - loop * period)
            if offset < count:
                return loop * count + offset
            loop += 1

    def to_text(self) -> str:
        """The trace in Mahimahi's file format."""
        return "".join(f"{t}\n" for t in self.opportunities_ms)

    @property
    def description(self) -> str:
        label = f"{self.name} " if self.name else ""
        return f"Mahimahi trace {label}(mean {format_rate(self.mean_rate_bps)}, period {self.period_ms} ms)"


@dataclass(frozen=True)
class RateScheduleTrace:
    """Piecewise-constant rate: ``rates_bps[i]`` from ``times_s[i]`` on; the last rate holds for ever."""

    times_s: tuple[float, ...] = field(repr=False)
    rates_bps: tuple[float, ...] = field(repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        times, rates = self.times_s, self.rates_bps
        if not times:
            raise ChannelError("RateScheduleTrace is empty: a trace needs at least one row")
        if len(times) != len(rates):
            raise ChannelError("RateScheduleTrace: times_s and rates_bps differ in length")
        if times[0] != 0:
            raise ChannelError(f"RateScheduleTrace.times_s[0]={times[0]!r} is invalid: the first row must be at 0 s")
        if any(not math.isfinite(t) for t in times) or any(b <= a for a, b in zip(times, times[1:])):
            raise ChannelError("RateScheduleTrace.times_s must be finite and strictly increasing")
        if any(not math.isfinite(r) or r < 0 for r in rates):
            raise ChannelError("RateScheduleTrace.rates_bps must be finite and >= 0")
        if rates[-1] <= 0:
            raise ChannelError("RateScheduleTrace: the last rate must be > 0 (it holds for ever)")
        cumulative = [0.0]
        for i in range(1, len(times)):
            cumulative.append(cumulative[-1] + rates[i - 1] / 8.0 * (times[i] - times[i - 1]))
        object.__setattr__(self, "_cumulative_bytes", tuple(cumulative))

    def rate_at(self, t_s: float) -> float:
        """Rate in bit/s at ``t_s`` (the first rate before 0)."""
        return self.rates_bps[max(0, bisect.bisect_right(self.times_s, t_s) - 1)]

    def capacity_bytes(self, t_s: float) -> float:
        """Bytes the link could carry in ``[0, t_s]``."""
        if t_s <= 0:
            return 0.0
        i = bisect.bisect_right(self.times_s, t_s) - 1
        return self._cumulative_bytes[i] + self.rates_bps[i] / 8.0 * (t_s - self.times_s[i])  # type: ignore[attr-defined]

    def time_for_capacity(self, target_bytes: float) -> float:
        """Earliest time at which ``capacity_bytes`` reaches ``target_bytes``."""
        cumulative: tuple[float, ...] = self._cumulative_bytes  # type: ignore[attr-defined]
        if target_bytes <= 0:
            return 0.0
        j = bisect.bisect_left(cumulative, target_bytes)
        i = j - 1 if j < len(cumulative) else len(cumulative) - 1
        return self.times_s[i] + (target_bytes - cumulative[i]) / (self.rates_bps[i] / 8.0)

    @property
    def mean_rate_bps(self) -> float:
        """Time-weighted mean over the listed rows (the last rate if there is one row)."""
        span = self.times_s[-1]
        if span == 0:
            return self.rates_bps[-1]
        return self._cumulative_bytes[-1] * 8.0 / span  # type: ignore[attr-defined]

    def to_csv(self) -> str:
        """The trace as ``t_seconds,rate`` CSV with a header (round-trips exactly through the parser)."""
        return "t_seconds,rate\n" + "".join(f"{t!r},{r!r}\n" for t, r in zip(self.times_s, self.rates_bps))

    @property
    def description(self) -> str:
        label = f"{self.name} " if self.name else ""
        return f"rate trace {label}(mean {format_rate(self.mean_rate_bps)}, {len(self.times_s)} steps)"


RateTrace = MahimahiTrace | RateScheduleTrace


def parse_mahimahi(text: str, name: str = "", bytes_per_opportunity: int = MAHIMAHI_BYTES_PER_OPPORTUNITY) -> MahimahiTrace:
    """Parse a Mahimahi trace: one integer ms timestamp per line, non-decreasing, last > 0."""
    if not isinstance(text, str):
        raise ChannelError(f"Mahimahi trace {name!r}: expected text, got {type(text).__name__}")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    times: list[int] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not _INTEGER.fullmatch(line):
            raise ChannelError(
                f"Mahimahi trace {name!r} line {number}: {raw[:40]!r} is not a millisecond timestamp "
                "(expected one non-negative integer per line)"
            )
        value = int(line)
        if times and value < times[-1]:
            raise ChannelError(
                f"Mahimahi trace {name!r} line {number}: {value} ms is before the previous line's {times[-1]} ms "
                "(timestamps must not decrease)"
            )
        times.append(value)
    if not times:
        raise ChannelError(f"Mahimahi trace {name!r} is empty: it needs at least one timestamp line")
    if times[-1] == 0:
        raise ChannelError(f"Mahimahi trace {name!r} line {len(times)}: the last timestamp must be > 0 (it is the loop period)")
    return MahimahiTrace(tuple(times), bytes_per_opportunity, name)


def _parse_rate(text: str) -> float | None:
    match = _RATE.fullmatch(text)
    if match is None:
        return None
    unit = (match.group(2) or "").lower().removesuffix("/s")
    value = float(match.group(1)) * _RATE_UNITS[unit]
    return value if math.isfinite(value) else None


def parse_rate_csv(text: str, name: str = "") -> RateScheduleTrace:
    """Parse ``t_seconds,rate`` rows (see the module docstring)."""
    if not isinstance(text, str):
        raise ChannelError(f"rate trace {name!r}: expected text, got {type(text).__name__}")
    times: list[float] = []
    rates: list[float] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not times and number == 1 and line.replace(" ", "").lower() == "t_seconds,rate":
            continue
        where = f"rate trace {name!r} line {number}"
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 2:
            raise ChannelError(f"{where}: {raw[:60]!r} is not 't_seconds,rate' (expected exactly two fields)")
        if not _TIME.fullmatch(parts[0]) or not math.isfinite(t := float(parts[0])):
            raise ChannelError(f"{where}: time {parts[0][:30]!r} is not a finite number of seconds >= 0")
        rate = _parse_rate(parts[1])
        if rate is None:
            raise ChannelError(
                f"{where}: rate {parts[1][:30]!r} is not a rate (expected bit/s like 50000 or a unit: "
                "bit, kbit, mbit, gbit)"
            )
        if not times and t != 0:
            raise ChannelError(f"{where}: the first row must be at 0 s, not {t!r}")
        if times and t <= times[-1]:
            raise ChannelError(f"{where}: {t!r} s does not come after the previous row's {times[-1]!r} s")
        times.append(t)
        rates.append(rate)
    if not times:
        raise ChannelError(f"rate trace {name!r} is empty: it needs at least one 't_seconds,rate' row")
    if rates[-1] <= 0:
        raise ChannelError(f"rate trace {name!r}: the last rate must be > 0 (it holds for ever)")
    return RateScheduleTrace(tuple(times), tuple(rates), name)


def load_trace(path: str | Path) -> RateTrace:
    """Read a trace file: ``.csv`` as a rate schedule, anything else as a Mahimahi trace."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ChannelError(f"cannot read trace {str(path)!r}: {error}") from error
    if path.suffix.lower() == ".csv":
        return parse_rate_csv(text, name=path.name)
    return parse_mahimahi(text, name=path.name)
