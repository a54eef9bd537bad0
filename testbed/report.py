"""Run reports: PNG plots and a self-contained report.html from results.jsonl + summary.json, one run or several overlaid."""

from __future__ import annotations

import base64
import html
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)
from matplotlib.figure import Figure  # noqa: E402

from testbed.metrics import ENERGY_PHASES  # noqa: E402
from testbed.errors import OrchestrationError

PLOTS = {
    "accuracy.png": "Accuracy per round",
    "bytes.png": "Cumulative bytes sent vs full updating",
    "energy.png": "Energy per round by phase",
    "delivery.png": "Update delivery time",
}
PHASE_COLOURS = {"receive": "#1f77b4", "transmit": "#ff7f0e", "compute": "#2ca02c", "idle": "#bbbbbb"}


class ReportError(OrchestrationError):
    """A results folder that cannot be reported on (missing or malformed files)."""


@dataclass(frozen=True)
class RunData:
    """One run's results as read from its folder."""

    folder: Path
    summary: dict[str, Any]
    records: list[dict[str, Any]]
    label: str

    def delivered(self) -> list[dict[str, Any]]:
        return [record for record in self.records if record.get("delivered")]

    def devices(self) -> list[str]:
        return list(dict.fromkeys(record["device"] for record in self.records))


def load_run(folder: Path) -> RunData:
    """Read `folder`/summary.json and results.jsonl; a ReportError says which file is missing or bad."""
    folder = Path(folder)
    summary_path, results_path = folder / "summary.json", folder / "results.jsonl"
    for path in (summary_path, results_path):
        if not path.is_file():
            raise ReportError(f"{path} not found: is {folder} the output folder of a finished `testbed run`?")
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ReportError(f"{summary_path}: not valid JSON ({error})") from None
    records = []
    for number, line in enumerate(results_path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ReportError(f"{results_path}:{number}: not valid JSON ({error})") from None
    if not isinstance(summary, dict) or not isinstance(summary.get("rounds"), list):
        raise ReportError(f"{summary_path}: no 'rounds' list; written by an older testbed?")
    label = f"{summary.get('scenario', folder.name)}: {summary.get('strategy', '?')} k={summary.get('ratio', '?')}"
    return RunData(folder, summary, records, label)


def _run_styles(runs: list[RunData]) -> list[str]:
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return [colours[index % len(colours)] for index in range(len(runs))]


def plot_accuracy(runs: list[RunData]) -> Figure:
    """Accuracy vs round: server and every device for one run; server and fleet mean per run for several."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for run, colour in zip(runs, _run_styles(runs)):
        rounds = run.summary["rounds"]
        prefix = "" if len(runs) == 1 else f"{run.label} "
        axes.plot([r["round"] for r in rounds], [r["server_accuracy"] for r in rounds], "o-", color=colour if len(runs) > 1 else "black",
                  linewidth=2, label=f"{prefix}server")
        if len(runs) == 1:
            for device in run.devices():
                points = [(r["round"], r["accuracy"]) for r in run.delivered() if r["device"] == device]
                if points:
                    axes.plot(*zip(*points), ".--", alpha=0.8, label=device)
        else:
            by_round: dict[int, list[float]] = {}
            for record in run.delivered():
                by_round.setdefault(record["round"], []).append(record["accuracy"])
            if by_round:
                xs = sorted(by_round)
                axes.plot(xs, [statistics.fmean(by_round[x]) for x in xs], "s--", color=colour, alpha=0.7,
                          label=f"{prefix}device mean")
    axes.set_xlabel("round")
    axes.set_ylabel("accuracy")
    axes.set_title("Accuracy per round")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure


def _cumulative(values: list[float]) -> list[float]:
    total, out = 0.0, []
    for value in values:
        total += value
        out.append(total)
    return out


def plot_bytes(runs: list[RunData]) -> Figure:
    """Cumulative update bytes sent per run, against sending the full model every round."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    full_drawn = False
    for run, colour in zip(runs, _run_styles(runs)):
        rounds = run.summary["rounds"]
        xs = [r["round"] for r in rounds]
        sent = _cumulative([r["update_bytes"] for r in rounds])
        axes.plot(xs, sent, "o-", color=colour, label=f"{run.label} ({sent[-1] / 1024:.1f} KiB)" if sent else run.label)
        if not full_drawn or len({r["full_model_bytes"] for r in rounds}) > 1:
            full = _cumulative([r["full_model_bytes"] for r in rounds])
            axes.plot(xs, full, ":", color="black" if not full_drawn else colour,
                      label=f"full updating ({full[-1] / 1024:.1f} KiB)" if full else "full updating")
            full_drawn = True
    axes.set_xlabel("round")
    axes.set_ylabel("cumulative bytes sent")
    axes.set_yscale("log")
    axes.set_title("Update bytes, cumulative (log scale)")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _energy_per_round(run: RunData) -> dict[int, dict[str, float]]:
    """Fleet mean joules per device, per round and phase, over the devices that reported."""
    sums: dict[int, dict[str, float]] = {}
    counts: dict[int, int] = {}
    for record in run.delivered():
        phases = record.get("energy_joules_by_phase") or {}
        row = sums.setdefault(record["round"], dict.fromkeys(ENERGY_PHASES, 0.0))
        counts[record["round"]] = counts.get(record["round"], 0) + 1
        for phase in ENERGY_PHASES:
            row[phase] += float(phases.get(phase, 0.0))
    return {r: {phase: joules / counts[r] for phase, joules in row.items()} for r, row in sorted(sums.items())}


def plot_energy(runs: list[RunData]) -> Figure:
    """Stacked bars: mean energy per device per round, split by phase; runs side by side."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(runs)
    for position, run in enumerate(runs):
        energy = _energy_per_round(run)
        xs = [r + (position - (len(runs) - 1) / 2) * width for r in energy]
        bottom = [0.0] * len(xs)
        for phase in ENERGY_PHASES:
            heights = [energy[r][phase] for r in energy]
            axes.bar(xs, heights, width=width * 0.95, bottom=bottom, color=PHASE_COLOURS[phase],
                     label=phase if position == 0 else None, edgecolor="white" if len(runs) > 1 else None)
            bottom = [b + h for b, h in zip(bottom, heights)]
        if len(runs) > 1 and xs:
            axes.annotate(run.label, (xs[-1], bottom[-1]), textcoords="offset points", xytext=(0, 3),
                          ha="center", fontsize="x-small", rotation=90)
    axes.set_xlabel("round")
    axes.set_ylabel("joules per device (fleet mean)")
    axes.set_title("Energy per round by phase")
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure


def plot_delivery(runs: list[RunData]) -> Figure:
    """Empirical distribution (CDF) of update delivery times, per profile for one run, per run for several."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    groups: dict[str, list[float]] = {}
    for run in runs:
        for record in run.delivered():
            key = record.get("profile", "?") if len(runs) == 1 else run.label
            groups.setdefault(key, []).append(float(record["delivery_seconds"]))
    for key, values in groups.items():
        values.sort()
        fractions = [(index + 1) / len(values) for index in range(len(values))]
        axes.step(values, fractions, where="post",
                  label=f"{key} (median {statistics.median(values):.2f} s, n={len(values)})")
    every = [value for values in groups.values() for value in values]
    if every and min(every) > 0 and max(every) / min(every) > 10:  # full-model rounds next to sparse ones
        axes.set_xscale("log")
    axes.set_xlabel("delivery time (s), publish → device holds the whole update")
    axes.set_ylabel("fraction of deliveries")
    axes.set_ylim(0, 1.02)
    axes.set_title("Update delivery time (CDF)")
    axes.grid(alpha=0.3)
    if groups:
        axes.legend(fontsize="small")
    else:
        axes.text(0.5, 0.5, "no update was delivered", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    return figure


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


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: left; } th { background: #f3f3f3; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
.plots { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
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
    parts.append("<p class='note'>Regenerate with <code>testbed report "
                 + html.escape(" ".join(str(run.folder) for run in runs)) + "</code>.</p></body></html>\n")
    return "".join(parts)


def write_plots(runs: list[RunData], out_dir: Path) -> dict[str, Path]:
    """Write the four PNG plots into `out_dir`; returns {file name: path}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, plot in (("accuracy.png", plot_accuracy), ("bytes.png", plot_bytes),
                       ("energy.png", plot_energy), ("delivery.png", plot_delivery)):
        figure = plot(runs)
        try:
            figure.savefig(out_dir / name, dpi=110)
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
    plots = write_plots(runs, Path(out_dir))
    page = Path(out_dir) / "report.html"
    page.write_text(render_html(runs, plots), encoding="utf-8")
    return page
