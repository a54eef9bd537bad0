"""Run reports: PNG plots and a self-contained report.html from results.jsonl + summary.json, one run or several overlaid."""

from __future__ import annotations

import base64
import html
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from testbed.core.events import EVENT_PHASES
from testbed.errors import OrchestrationError
from testbed.events import EVENTS_FILE
from testbed.report_plots import PLOT_FUNCTIONS  # chooses matplotlib's Agg backend before pyplot loads

import matplotlib.pyplot as plt  # noqa: E402,I001

PLOTS = {
    "accuracy.png": "Accuracy per round: server and devices; ✕ a round that sent nothing (its candidate validated "
                    "no better than the deployed model), ○ a re-initialisation round; dashed lines the scenario's "
                    "events",
    "bytes.png": "Cumulative bytes sent vs full updating, with the scenario's events",
    "energy.png": "Energy per device over the run (active phases, then idle hatched), and each report's active "
                  "energy per round",
    "delivery.png": "Update delivery time per round (a column and a marker shape per profile) and its distribution",
}


class ReportError(OrchestrationError):
    """A results folder that cannot be reported on (missing or malformed files)."""


@dataclass(frozen=True)
class RunData:
    """One run's results as read from its folder (events.jsonl: none when the run had no events)."""

    folder: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    label: str
    events: list[dict[str, Any]] = field(default_factory=list)
    short_label: str = ""
    """What tells this run from the others of the report, for plot legends (the label itself for one run)."""

    def delivered(self) -> list[dict[str, Any]]:
        return [record for record in self.records if record.get("delivered")]

    def devices(self) -> list[str]:
        return list(dict.fromkeys(record["device"] for record in self.records))


def _read_json_lines(path: Path, check: Callable[[Path, int, dict[str, Any]], None] | None = None
                     ) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, each passed to `check` with its line number; a last line cut short
    (a run killed while writing it) is not one."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # no newline after it: cut short
                continue
            raise ReportError(f"{path}:{number}: not valid JSON ({error})") from None
        if not isinstance(record, dict):
            raise ReportError(f"{path}:{number}: a record is a JSON object, got {type(record).__name__}")
        if check is not None:
            check(path, number, record)
        records.append(record)
    return records


def _check_event(path: Path, number: int, event: dict[str, Any]) -> None:
    """A ReportError naming the line when an events.jsonl record lacks what the plots place it by."""
    problems = []
    if not isinstance(event.get("action"), str):
        problems.append(f"'action' must be an action name, got {event.get('action')!r:.40}")
    if event.get("kind") not in ("fire", "end"):
        problems.append(f"'kind' must be 'fire' or 'end', got {event.get('kind')!r:.40}")
    if not isinstance(event.get("index"), int):
        problems.append(f"'index' must be the event's number, got {event.get('index')!r:.40}")
    round_index, phase = event.get("round"), event.get("phase")
    if round_index is not None and (type(round_index) is not int or round_index < 0):
        problems.append(f"'round' must be a round number or null, got {round_index!r:.40}")
    if phase is not None and phase not in EVENT_PHASES:
        problems.append(f"'phase' must be one of {', '.join(EVENT_PHASES)} or null, got {phase!r:.40}")
    if problems:
        raise ReportError(f"{path}:{number}: " + "; ".join(problems))


def load_run(folder: Path) -> RunData:
    """Read `folder`/summary.json, results.jsonl and events.jsonl (if any); a ReportError says which file is missing
    or bad."""
    folder = Path(folder)
    summary_path, results_path, events_path = folder / "summary.json", folder / "results.jsonl", folder / EVENTS_FILE
    for path in (summary_path, results_path):
        if not path.is_file():
            raise ReportError(f"{path} not found: is {folder} the output folder of a finished `testbed run`?")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{summary_path}: not valid JSON ({error})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("rounds"), list):
        raise ReportError(f"{summary_path}: no 'rounds' list; written by an older testbed?")
    records = _read_json_lines(results_path)
    events = _read_json_lines(events_path, _check_event) if events_path.is_file() else []
    label = f"{summary.get('scenario', folder.name)}: {summary.get('strategy', '?')} k={summary.get('ratio', '?')}"
    return RunData(folder, summary, records, label, events, label)


def short_labels(runs: list[RunData]) -> list[str]:
    """Per run, only what tells it from the others: of scenario, strategy, k and seed the ones that differ between
    the runs, and the folder name for runs that these leave alike (e.g. "dpu k=0.05", "full k=1.0", "dpu (seed1)")."""
    if len(runs) == 1:
        return [runs[0].label]
    parts = [(str(run.summary.get("scenario", "?")), str(run.summary.get("strategy", "?")),
              f"k={run.summary.get('ratio', '?')}", f"seed {run.summary.get('seed', '?')}") for run in runs]
    differing = [index for index in range(4) if len({part[index] for part in parts}) > 1]
    labels = [" ".join(part[index] for index in differing) for part in parts]
    return [f"{label} ({run.folder.name})" if label and labels.count(label) > 1 else label or run.folder.name
            for label, run in zip(labels, runs)]


