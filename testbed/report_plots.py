"""The report's plots (accuracy, bytes, energy, delivery), with rounds that sent nothing and scenario events marked."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

from testbed.metrics import ENERGY_PHASES  # noqa: E402
from testbed.report_marks import draw_events, round_axis, run_colours  # noqa: E402

if TYPE_CHECKING:
    from testbed.report import RunData

PHASE_COLOURS = {"receive": "#1f77b4", "transmit": "#ff7f0e", "compute": "#2ca02c", "idle": "#cccccc"}
PHASE_NAMES = {"receive": "receive (update download)", "transmit": "transmit (report upload)",
               "compute": "compute (apply + inference)", "idle": "idle (rest of the round period)"}
ACTIVE_PHASES = tuple(phase for phase in ENERGY_PHASES if phase != "idle")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINE_STYLES = ("-", "--", "-.", ":")
NOT_SENT_COLOUR, REINIT_COLOUR = "#d62728", "#9467bd"
MAX_ENERGY_BARS = 40
"""More device bars than this (devices × runs) are drawn as one bar per profile (the mean device of it)."""
MAX_ROUND_NOTES = 20
"""Above this many rounds the accuracy plot marks rounds without writing the reason under each (the legend says it)."""

ACCURACY_STEP = 0.05
MIN_ACCURACY_HEADROOM = 0.02


def accuracy_axis_limits(accuracies: Iterable[float]) -> tuple[float, float]:
    """Accuracy axis limits: round numbers (multiples of 0.05) with headroom below the lowest and above the highest.

    The rule: headroom = max(0.02, 10% of the accuracies' span); the floor is the largest multiple of 0.05 at
    or below (lowest − headroom), and never below 0; the ceiling the smallest multiple of 0.05 at or above
    (highest + headroom), and never above 1. So the lowest point sits between headroom and headroom + 0.05
    above the floor (or the floor is 0): the axis neither starts at the data's minimum nor wastes the plot
    on 0 to 0.8 where nothing is. No accuracy at all gives (0, 1). An accuracy outside [0, 1] is a ValueError.
    """
    values = [float(value) for value in accuracies]
    for value in values:
        if not 0.0 <= value <= 1.0:  # also NaN
            raise ValueError(f"an accuracy is a fraction from 0 to 1, got {value}")
    if not values:
        return 0.0, 1.0
    lowest, highest = min(values), max(values)
    headroom = max(MIN_ACCURACY_HEADROOM, 0.1 * (highest - lowest))
    # rounded before floor/ceil so that 0.85 / 0.05 = 16.999999999999996 counts as the multiple it is
    floor_steps = math.floor(round((lowest - headroom) / ACCURACY_STEP, 9))
    ceiling_steps = math.ceil(round((highest + headroom) / ACCURACY_STEP, 9))
    return max(0.0, round(floor_steps * ACCURACY_STEP, 9)), min(1.0, round(ceiling_steps * ACCURACY_STEP, 9))


def _legend_outside(axes: Axes, handles: list[Artist]) -> None:
    if handles:
        axes.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def spans_a_decade(values: Sequence[float]) -> bool:
    """Whether positive values spread over more than ×10 (full-model rounds next to sparse ones): a log axis then."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _log_scale(axes: Axes, which: str) -> None:
    """Axis `which` ("x" or "y") on a log scale labelled in plain numbers (0.9, 2, 10), not powers of ten."""
    getattr(axes, f"set_{which}scale")("log")
    axis = axes.xaxis if which == "x" else axes.yaxis
    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))


def _by_round(points_per_device: Iterable[list[tuple[int, float]]]) -> dict[int, list[float]]:
    """The values of every device per round, rounds in order."""
    by_round: dict[int, list[float]] = {}
    for points in points_per_device:
        for round_index, value in points:
            by_round.setdefault(round_index, []).append(value)
    return dict(sorted(by_round.items()))


# --- accuracy -----------------------------------------------------------------------------------------------------

def round_note(record: dict[str, Any]) -> str | None:
    """What the accuracy plot writes under a round: "not sent" (summary.json's `sent` false: the server withheld
    a candidate that validated no better than the deployed model), "re-init" (its `reinitialised`: trained from
    w⁰), both, or None."""
    notes = (["re-init"] if record.get("reinitialised") else []) + ([] if record["sent"] else ["not sent"])
    return ",\n".join(notes) or None


