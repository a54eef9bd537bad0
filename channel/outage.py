"""Link outages: scheduled windows and random up/down periods, as one seeded timeline of closed intervals."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from channel.errors import ChannelError


def _finite(owner: str, name: str, value: object, minimum: float, strict: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)  # type: ignore[operator]
    if not ok:
        relation = ">" if strict else ">="
        raise ChannelError(f"{owner}.{name}={value!r} is invalid: expected a finite number of seconds {relation} {minimum:g}")
    return float(value)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ScheduledOutage:
    """The link is down from ``at_s`` for ``duration_s`` seconds, counted from the model's first use."""

    at_s: float
    duration_s: float

    def __post_init__(self) -> None:
        _finite("ScheduledOutage", "at_s", self.at_s, 0.0, strict=False)
        _finite("ScheduledOutage", "duration_s", self.duration_s, 0.0, strict=True)


@dataclass(frozen=True)
class RandomOutages:
    """Alternating up and down periods with exponential lengths (means ``mean_up_s``, ``mean_down_s``).

    The link starts up at the model's first use. Long-run availability is
    ``mean_up_s / (mean_up_s + mean_down_s)``.
    """

    mean_up_s: float
    mean_down_s: float

    def __post_init__(self) -> None:
        _finite("RandomOutages", "mean_up_s", self.mean_up_s, 0.0, strict=True)
        _finite("RandomOutages", "mean_down_s", self.mean_down_s, 0.0, strict=True)

    @property
    def availability(self) -> float:
        """Long-run fraction of time the link is up."""
        return self.mean_up_s / (self.mean_up_s + self.mean_down_s)


def scheduled_outages(value: Iterable[ScheduledOutage | Mapping[str, float]], field: str) -> tuple[ScheduledOutage, ...]:
    """Normalise ``[{at_s, duration_s}, ...]`` (or ScheduledOutage objects) to a tuple; errors name the item."""
    if isinstance(value, (str, bytes, Mapping)):
        raise ChannelError(f"{field}={value!r} is invalid: expected a list of {{at_s, duration_s}}")
    result = []
    try:
        items = list(value)
    except TypeError:
        raise ChannelError(f"{field}={value!r} is invalid: expected a list of {{at_s, duration_s}}") from None
    for index, item in enumerate(items):
        if isinstance(item, ScheduledOutage):
            result.append(item)
            continue
        if not isinstance(item, Mapping) or set(item) != {"at_s", "duration_s"}:
            raise ChannelError(f"{field}[{index}]={item!r} is invalid: expected {{'at_s': s, 'duration_s': s}}")
        try:
            result.append(ScheduledOutage(at_s=item["at_s"], duration_s=item["duration_s"]))
        except ChannelError as error:
            raise ChannelError(f"{field}[{index}]: {error}") from None
    return tuple(result)


class OutageTimeline:
    """Absolute down intervals ``[start, end)`` of one link, merged across scheduled and random outages.

    Random periods come from their own generator and are drawn lazily but always in time order
    from ``epoch_s``, so the timeline is a pure function of its seed, whatever the query order.
    """

    def __init__(
        self,
        epoch_s: float,
        scheduled: tuple[ScheduledOutage, ...],
        random: RandomOutages | None,
        rng: np.random.Generator | None,
    ) -> None:
        if random is not None and rng is None:
            raise ChannelError("OutageTimeline: random outages need a generator")
        self._epoch = epoch_s
        self._scheduled = sorted((epoch_s + o.at_s, epoch_s + o.at_s + o.duration_s) for o in scheduled)
        self._scheduled_end = max((end for _, end in self._scheduled), default=epoch_s)
        self._random = random
        self._rng = rng
        self._random_intervals: list[tuple[float, float]] = []
        self._cursor = epoch_s  # end of the last generated down period
        self._horizon = -math.inf  # every random interval starting at or before this is generated
        self._starts: list[float] = []
        self._merged: list[tuple[float, float]] = []
        self._rebuild()

    def _extend(self, t: float) -> None:
        if self._random is None or t <= self._horizon:
            return
        assert self._rng is not None
        target = max(t, self._scheduled_end, self._epoch + 2.0 * (t - self._epoch))
        while True:
            start = self._cursor + self._rng.exponential(self._random.mean_up_s)
            end = start + self._rng.exponential(self._random.mean_down_s)
            self._random_intervals.append((start, end))
            self._cursor = end
            if start > target:
                break
        self._horizon = target
        self._rebuild()

    def add(self, start_s: float, end_s: float) -> None:
        """The link is also down over ``[start_s, end_s)`` (absolute times): an outage added while the link runs."""
        if not (math.isfinite(start_s) and math.isfinite(end_s) and end_s > start_s):
            raise ChannelError(f"OutageTimeline.add({start_s!r}, {end_s!r}) is invalid: expected finite start < end")
        self._scheduled = sorted([*self._scheduled, (start_s, end_s)])
        self._scheduled_end = max(self._scheduled_end, end_s)
        self._rebuild()

    def _rebuild(self) -> None:
        merged: list[tuple[float, float]] = []
        for start, end in sorted(self._scheduled + self._random_intervals):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        self._merged = merged
        self._starts = [start for start, _ in merged]

    def overlapping(self, t0: float, t1: float) -> tuple[float, float] | None:
        """The down interval meeting ``[t0, t1]`` (the latest if several), or None when the link is up throughout."""
        self._extend(t1)
        index = bisect.bisect_right(self._starts, t1) - 1
        if index < 0:
            return None
        start, end = self._merged[index]
        return (start, end) if end > t0 else None

    def outage_at(self, t: float) -> tuple[float, float] | None:
        """``(start, end)`` of the outage covering ``t``, or None if the link is up at ``t``."""
        return self.overlapping(t, t)
