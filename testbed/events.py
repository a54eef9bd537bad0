"""When a scenario's events fire (a pure schedule over run time and rounds), and `events.jsonl`, the record of them.

``EventSchedule`` answers "which events fire now" and owns no clock: the runner tells it the elapsed
run time (``due``) and every round phase it reaches (``phase_reached``), and sleeps until
``next_due_s``. Each event fires once; an event with ``for:`` (a duration) then ends once, that long
after it fired, so the runner can restore what it changed. ``EventRecorder`` appends one JSON line per
fire and end to ``<out>/events.jsonl``, durable before it returns, and tells its listeners (the metrics'
``testbed_events_total{action}``, the console). A resumed run (``testbed run --resume``) keeps the records of
the rounds before its checkpoint (``keep_events_before``) and does not fire those events again
(``EventSchedule.resume``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from testbed.core.events import EVENT_PHASES, EventBase, Phase
from testbed.results import DurableJsonLines, keep_json_lines

EventKind = Literal["fire", "end"]
EVENTS_FILE = "events.jsonl"


@dataclass(frozen=True)
class FiredEvent:
    """An event firing (``kind`` fire) or ending (``kind`` end, its ``for:`` over), handed out at run time ``t_s``."""

    index: int  # the event's position in the scenario's `events:`
    event: EventBase
    kind: EventKind
    due_s: float  # run time it was due at (t_s is later when the runner asked late)
    t_s: float
    round: int | None  # the round the run had reached (None before the first phase of round 0)
    phase: Phase | None

    @property
    def action(self) -> str:
        return self.event.action

    def record(self) -> dict[str, Any]:
        """The ``events.jsonl`` line of this fire or end."""
        return {"t": round(self.t_s, 6), "round": self.round, "phase": self.phase, "action": self.action,
                "target": self.event.target(), "parameters": self.event.parameters(), "kind": self.kind,
                "index": self.index}

    def describe(self) -> str:
        """One line for the console, e.g. ``12.0 s (round 2, delivery): outage of device rpi4-0, ends``."""
        target = self.event.target()
        whom = "" if target is None else " of all devices" if "all" in target else \
            " of " + " ".join(f"{key} {value}" for key, value in target.items())
        settings = ", ".join(f"{key} {value}" for key, value in self.event.parameters().items())
        when = f"{self.t_s:.1f} s" + ("" if self.round is None else f" (round {self.round}, {self.phase})")
        return f"{when}: {self.action}{whom}" + (" ends" if self.kind == "end" else f" {settings}".rstrip())


def _order(fired: FiredEvent) -> tuple[float, int, int]:
    # by due time; at one time an end before a fire (a restore, then the next change), then scenario order
    return fired.due_s, 0 if fired.kind == "end" else 1, fired.index


class EventSchedule:
    """Which of a scenario's events fire (or end) now; pure: no clock, no I/O, no tasks.

    Timed events (``at:``) are due at their time. A round event is due ``after`` seconds from the moment
    the run reaches its round and phase, or any later one: reaching (3, publish) also passes every
    event of rounds 0-2, so a round that ends early or is repeated neither loses nor repeats an event.
    An event with a duration (``for:``) is followed by its end that long after it fired.
    """

    def __init__(self, events: Sequence[EventBase]) -> None:
        self._events = list(events)
        self._due: dict[int, float] = {index: event.at_s for index, event in enumerate(self._events)
                                       if event.at_s is not None}
        self._waiting_rounds = sorted((event.round, EVENT_PHASES.index(event.round_phase), index)
                                      for index, event in enumerate(self._events) if event.round is not None)
        self._fired: set[int] = set()
        self._ends: dict[int, float] = {}
        self._reached: tuple[int, int] | None = None

    @property
    def events(self) -> list[EventBase]:
        """The scenario's events, in order (an event's index is its position here)."""
        return self._events

    @property
    def reached(self) -> tuple[int, Phase] | None:
        """The latest (round, phase) the run reached, or None before the first."""
        return None if self._reached is None else (self._reached[0], EVENT_PHASES[self._reached[1]])

    def due(self, now_s: float) -> list[FiredEvent]:
        """Every fire and end due at run time ``now_s`` and not handed out before, in order; each only once."""
        round_index, phase = self.reached or (None, None)
        fired = [FiredEvent(index, self._events[index], "fire", due_s, now_s, round_index, phase)
                 for index, due_s in self._due.items() if due_s <= now_s and index not in self._fired]
        ended = [FiredEvent(index, self._events[index], "end", due_s, now_s, round_index, phase)
                 for index, due_s in self._ends.items() if due_s <= now_s]
        for end in ended:
            del self._ends[end.index]
        for fire in fired:
            self._fired.add(fire.index)
            duration = fire.event.duration_s
            if duration is not None:
                self._ends[fire.index] = now_s + duration  # as long as `for:` from when it really fired
        return sorted(fired + ended, key=_order)

    def phase_reached(self, round_index: int, phase: Phase, now_s: float) -> list[FiredEvent]:
        """The run reached ``phase`` of ``round_index`` at ``now_s``: schedule the round events it passes, then ``due``."""
        mark = (round_index, EVENT_PHASES.index(phase))
        if self._reached is None or mark > self._reached:
            self._reached = mark
        passed = [entry for entry in self._waiting_rounds if entry[:2] <= self._reached]
        self._waiting_rounds = [entry for entry in self._waiting_rounds if entry[:2] > self._reached]
        for _, _, index in passed:
            self._due[index] = now_s + self._events[index].offset_s
        return self.due(now_s)

    def resume(self, next_round: int, before: EventsBefore, now_s: float) -> list[FiredEvent]:
        """A resumed run that continues at round ``next_round``: the events ``before`` says fired before it do not fire
        again, and the run stands at the end of round ``next_round`` − 1 (round events not fired by then fire at the
        first phase it reaches; timed ones at their time from this run's start). Returned: the end of each event
        still in force then (fired with ``for:``, no end recorded), at ``now_s``: what it changed did not outlive the
        process that changed it, as links, devices and broker start anew."""
        self._fired |= before.fired
        self._waiting_rounds = [entry for entry in self._waiting_rounds if entry[2] not in self._fired]
        self._reached = (next_round - 1, len(EVENT_PHASES) - 1)
        round_index, phase = self.reached or (None, None)
        return [FiredEvent(index, self._events[index], "end", now_s, now_s, round_index, phase)
                for index in sorted(before.fired - before.ended) if self._events[index].duration_s is not None]

    def next_due_s(self) -> float | None:
        """The run time of the next fire or end already scheduled (None: nothing until a later round phase)."""
        times = [due_s for index, due_s in self._due.items() if index not in self._fired] + list(self._ends.values())
        return min(times) if times else None

    def end_all(self, now_s: float) -> list[FiredEvent]:
        """At the end of the run: the end of every event still in force (so what it changed is restored)."""
        round_index, phase = self.reached or (None, None)
        ended = [FiredEvent(index, self._events[index], "end", due_s, now_s, round_index, phase)
                 for index, due_s in self._ends.items()]
        self._ends.clear()
        return sorted(ended, key=_order)

    @property
    def finished(self) -> bool:
        """Every event fired and every end handed out."""
        return len(self._fired) == len(self._events) and not self._ends


@dataclass(frozen=True)
class EventsBefore:
    """What events.jsonl holds of the rounds before a resumed run's checkpoint: which events fired, which ended."""

    fired: frozenset[int]
    ended: frozenset[int]


def keep_events_before(out_dir: Path, next_round: int) -> EventsBefore:
    """Cut ``<out>/events.jsonl`` back to the fires and ends recorded before round ``next_round`` (those of the round
    the resumed run redoes, and a line cut short, go: they are recorded again when they happen again); rewritten
    atomically. Which events fired and ended by then (by their index in the scenario's events)."""
    kept = keep_json_lines(Path(out_dir) / EVENTS_FILE,
                           lambda record: record.get("round") is None
                           or (isinstance(record.get("round"), int) and record["round"] < next_round))
    return EventsBefore(fired=frozenset(record["index"] for record in kept if record.get("kind") == "fire"),
                        ended=frozenset(record["index"] for record in kept if record.get("kind") == "end"))


EventListener = Callable[[FiredEvent], None]


class EventRecorder:
    """Owns ``<out>/events.jsonl``: one line per fire and end, appended and fsynced before ``record`` returns.

    Listeners (``add_listener``, or ``listeners=``) then see every fire and end, e.g.
    ``lambda fired: metrics.record_event(fired.action) if fired.kind == "fire" else None``.
    """

    def __init__(self, out_dir: Path, listeners: Iterable[EventListener] = ()) -> None:
        self.path = Path(out_dir) / EVENTS_FILE
        self._listeners = list(listeners)
        self._log = DurableJsonLines(self.path)

    def __enter__(self) -> EventRecorder:
        self._log.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._log.close()

    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def record(self, fired: FiredEvent) -> None:
        """Append ``fired`` to events.jsonl (durable before this returns), then tell every listener."""
        if not self._log.is_open:
            raise RuntimeError("EventRecorder.record outside its `with` block")
        self._log.append(fired.record())
        for listener in self._listeners:
            listener(fired)

    def record_all(self, fired: Iterable[FiredEvent]) -> None:
        for one in fired:
            self.record(one)


def read_events(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``<out>/events.jsonl`` (none when the run recorded no event); for reports and resumed runs.

    A last line cut short (the run killed in the middle of writing it) is not a record.
    """
    path = Path(out_dir) / EVENTS_FILE
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    return [json.loads(line) for line in lines[:-1] if line.strip()]