def plot_accuracy(runs: list[RunData]) -> Figure:
    """Accuracy vs round: server and every device for one run, server and device mean per run for several;
    rounds that sent nothing and re-initialisation rounds marked, scenario events drawn."""
    figure, axes = plt.subplots(figsize=(9, 4.5))
    colours = run_colours(runs)
    accuracies: list[float] = []
    for run, colour in zip(runs, colours):
        rounds = run.summary["rounds"]
        single = len(runs) == 1
        server = [(r["round"], r["server_accuracy"]) for r in rounds]
        accuracies += [accuracy for _, accuracy in server]
        axes.plot([x for x, _ in server], [y for _, y in server], "o-", color="black" if single else colour,
                  linewidth=2, zorder=3, label="server" if single else f"{run.short_label}: server")
        device_accuracy: dict[str, list[tuple[int, float]]] = {}
        for record in run.delivered():
            device_accuracy.setdefault(record["device"], []).append((record["round"], record["accuracy"]))
            accuracies.append(record["accuracy"])
        if single:
            for device, points in device_accuracy.items():
                axes.plot(*zip(*points), ".--", alpha=0.8, label=device)
        elif device_accuracy:
            by_round = _by_round(device_accuracy.values())
            axes.plot(list(by_round), [statistics.fmean(values) for values in by_round.values()], "s--", color=colour,
                      alpha=0.7, label=f"{run.short_label}: device mean")
        not_sent = [(r["round"], r["server_accuracy"]) for r in rounds if not r["sent"]]
        reinitialised = [(r["round"], r["server_accuracy"]) for r in rounds if r.get("reinitialised")]
        if not_sent:
            axes.scatter(*zip(*not_sent), marker="X", s=110, color=NOT_SENT_COLOUR, zorder=4, edgecolors="white")
        if reinitialised:
            axes.scatter(*zip(*reinitialised), marker="o", s=260, facecolors="none", edgecolors=REINIT_COLOUR,
                         linewidths=2, zorder=4)
        if single:
            for r in rounds:
                if not r["sent"]:
                    axes.axvspan(r["round"] - 0.4, r["round"] + 0.4, color=NOT_SENT_COLOUR, alpha=0.08, linewidth=0)
                note = round_note(r)
                if note and len(rounds) <= MAX_ROUND_NOTES:
                    axes.text(r["round"], 0.02, note, transform=axes.get_xaxis_transform(), ha="center", va="bottom",
                              fontsize="x-small", color=REINIT_COLOUR if r["sent"] else NOT_SENT_COLOUR)
    x_limits = round_axis(axes, runs)
    handles = axes.get_legend_handles_labels()[0]
    if any(not r["sent"] for run in runs for r in run.summary["rounds"]):
        handles.append(Line2D([], [], marker="X", linestyle="", color=NOT_SENT_COLOUR, markersize=9,
                              label="sent nothing: its candidate validated\nno better than the deployed model"))
    if any(r.get("reinitialised") for run in runs for r in run.summary["rounds"]):
        handles.append(Line2D([], [], marker="o", linestyle="", markerfacecolor="none", markeredgecolor=REINIT_COLOUR,
                              markeredgewidth=2, markersize=12, label="re-initialisation round\n(trained from w⁰)"))
    handles += draw_events(axes, runs, colours, x_limits)
    axes.set_ylim(*accuracy_axis_limits(accuracies))
    axes.set_ylabel("accuracy")
    axes.set_title("Accuracy per round")
    axes.grid(alpha=0.3)
    _legend_outside(axes, handles)
    return figure


# --- bytes --------------------------------------------------------------------------------------------------------

def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def plot_bytes(runs: list[RunData]) -> Figure:
    """Cumulative update bytes sent per run, against sending the full model every round; scenario events drawn."""
    figure, axes = plt.subplots(figsize=(9, 4.5))
    colours = run_colours(runs)
    full_drawn = False
    for run, colour in zip(runs, colours):
        rounds = run.summary["rounds"]
        xs = [r["round"] for r in rounds]
        sent = _cumulative([r["update_bytes"] for r in rounds])
        name = "sent" if len(runs) == 1 else run.short_label
        axes.plot(xs, sent, "o-", color=colour, label=f"{name} ({sent[-1] / 1024:.1f} KiB)" if sent else name)
        if not full_drawn or len({r["full_model_bytes"] for r in rounds}) > 1:
            full = _cumulative([r["full_model_bytes"] for r in rounds])
            axes.plot(xs, full, ":", color="black" if not full_drawn else colour,
                      label=f"full updating ({full[-1] / 1024:.1f} KiB)" if full else "full updating")
            full_drawn = True
    x_limits = round_axis(axes, runs)
    handles = axes.get_legend_handles_labels()[0] + draw_events(axes, runs, colours, x_limits)
    axes.set_ylabel("cumulative bytes sent")
    if any(r["full_model_bytes"] > 0 for run in runs for r in run.summary["rounds"]):
        axes.set_yscale("log")  # not before a first round (a run stopped while training it)
    axes.set_title("Update bytes, cumulative (log scale)")
    axes.grid(alpha=0.3, which="both")
    _legend_outside(axes, handles)
    return figure