def _summary_rows(run: RunData) -> dict[str, str]:
    summary, rounds = run.summary, run.summary["rounds"]
    sent = sum(r["update_bytes"] for r in rounds)
    full = sum(r["full_model_bytes"] for r in rounds)
    devices = summary.get("devices", {})
    energies = [state.get("energy_joules", 0.0) for state in devices.values()]
    accuracies = [state["final_accuracy"] for state in devices.values() if state.get("final_accuracy") is not None]
    deliveries = [float(r["delivery_seconds"]) for r in run.delivered()]
    server = summary.get("server", {})
    return {
        "run": str(summary.get("run_id", run.folder.name)),
        "scenario": str(summary.get("scenario", "")),
        "strategy": f"{summary.get('strategy', '')} at k = {summary.get('ratio', '')}",
        "rounds": f"{len(rounds)} ({sum(bool(r['sent']) for r in rounds)} sent an update)",
        "server accuracy (final)": _number(server.get("final_accuracy"), ".3f"),
        "device accuracy (final, mean / min)": (f"{statistics.fmean(accuracies):.3f} / {min(accuracies):.3f}"
                                                if accuracies else "-"),
        "update bytes sent": f"{sent:,} B = {100 * sent / full:.1f}% of full updating ({full:,} B)" if full else f"{sent:,} B",
        "published incl. catch-ups": f"{server.get('published_bytes', 0):,} B",
        "energy per device (mean)": f"{statistics.fmean(energies):.2f} J" if energies else "-",
        "delivery time (median / max)": (f"{statistics.median(deliveries):.2f} s / {max(deliveries):.2f} s"
                                         if deliveries else "-"),
        "devices on the server's final model": (f"{sum(bool(s.get('hash_matches_server')) for s in devices.values())}"
                                                f" of {len(devices)}"),
    }


