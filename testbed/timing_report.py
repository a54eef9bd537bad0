"""Whether a run kept the link model's schedule: the event-loop lag probe, lateness per round and device, the verdict.

Each link that can say how late it released its segments (``timing_stats()``, the proxy backend) is read at the
start and the end of every round; the difference is the round's lateness. A probe task sleeps
``LOOP_PROBE_INTERVAL_S`` again and again and counts how much later than asked it wakes: the event loop's lag,
which is how late everything in the run (links, devices, the broker) is served. A round, or a device over the run,
is *faithful* when its lateness p99 is at most ``LATENESS_P99_LIMIT_S`` (README, "Timing fidelity").
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from channel.timing import LatenessSketch

LATENESS_P99_LIMIT_S = 0.010
"""A round is faithful when 99% of its segments left within this of their modelled time (issue 13's goal)."""
LOOP_PROBE_INTERVAL_S = 0.05
"""How often the loop-lag probe asks to wake."""


class TimedLink(Protocol):
    """A link that measures its own lateness (``channel.proxy.LinkProxy``)."""

    def timing_stats(self) -> LatenessSketch: ...


def _milliseconds(sketch: LatenessSketch | None) -> dict[str, float | None]:
    """p50 and p99 of a sketch in ms (None where nothing was measured)."""
    def at(q: float) -> float | None:
        value = None if sketch is None else sketch.quantile(q)
        return None if value is None else round(value * 1e3, 3)

    return {"p50": at(0.5), "p99": at(0.99)}


@dataclass(frozen=True)
class TimingVerdict:
    """How late segments were released (and the loop woke) over a stretch of the run, and whether that was faithful."""

    lateness: LatenessSketch
    loop_lag: LatenessSketch | None = None
    limit_s: float = LATENESS_P99_LIMIT_S
    measured: bool = True
    """False when no link measured its lateness (backends other than proxy): then ``faithful`` is None."""

    @property
    def lateness_p99_s(self) -> float | None:
        return self.lateness.quantile(0.99)

    @property
    def faithful(self) -> bool | None:
        """Lateness p99 within the limit (no segment released: nothing was late); None if not measured."""
        if not self.measured:
            return None
        p99 = self.lateness_p99_s
        return p99 is None or p99 <= self.limit_s

    def to_dict(self) -> dict[str, Any]:
        """summary.json's ``timing``: ``lateness_ms`` and ``loop_lag_ms`` (p50, p99), ``faithful``, ``segments``."""
        entry: dict[str, Any] = {"lateness_ms": _milliseconds(self.lateness)}
        if self.loop_lag is not None:
            entry["loop_lag_ms"] = _milliseconds(self.loop_lag)
        entry["segments"] = self.lateness.count
        entry["faithful"] = self.faithful
        return entry

    def warning(self, what: str) -> str | None:
        """The console's warning when not faithful, else None."""
        if self.faithful is not False:
            return None
        p99 = self.lateness_p99_s
        assert p99 is not None
        lag = None if self.loop_lag is None else self.loop_lag.quantile(0.99)
        return (f"{what}: timing not faithful: segment release lateness p99 {p99 * 1e3:.1f} ms > "
                f"{self.limit_s * 1e3:g} ms limit"
                + ("" if lag is None else f" (event loop lag p99 {lag * 1e3:.1f} ms)")
                + "; its delivery times measure this host's load, not the link")


class LoopLagProbe:
    """``async with LoopLagProbe() as probe``: a task that sleeps ``interval_s`` again and again.

    ``lag`` holds how much later than asked it woke each time.
    """

    def __init__(self, interval_s: float = LOOP_PROBE_INTERVAL_S) -> None:
        if not interval_s > 0:
            raise ValueError(f"loop probe interval {interval_s!r} is invalid: expected > 0 seconds")
        self.interval_s = interval_s
        self.lag = LatenessSketch()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLagProbe:
        self._task = asyncio.create_task(self._probe(), name="loop-lag-probe")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        interval, lag = self.interval_s, self.lag
        while True:
            asked = loop.time() + interval
            await asyncio.sleep(interval)
            lag.add(loop.time() - asked)


class RunTiming:
    """Every timed link's lateness and the probe's lag, per round (``start_round``/``end_round``) and per device."""

    def __init__(self, links: Mapping[str, Any], probe: LoopLagProbe, limit_s: float = LATENESS_P99_LIMIT_S) -> None:
        self.links: dict[str, TimedLink] = {device: link for device, link in links.items()
                                            if callable(getattr(link, "timing_stats", None))}
        """The devices' links that measure their lateness (the proxy backend's; tun and netem do not)."""
        self.probe = probe
        self.limit_s = limit_s
        self._round_start: tuple[dict[str, LatenessSketch], LatenessSketch] | None = None

    def _now(self) -> tuple[dict[str, LatenessSketch], LatenessSketch]:
        return {device: link.timing_stats() for device, link in self.links.items()}, self.probe.lag.copy()

    def start_round(self) -> None:
        self._round_start = self._now()

    def end_round(self) -> TimingVerdict:
        """The lateness of all links and the loop's lag since ``start_round``."""
        if self._round_start is None:
            raise RuntimeError("RunTiming.end_round called before start_round")
        (start_links, start_lag), (end_links, end_lag) = self._round_start, self._now()
        lateness = LatenessSketch()
        for device, sketch in end_links.items():
            lateness.merge(sketch.since(start_links[device]))
        self._round_start = None
        return TimingVerdict(lateness, end_lag.since(start_lag), self.limit_s, measured=bool(self.links))

    def add_to_summary(self, summary: dict[str, Any]) -> None:
        """Put the run-wide ``timing`` (all links, the probe's lag, the limit) in summary.json, and each timed
        device's lateness over the run in its entry of ``devices``."""
        links = {device: link.timing_stats() for device, link in self.links.items()}
        everything = LatenessSketch()
        for sketch in links.values():
            everything.merge(sketch)
        run = TimingVerdict(everything, self.probe.lag.copy(), self.limit_s, measured=bool(links)).to_dict()
        summary["timing"] = {**run, "limit_ms": self.limit_s * 1e3, "timed_links": len(links)}
        for device, sketch in links.items():
            summary["devices"][device]["timing"] = TimingVerdict(sketch, None, self.limit_s).to_dict()