# --- energy -------------------------------------------------------------------------------------------------------

def energy_by_device(run: RunData) -> dict[str, dict[str, float]]:
    """Joules per device and phase over the run: the sum of the device's reports in results.jsonl."""
    totals = {device: dict.fromkeys(ENERGY_PHASES, 0.0) for device in run.devices()}
    for record in run.delivered():
        phases = record.get("energy_joules_by_phase") or {}
        for phase in ENERGY_PHASES:
            totals[record["device"]][phase] += float(phases.get(phase, 0.0))
    return totals


def active_energy_by_round(run: RunData) -> dict[str, list[tuple[int, float]]]:
    """Per device, (round, joules of receive + transmit + compute) of each report: the energy the update cost."""
    active: dict[str, list[tuple[int, float]]] = {}
    for record in run.delivered():
        phases = record.get("energy_joules_by_phase") or {}
        active.setdefault(record["device"], []).append(
            (record["round"], sum(float(phases.get(phase, 0.0)) for phase in ACTIVE_PHASES)))
    return active


def _energy_bars(runs: list[RunData]) -> tuple[list[str], list[dict[str, float]], str]:
    """(bar labels, joules by phase per bar, what a bar is): a bar per device, or per profile when there are many."""
    labels: list[str] = []
    bars: list[dict[str, float]] = []
    per_device = sum(len(run.devices()) for run in runs) <= MAX_ENERGY_BARS
    for run in runs:
        prefix = "" if len(runs) == 1 else f"{run.short_label} · "
        totals = energy_by_device(run)
        profiles = {record["device"]: record.get("profile", "?") for record in run.records}
        if per_device:
            for device in sorted(totals, key=lambda device: (profiles[device], device)):
                labels.append(prefix + device)
                bars.append(totals[device])
        else:
            for profile in sorted(set(profiles.values())):
                members = [totals[device] for device in totals if profiles[device] == profile]
                labels.append(f"{prefix}{profile} (mean of {len(members)})")
                bars.append({phase: statistics.fmean(m[phase] for m in members) for phase in ENERGY_PHASES})
    return labels, bars, "device" if per_device else "mean device of each profile"


def plot_energy(runs: list[RunData]) -> Figure:
    """Left: each device's energy over the run, active phases then idle; right: each report's active joules by round."""
    labels, bars, per = _energy_bars(runs)
    figure, (totals_axes, rounds_axes) = plt.subplots(1, 2, figsize=(13, max(4.5, 1.5 + 0.28 * len(labels))),
                                                      gridspec_kw={"width_ratios": [1, 1.2]})
    ys = list(range(len(labels)))[::-1]
    left = [0.0] * len(labels)
    for phase in (*ACTIVE_PHASES, "idle"):
        widths = [bar[phase] for bar in bars]
        totals_axes.barh(ys, widths, left=left, color=PHASE_COLOURS[phase], label=PHASE_NAMES[phase],
                         hatch="//" if phase == "idle" else None, edgecolor="white", linewidth=0.5)
        left = [start + width for start, width in zip(left, widths)]
    for y, bar, total in zip(ys, bars, left):
        active = sum(bar[phase] for phase in ACTIVE_PHASES)
        totals_axes.text(total, y, f" {total:,.1f} J (active {active:,.1f})", va="center", fontsize="x-small")
    totals_axes.set_yticks(ys, labels, fontsize="small")
    totals_axes.set_xlim(0, max(left, default=1.0) * 1.45 or 1.0)  # room for the totals written after the bars
    totals_axes.set_xlabel("joules over the run (sum of its reports)")
    totals_axes.set_title(f"Energy per {per}: active, then idle")
    totals_axes.grid(alpha=0.3, axis="x")

    colours = run_colours(runs)
    for run, colour in zip(runs, colours):
        per_device = active_energy_by_round(run)
        if len(runs) == 1:
            profile_of = {record["device"]: record.get("profile", "?") for record in run.records}
            profiles = list(dict.fromkeys(profile_of.values()))
            device_colours = plt.get_cmap("Dark2").colors  # not the phase colours of the bars beside
            dodge = strip_offsets(1, len(per_device), width=0.6)[0]  # devices with equal joules stay visible
            for number, (device, points) in enumerate(per_device.items()):
                rounds_axes.plot([r + dodge[number] for r, _ in points], [joules for _, joules in points],
                                 marker=MARKERS[profiles.index(profile_of[device]) % len(MARKERS)],
                                 color=device_colours[number % len(device_colours)], alpha=0.85, label=device)
        elif per_device:
            by_round = _by_round(per_device.values())
            rounds_axes.fill_between(list(by_round), [min(values) for values in by_round.values()],
                                     [max(values) for values in by_round.values()], color=colour, alpha=0.15,
                                     linewidth=0)
            rounds_axes.plot(list(by_round), [statistics.fmean(values) for values in by_round.values()], "o-",
                             color=colour, label=f"{run.short_label}: device mean (band: min to max)")
    active = [joules for run in runs for points in active_energy_by_round(run).values() for _, joules in points]
    if spans_a_decade(active):
        _log_scale(rounds_axes, "y")
    x_limits = round_axis(rounds_axes, runs)
    handles = rounds_axes.get_legend_handles_labels()[0] + draw_events(rounds_axes, runs, colours, x_limits)
    rounds_axes.set_ylabel("joules per report (receive + transmit + compute)")
    rounds_axes.set_title("Active energy per round (idle left out)")
    rounds_axes.grid(alpha=0.3)
    _legend_outside(rounds_axes, totals_axes.get_legend_handles_labels()[0] + handles)
    return figure