def _settings_rows(run: RunData) -> dict[str, str]:
    """What was run: seed, links per direction (from the run's scenario.yaml), date, wall time, host, versions."""
    summary = run.summary
    host = summary.get("host") or {}
    rows = {"seed": str(summary.get("seed", "-"))}
    try:
        scenario = yaml.safe_load((run.folder / "scenario.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        scenario = {}
    channel = scenario.get("channel") or {}
    for direction in ("downlink", "uplink"):
        link = channel.get(direction) or {}
        shown = [f"{key} {value}" for key, value in link.items() if value not in (None, [], {}, 0, 0.0)]
        rows[f"link {direction} (SI units)"] = ", ".join(shown) if link else "-"
    rows["backend"] = str(channel.get("backend", "-"))
    rows["round period (modelled)"] = f"{scenario['round_period']} s" if "round_period" in scenario else "-"
    rows["started (UTC)"] = str(host.get("started_at", "-"))
    rows["wall time (host)"] = f"{host['wall_seconds']:.1f} s" if "wall_seconds" in host else "-"
    rows["host"] = (f"{host.get('hostname', '?')}, {host.get('platform', '?')}, {host.get('cpus', '?')} CPUs"
                    if host else "-")
    rows["versions"] = (f"edge-testbed {host.get('edge_testbed', '?')}, torch {host.get('torch', '?')}, "
                        f"Python {host.get('python', '?')}" if host else "-")
    return rows


def _number(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _device_table(run: RunData) -> str:
    rows = []
    for device, state in run.summary.get("devices", {}).items():
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in (
            device, state.get("profile", ""), state.get("final_version", ""),
            _number(state.get("final_accuracy"), ".3f"), _number(state.get("energy_joules"), ".2f"),
            f"{state.get('bytes_received', 0):,}", state.get("rounds_missed", 0),
            "yes" if state.get("hash_matches_server") else "NO",
        )) + "</tr>")
    head = "".join(f"<th>{name}</th>" for name in ("device", "profile", "version", "accuracy", "energy J",
                                                   "bytes received", "rounds missed", "= server"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _events_table(run: RunData) -> str:
    """Every fire and end in the run's events.jsonl: run time, round and phase reached, action, target, settings."""
    rows = []
    for event in run.events:
        target = event.get("target")
        whom = "-" if not target else "all devices" if "all" in target else ", ".join(
            f"{key} {value}" for key, value in target.items())
        settings = ", ".join(f"{key} {value}" for key, value in (event.get("parameters") or {}).items())
        rows.append("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in (
            _number(event.get("t"), ".1f"), "-" if event["round"] is None else event["round"], event["phase"] or "-",
            event["action"], event["kind"], whom, settings or "-")) + "</tr>")
    head = "".join(f"<th>{name}</th>" for name in ("run time (s, measured)", "round", "phase", "action", "fire / end",
                                                   "target", "settings"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; } th { background: #f3f3f3; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
.plots figure { margin: 1.2em 0; }
.note { color: #666; font-size: 0.85em; }
"""


def render_html(runs: list[RunData], plot_files: dict[str, Path]) -> str:
    """The report page: summary per run, device tables, and the plots inlined as base64 PNGs."""
    title = runs[0].label if len(runs) == 1 else f"{len(runs)} runs compared"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>edge-testbed: {html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>edge-testbed report: {html.escape(title)}</h1>"]
    summaries = [_summary_rows(run) for run in runs]
    keys = list(summaries[0])
    parts.append("<table>" + "".join(
        f"<tr><th>{html.escape(key)}</th>" + "".join(f"<td>{html.escape(s[key])}</td>" for s in summaries) + "</tr>"
        for key in keys) + "</table>")
    settings = [_settings_rows(run) for run in runs]
    parts.append("<h2>What was run</h2><table>" + "".join(
        f"<tr><th>{html.escape(key)}</th>" + "".join(f"<td>{html.escape(s.get(key, '-'))}</td>" for s in settings)
        + "</tr>" for key in settings[0]) + "</table>"
        "<p class='note'>Wall time, date, host and delivery times are measured on the host; bytes and energy "
        "come from the model and the seed.</p>")
    if len(runs) > 1:
        parts.append("<h2>Runs in the plots</h2><table>" + "".join(
            f"<tr><th>{html.escape(run.short_label)}</th><td>{html.escape(run.label)}</td>"
            f"<td>{html.escape(str(run.folder))}</td></tr>" for run in runs) + "</table>")
    parts.append("<h2>Plots</h2><div class='plots'>")
    for name, path in plot_files.items():
        encoded = base64.b64encode(path.read_bytes()).decode("ascii")
        caption = html.escape(PLOTS[name])
        parts.append(f"<figure><img alt='{caption}' src='data:image/png;base64,{encoded}'>"
                     f"<figcaption>{caption} ({html.escape(name)})</figcaption></figure>")
    parts.append("</div>")
    for run in runs:
        parts.append(f"<h2>Devices: {html.escape(run.label)}</h2>{_device_table(run)}"
                     f"<p class='note'>results: {html.escape(str(run.folder))}</p>")
        if run.events:
            parts.append(f"<h2>Events: {html.escape(run.label)}</h2>{_events_table(run)}")
    parts.append("<p class='note'>Regenerate with <code>testbed report "
                 + html.escape(" ".join(str(run.folder) for run in runs)) + "</code>.</p></body></html>\n")
    return "".join(parts)


def write_plots(runs: list[RunData], out_dir: Path) -> dict[str, Path]:
    """Write the four PNG plots into `out_dir` (the same results give the same bytes); returns {file name: path}.

    A value no plot can show (an accuracy outside 0 to 1) is a ReportError naming the plot and the folders."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, plot in PLOT_FUNCTIONS.items():
        try:
            figure = plot(runs)
        except ValueError as error:
            raise ReportError(f"{name} of {', '.join(str(run.folder) for run in runs)}: {error}") from None
        try:
            # tight: the image grows to hold the legend placed outside the axes
            figure.savefig(out_dir / name, dpi=110, bbox_inches="tight", pad_inches=0.15)
        finally:
            plt.close(figure)
        written[name] = out_dir / name
    return written


def write_report(run_dirs: Path | list[Path], out_dir: Path | None = None) -> Path:
    """Plots and report.html for one run (into its own folder by default) or several overlaid; returns the HTML path."""
    folders = [Path(run_dirs)] if isinstance(run_dirs, (str, Path)) else [Path(folder) for folder in run_dirs]
    if not folders:
        raise ReportError("no results folder given")
    if out_dir is None:
        if len(folders) > 1:
            raise ReportError("several runs need an output folder for the combined report (--out)")
        out_dir = folders[0]
    runs = [load_run(folder) for folder in folders]
    if len({run.label for run in runs}) < len(runs):  # same scenario and strategy twice (seeds): name the folders
        runs = [replace(run, label=f"{run.label} ({run.folder.name})") for run in runs]
    runs = [replace(run, short_label=short) for run, short in zip(runs, short_labels(runs))]
    plots = write_plots(runs, Path(out_dir))
    page = Path(out_dir) / "report.html"
    page.write_text(render_html(runs, plots), encoding="utf-8")
    return page
