"""Round axes of the report's plots: their extent, and the scenario's events (events.jsonl) drawn on them as markers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

if TYPE_CHECKING:
    from testbed.report import RunData

EVENT_COLOUR = "#8c564b"
EVENT_PHASE_OFFSETS = {"publish": -0.35, "delivery": -0.2, "report": 0.25}
"""Where in round r's slot an event is drawn (x = r + offset): left of the round's point while its update is
published and delivered (what happens then shapes that point), right of it while its reports come in."""
BEFORE_FIRST_ROUND = -0.5
"""x of an event that fired before round 0 reached its first phase (its record has round null)."""
LABEL_ROWS = 3
LABEL_GAP = 0.02
"""Event labels closer than this (a fraction of the x axis) to the previous one go one row lower."""


def event_x(round_index: int | None, phase: str | None) -> float:
    """The x of an event on a round axis, from the round and phase its events.jsonl record names."""
    if round_index is None:
        return BEFORE_FIRST_ROUND
    return round_index + EVENT_PHASE_OFFSETS[phase or "publish"]


@dataclass(frozen=True)
class EventMark:
    """Scenario events that fired at one place of a round axis: x, their actions ("corrupt, duplicate"), label row."""

    x: float
    actions: str
    row: int = 0


@dataclass(frozen=True)
class EventSpan:
    """An event in force (its `for:`) from where it fired to where its end was recorded."""

    start: float
    end: float
    action: str


def event_marks(events: Sequence[dict[str, Any]], x_span: float = 10.0) -> tuple[list[EventMark], list[EventSpan]]:
    """The fires of `events` (events.jsonl records) grouped by x, and the spans from each fire to its end.

    Labels of marks closer than LABEL_GAP × `x_span` to the previous mark go one row lower (of LABEL_ROWS), so
    that neighbours do not overwrite each other.
    """
    actions_at: dict[float, list[str]] = {}
    fired_x: dict[int, float] = {}
    spans = []
    for event in events:
        x = event_x(event["round"], event["phase"])
        if event["kind"] == "fire":
            actions = actions_at.setdefault(x, [])
            if event["action"] not in actions:
                actions.append(event["action"])
            fired_x[event["index"]] = x
        else:
            start = fired_x.pop(event["index"], None)
            if start is not None and x > start:
                spans.append(EventSpan(start, x, event["action"]))
    marks: list[EventMark] = []
    for x in sorted(actions_at):
        row = (marks[-1].row + 1) % LABEL_ROWS if marks and x - marks[-1].x < LABEL_GAP * x_span else 0
        marks.append(EventMark(x, ", ".join(actions_at[x]), row))
    return marks, spans


def round_axis(axes: Axes, runs: list[RunData]) -> tuple[float, float]:
    """Set the x axis of a round plot to every round and every event of `runs`; returns its limits."""
    xs = [float(r["round"]) for run in runs for r in run.summary["rounds"]]
    xs += [event_x(event["round"], event["phase"]) for run in runs for event in run.events]
    low, high = (min(xs) - 0.6, max(xs) + 0.6) if xs else (-0.6, 0.6)
    axes.set_xlim(low, high)
    axes.set_xlabel("round")
    return low, high


def draw_events(axes: Axes, runs: list[RunData], colours: list[str], x_limits: tuple[float, float]) -> list[Artist]:
    """Each run's events as dashed vertical lines labelled with their actions, `for:` spans shaded; legend handles."""
    drawn_labels: set[tuple[float, str]] = set()
    handles: list[Artist] = []
    for run, colour in zip(runs, colours):
        colour = EVENT_COLOUR if len(runs) == 1 else colour
        marks, spans = event_marks(run.events, x_limits[1] - x_limits[0])
        for span in spans:
            axes.axvspan(span.start, span.end, color=colour, alpha=0.07, linewidth=0)
        for mark in marks:
            axes.axvline(mark.x, color=colour, linestyle="--", linewidth=1, alpha=0.8)
            if (mark.x, mark.actions) not in drawn_labels:  # the same events in several runs: one label
                drawn_labels.add((mark.x, mark.actions))
                axes.text(mark.x, 0.98 - 0.33 * mark.row, mark.actions, transform=axes.get_xaxis_transform(),
                          rotation=90, ha="right", va="top", fontsize="x-small", color=colour,
                          bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})
        if marks and not handles:
            handles.append(Line2D([], [], color=colour, linestyle="--", linewidth=1,
                                  label="scenario event (events.jsonl)"))
        if spans and len(handles) < 2:
            handles.append(Patch(color=colour, alpha=0.15, label="event in force (its for:)"))
    return handles


def run_colours(runs: list[RunData]) -> list[str]:
    """A colour per run, the same in every plot."""
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [colours[index % len(colours)] for index in range(len(runs))]