# --- delivery -----------------------------------------------------------------------------------------------------

def strip_offsets(groups: int, members: int, width: float = 0.7) -> list[list[float]]:
    """x offsets within a round's slot of `width`: a column per group (profile or run), its members spread across it.

    Fixed by position, not random, so the same results draw the same plot.
    """
    column = width / groups
    return [[(group - (groups - 1) / 2) * column + (member - (members - 1) / 2) * column * 0.6 / max(members, 1)
             for member in range(members)] for group in range(groups)]


def _delivery_groups(runs: list[RunData]) -> dict[str, list[tuple[int, str, float]]]:
    """(round, device, delivery seconds) of every delivered update, per profile for one run, per run for several."""
    groups: dict[str, list[tuple[int, str, float]]] = {}
    for run in runs:
        for record in run.delivered():
            key = record.get("profile", "?") if len(runs) == 1 else run.short_label
            groups.setdefault(key, []).append((record["round"], record["device"], float(record["delivery_seconds"])))
    return groups


def plot_delivery(runs: list[RunData]) -> Figure:
    """Left: each delivery per round, a column and a marker shape per profile (per run for several); right: the CDFs."""
    figure, (strip_axes, cdf_axes) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})
    groups = _delivery_groups(runs)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    members = max((len({device for _, device, _ in points}) for points in groups.values()), default=1)
    offsets = strip_offsets(max(len(groups), 1), members)
    handles: list[Artist] = []
    for number, (key, points) in enumerate(groups.items()):
        colour, marker = colours[number % len(colours)], MARKERS[number % len(MARKERS)]
        devices = list(dict.fromkeys(device for _, device, _ in points))
        values = sorted(seconds for _, _, seconds in points)
        label = f"{key} (median {statistics.median(values):.2f} s, n={len(values)})"
        line_style = LINE_STYLES[number % len(LINE_STYLES)]
        strip_axes.scatter([r + offsets[number][devices.index(device)] for r, device, _ in points],
                           [seconds for _, _, seconds in points], marker=marker, color=colour, s=28, alpha=0.85,
                           edgecolors="white", linewidths=0.5)
        fractions = [(index + 1) / len(values) for index in range(len(values))]
        cdf_axes.step(values, fractions, where="post", color=colour, linestyle=line_style, marker=marker,
                      markevery=max(1, len(values) // 8), markersize=5)
        handles.append(Line2D([], [], color=colour, linestyle=line_style, marker=marker, label=label))
    if spans_a_decade([seconds for points in groups.values() for _, _, seconds in points]):
        _log_scale(strip_axes, "y")
        _log_scale(cdf_axes, "x")
    x_limits = round_axis(strip_axes, runs)
    handles += draw_events(strip_axes, runs, run_colours(runs), x_limits)
    strip_axes.set_ylabel("delivery time (s)")
    strip_axes.set_title("Delivery time per round")
    strip_axes.grid(alpha=0.3)
    cdf_axes.set_xlabel("delivery time (s), publish → device holds the whole update")
    cdf_axes.set_ylabel("fraction of deliveries")
    cdf_axes.set_ylim(0, 1.02)
    cdf_axes.set_title("Delivery time (CDF)")
    cdf_axes.grid(alpha=0.3)
    if groups:
        _legend_outside(cdf_axes, handles)
    else:
        strip_axes.text(0.5, 0.5, "no update was delivered", ha="center", va="center", transform=strip_axes.transAxes)
    return figure


PLOT_FUNCTIONS = {"accuracy.png": plot_accuracy, "bytes.png": plot_bytes, "energy.png": plot_energy,
                  "delivery.png": plot_delivery}
