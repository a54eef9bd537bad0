"""Reports from hand-made results folders: real PNG plots, a self-contained report.html that renders in Chromium."""

from __future__ import annotations

import base64
import json
import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure
from matplotlib.text import Text

from testbed.cli import main
from testbed.core.events import EVENT_PHASES
from testbed.core.scenario import parse_scenario
from testbed.events import EventRecorder, EventSchedule
from testbed.report import PLOTS, ReportError, RunData, load_run, short_labels, write_plots, write_report
from testbed.report_marks import EVENT_PHASE_OFFSETS, event_marks, event_x
from testbed.report_plots import (
    ACCURACY_STEP,
    MIN_ACCURACY_HEADROOM,
    accuracy_axis_limits,
    energy_by_device,
    plot_accuracy,
    plot_delivery,
    plot_energy,
    strip_offsets,
)
from tests.conftest import debian_tool

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    assert data[:8] == PNG_SIGNATURE, data[:8]
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def assert_png(path: Path, min_bytes: int = 5_000) -> tuple[int, int]:
    data = path.read_bytes()
    assert len(data) >= min_bytes, f"{path} is only {len(data)} bytes"
    width, height = png_size(data)
    assert width >= 300 and height >= 200, (path, width, height)
    return width, height


DEVICES = {"jetson-nano-0": "jetson-nano", "rpi4-0": "rpi4", "rpi4-1": "rpi4"}


def make_run(folder: Path, strategy: str = "dpu", ratio: float = 0.05, rounds: int = 4, devices: int = 3,
             update_fraction: float = 0.1, seed: int = 0) -> Path:
    """A results folder as `testbed run` writes it: results.jsonl (device x round) and summary.json.

    Round 2 sends nothing (its candidate validated worse), round 3 is a re-initialisation round (sent).
    """
    folder.mkdir(parents=True)
    full = 40_000
    records: list[dict[str, Any]] = []
    round_records = []
    for round_index in range(rounds):
        sent = round_index != 2  # round 2 sends nothing ("skip if worse")
        update = full if round_index == 0 else int(full * update_fraction)
        round_records.append({
            "round": round_index, "version": round_index + 1, "sent": sent, "base_version": None,
            "reinitialised": round_index == 3, "server_accuracy": 0.8 + 0.03 * round_index, "validation_accuracy": 0.8,
            "update_bytes": update if sent else 0, "full_model_bytes": full, "index_bits": 1000 * round_index,
            "selected_weights": 100, "partial_weights": 100, "training_samples": 300, "training_seconds": 0.5,
            "round_seconds": 2.0, "devices_updated": devices if sent else 0,
        })
        for device, (name, profile) in enumerate(list(DEVICES.items())[:devices]):
            record: dict[str, Any] = {"run": f"run-{strategy}", "round": round_index, "device": name,
                                      "profile": profile,
                                      "server_version": round_index + 1, "update_sent": sent, "delivered": sent}
            if sent:
                record.update({
                    "version": round_index + 1, "accuracy": 0.78 + 0.03 * round_index + 0.01 * device,
                    "energy_joules": 3.5 + device,
                    "energy_joules_by_phase": {"receive": 2.0 + device, "transmit": 0.5, "compute": 0.2, "idle": 0.8},
                    "phase_seconds": {"receive": 1.0, "transmit": 0.2, "compute": 0.1, "idle": 2.0},
                    "delivery_seconds": (10.0 if round_index == 0 else 0.8) + 0.1 * device + 0.01 * seed,
                    "received_bytes": update + 500, "transmitted_bytes": 200, "update_bytes": update,
                    "weights_hash": "ab", "hash_matches_server": True, "rejected_updates": 0,
                })
            records.append(record)
    (folder / "results.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    summary = {
        "scenario": "handmade", "run_id": f"run-{strategy}", "seed": seed, "strategy": strategy, "ratio": ratio,
        "rounds": round_records,
        "devices": {name: {"profile": profile, "final_version": rounds, "final_accuracy": 0.9,
                           "energy_joules": 12.0, "bytes_received": 60_000, "weights_hash": "ab",
                           "rounds_missed": 0, "hash_matches_server": True}
                    for name, profile in list(DEVICES.items())[:devices]},
        "server": {"final_version": rounds, "final_accuracy": 0.89, "weights_hash": "ab", "published_bytes": 52_000},
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_one_run_writes_four_plots_and_a_self_contained_page(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    page = write_report(run)
    assert page == run / "report.html"
    for name in PLOTS:
        assert_png(run / name)
    text = page.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)
    assert len(images) == len(PLOTS)
    for encoded in images:
        png_size(base64.b64decode(encoded))
    assert not re.search(r"(src|href)=['\"]?(https?:|file:|//)", text), "the page must not load anything"
    assert "handmade: dpu k=0.05" in text
    assert "52,000 B" in text  # published incl. catch-ups
    assert "rpi4-1" in text
    assert "What was run" in text  # seed, links, date, host, versions (dashes where the run folder lacks them)


def test_the_report_shows_what_was_run(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    summary["host"] = {"started_at": "2026-11-29T20:00:00Z", "wall_seconds": 30.2, "hostname": "lab-7",
                       "platform": "Linux-x86_64", "cpus": 2, "python": "3.11.7", "edge_testbed": "0.1.0",
                       "torch": "2.13.0+cpu"}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "scenario.yaml").write_text(yaml.safe_dump({
        "round_period": 60.0, "channel": {"backend": "proxy", "downlink": {"rate": 50000.0, "delay": 0.1, "loss": 0.01},
                                          "uplink": {"rate": 20000.0}}}))
    text = write_report(run).read_text()
    for expected in ("delay 0.1, loss 0.01, rate 50000.0", "rate 20000.0", "2026-11-29T20:00:00Z", "30.2 s",
                     "lab-7, Linux-x86_64, 2 CPUs", "edge-testbed 0.1.0, torch 2.13.0+cpu", "60.0 s"):
        assert expected in text, expected


def test_several_runs_overlay_into_one_report(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "dpu"), make_run(tmp_path / "rpu", strategy="rpu", update_fraction=0.2),
            make_run(tmp_path / "full", strategy="full", ratio=1.0, update_fraction=1.0)]
    page = write_report(runs, tmp_path / "compare")
    text = page.read_text()
    for label in ("handmade: dpu k=0.05", "handmade: rpu k=0.05", "handmade: full k=1.0"):
        assert label in text
    for name in PLOTS:
        assert_png(tmp_path / "compare" / name)
    assert not (tmp_path / "dpu" / "report.html").exists()


def test_same_strategy_twice_is_told_apart_by_folder(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "seed0"), make_run(tmp_path / "seed1", seed=1)]
    text = write_report(runs, tmp_path / "out").read_text()
    assert "(seed0)" in text and "(seed1)" in text


def test_missing_or_broken_results_say_which_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="summary.json not found"):
        write_report(tmp_path)
    run = make_run(tmp_path / "run")
    with (run / "results.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(ReportError, match=r"results.jsonl:13: not valid JSON"):
        load_run(run)
    with pytest.raises(ReportError, match="--out"):
        write_report([run, run])


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = make_run(tmp_path / "a"), make_run(tmp_path / "b", strategy="gcpu")
    assert main(["report", str(first)]) == 0
    assert (first / "report.html").is_file()
    assert main(["report", str(first), str(second), "--out", str(tmp_path / "both")]) == 0
    assert (tmp_path / "both" / "report.html").is_file()
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "not found" in capsys.readouterr().out


def chromium_binary() -> str:
    return debian_tool("chromium")


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    binary = chromium_binary()
    folder = make_run(tmp_path / "run")
    record_events(folder)  # the plots with event markers, the page with its events table
    page = write_report(folder)
    screenshot = tmp_path / "report.png"
    completed = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", f"--screenshot={screenshot}",
         "--window-size=1200,2000", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert screenshot.is_file(), completed.stdout + completed.stderr
    width, height = assert_png(screenshot, min_bytes=20_000)
    assert (width, height) == (1200, 2000)
    # Not a blank page: the rendered plots make many distinct colours.
    from matplotlib.image import imread

    pixels = imread(screenshot)
    distinct = len({tuple(row) for row in pixels[::7, ::7, :3].reshape(-1, 3).round(2).tolist()})
    assert distinct > 30, f"screenshot looks blank ({distinct} colours)"


# --- the plots: what they mark and how they are laid out --------------------------------------------------------------

EVENTS = [
    {"at": "0s", "action": "server_restart"},  # fires before round 0 reaches a phase: round null
    {"round": 1, "phase": "delivery", "action": "outage", "device": "rpi4-0", "for": "12s"},
    {"round": 1, "phase": "delivery", "action": "corrupt", "device": "rpi4-1", "chunks": 2},
    {"round": 3, "action": "broker_restart"},
]


def record_events(folder: Path, rounds: int = 4, not_sent: tuple[int, ...] = (2,)) -> list[dict[str, Any]]:
    """events.jsonl as a run writes it: the real schedule stepped through the rounds as the runner steps it
    (publish, delivery, report; a round that sends nothing reaches only report), the real recorder writing."""
    scenario = parse_scenario({"name": "handmade", "rounds": rounds, "events": EVENTS,
                               "devices": [{"profile": "jetson-nano", "count": 1}, {"profile": "rpi4", "count": 2}]})
    schedule = EventSchedule(scenario.events)
    with EventRecorder(folder) as recorder:
        recorder.record_all(schedule.due(0.0))  # the timer's first tick, while round 0 trains
        for round_index in range(rounds):
            # publish at second 0 of the round, delivery at 1, reports from 5; a second's tick between
            phase_at = {5: "report"} if round_index in not_sent else dict(zip((0, 1, 5), EVENT_PHASES))
            for second in range(10):
                now = 10.0 * round_index + second
                phase = phase_at.get(second)
                recorder.record_all(schedule.due(now) if phase is None
                                    else schedule.phase_reached(round_index, phase, now))
        recorder.record_all(schedule.end_all(10.0 * rounds))
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def texts(figure: Figure) -> list[str]:
    return [artist.get_text() for artist in figure.findobj(Text)]


def vertical_lines_x(figure: Figure) -> set[float]:
    xs = set()
    for axes in figure.axes:
        for line in axes.get_lines():
            xdata = list(line.get_xdata())
            if line.get_linestyle() == "--" and len(xdata) == 2 and xdata[0] == xdata[1]:
                xs.add(float(xdata[0]))
    return xs


def test_accuracy_axis_floor_is_a_round_number_with_headroom_below_the_data() -> None:
    # lowband's accuracies (server 0.914-0.942, devices 0.905-0.955): not from 0.905, not from 0
    assert accuracy_axis_limits([0.914, 0.942, 0.905, 0.955]) == (0.85, 1.0)
    assert accuracy_axis_limits([0.9, 0.9]) == (0.85, 0.95)
    assert accuracy_axis_limits([0.1, 0.7]) == (0.0, 0.8)  # headroom 0.06 below 0.1 reaches 0
    assert accuracy_axis_limits([0.87]) == (0.85, 0.9)  # exactly headroom below 0.87 is 0.85, a multiple of 0.05
    assert accuracy_axis_limits([]) == (0.0, 1.0)


@given(st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=50))
def test_accuracy_axis_limits_hold_their_rule(accuracies: list[float]) -> None:
    floor, ceiling = accuracy_axis_limits(accuracies)
    lowest, highest = min(accuracies), max(accuracies)
    headroom = max(MIN_ACCURACY_HEADROOM, 0.1 * (highest - lowest))
    assert 0.0 <= floor < ceiling <= 1.0
    for limit in (floor, ceiling):
        assert abs(limit / ACCURACY_STEP - round(limit / ACCURACY_STEP)) < 1e-6, limit
    assert floor == 0.0 or headroom - 1e-9 <= lowest - floor < headroom + ACCURACY_STEP + 1e-9
    assert ceiling == 1.0 or headroom - 1e-9 <= ceiling - highest < headroom + ACCURACY_STEP + 1e-9


@pytest.mark.parametrize("bad", [1.2, -0.1, float("nan")])
def test_accuracy_axis_limits_refuse_what_is_not_an_accuracy(bad: float) -> None:
    with pytest.raises(ValueError, match=r"an accuracy is a fraction from 0 to 1, got"):
        accuracy_axis_limits([0.9, bad])


def test_accuracy_plot_marks_rounds_that_sent_nothing_and_reinitialisation_rounds(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "run"))  # round 2 not sent, round 3 re-initialised
    figure = plot_accuracy([run])
    axes = figure.axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert "sent nothing: its candidate validated\nno better than the deployed model" in legend
    assert "re-initialisation round\n(trained from w⁰)" in legend
    notes = {(round(text.get_position()[0], 3), text.get_text()) for text in axes.texts}
    assert (2, "not sent") in notes and (3, "re-init") in notes and not any(x in (0, 1) for x, _ in notes)
    marked = {tuple(point) for collection in axes.collections for point in collection.get_offsets().tolist()}
    server = {r["round"]: r["server_accuracy"] for r in run.summary["rounds"]}
    assert (2, server[2]) in marked and (3, server[3]) in marked and (1, server[1]) not in marked
    accuracies = [r["server_accuracy"] for r in run.summary["rounds"]] + [r["accuracy"] for r in run.delivered()]
    assert axes.get_ylim() == accuracy_axis_limits(accuracies)
    assert axes.get_ylim()[0] < min(accuracies)
    # nothing to mark: neither the legend entries nor the notes
    for entry in run.summary["rounds"]:
        entry.update(sent=True, reinitialised=False)
    plain = plot_accuracy([run]).axes[0]
    assert not plain.texts and "re-initialisation round\n(trained from w⁰)" not in texts(plain.figure)


def test_event_marks_group_fires_by_place_and_span_to_their_end() -> None:
    events = [
        {"action": "server_restart", "kind": "fire", "index": 0, "round": None, "phase": None},
        {"action": "outage", "kind": "fire", "index": 1, "round": 1, "phase": "delivery"},
        {"action": "corrupt", "kind": "fire", "index": 2, "round": 1, "phase": "delivery"},
        {"action": "link", "kind": "fire", "index": 3, "round": 1, "phase": "report"},
        {"action": "outage", "kind": "end", "index": 1, "round": 2, "phase": "delivery"},
        {"action": "link", "kind": "end", "index": 3, "round": 1, "phase": "report"},  # ended where it fired
    ]
    marks, spans = event_marks(events, x_span=50.0)  # 0.45 apart on an axis of 50 rounds: a second label row
    assert [(mark.x, mark.actions) for mark in marks] == [(-0.5, "server_restart"), (0.8, "outage, corrupt"),
                                                          (1.25, "link")]
    assert [mark.row for mark in marks] == [0, 0, 1]
    assert [(span.start, span.end, span.action) for span in spans] == [(0.8, 1.8, "outage")]
    assert [mark.row for mark in event_marks(events, x_span=5.0)[0]] == [0, 0, 0]
    assert event_x(3, "publish") < event_x(3, "delivery") < 3 < event_x(3, "report") < event_x(4, "publish")
    assert set(EVENT_PHASE_OFFSETS) == set(EVENT_PHASES)


def test_events_are_drawn_on_every_round_plot_and_listed_in_the_page(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run")
    recorded = record_events(folder)
    assert [(e["action"], e["kind"], e["round"], e["phase"]) for e in recorded] == [
        ("server_restart", "fire", None, None), ("outage", "fire", 1, "delivery"), ("corrupt", "fire", 1, "delivery"),
        ("outage", "end", 1, "report"),  # 12 s after round 1's delivery: round 2 sends nothing, reaches no phase yet
        ("broker_restart", "fire", 3, "publish"),
        ("broker_restart", "end", 3, "delivery")]  # 3 s of downtime by default
    run = load_run(folder)
    assert run.events == recorded
    expected_x = {event_x(None, None), event_x(1, "delivery"), event_x(3, "publish")}
    for name, plot in (("accuracy", plot_accuracy), ("energy", plot_energy), ("delivery", plot_delivery)):
        figure = plot([run])
        assert vertical_lines_x(figure) == expected_x, name
        labels = texts(figure)
        for action in ("server_restart", "outage, corrupt", "broker_restart"):
            assert action in labels, (name, action)
    page = write_report(folder).read_text()
    assert "Events: handmade: dpu k=0.05" in page
    assert "<td>outage</td><td>end</td><td>device rpi4-0</td><td>direction both, for 12.0</td>" in page


def test_a_run_without_events_draws_no_event_markers(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "run"))
    assert run.events == []
    assert vertical_lines_x(plot_accuracy([run])) == set()
    assert "Events:" not in write_report(run.folder).read_text()


def test_bad_events_file_says_which_line(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run")
    record_events(folder)
    lines = (folder / "events.jsonl").read_text().splitlines()
    for broken, message in (("{not json", r"events.jsonl:2: not valid JSON"),
                            ('{"action": "outage", "kind": "fire", "index": 1, "round": 1, "phase": "deliver"}',
                             r"events.jsonl:2: 'phase' must be one of publish, delivery, report or null, "
                             r"got 'deliver'"),
                            ('{"kind": "begin", "index": 1, "round": -1, "phase": null}',
                             r"events.jsonl:2: 'action' must be an action name, got None; 'kind' must be 'fire' or "
                             r"'end', got 'begin'; 'round' must be a round number or null, got -1"),
                            ("[1, 2]", r"events.jsonl:2: a record is a JSON object, got list")):
        (folder / "events.jsonl").write_text("\n".join([lines[0], broken, *lines[1:]]) + "\n")
        with pytest.raises(ReportError, match=message):
            load_run(folder)
    # a last line cut short (the run killed while writing it) is not a record, as in testbed.events.read_events
    (folder / "events.jsonl").write_text("\n".join(lines) + '\n{"action": "outa')
    assert len(load_run(folder).events) == len(lines)


def test_an_accuracy_no_plot_can_show_is_one_line_naming_the_plot(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    folder = make_run(tmp_path / "run")
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    records[0]["accuracy"] = 93.5  # a percentage where a fraction belongs
    (folder / "results.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    with pytest.raises(ReportError, match=rf"^accuracy.png of {folder}: an accuracy is a fraction from 0 to 1, "
                                          r"got 93.5$"):
        write_report(folder)
    assert main(["report", str(folder)]) == 2
    assert capsys.readouterr().out.strip().count("\n") == 0  # one line, no traceback


def test_energy_is_per_device_with_idle_apart_from_the_active_phases(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "run"))
    totals = energy_by_device(run)
    delivered_rounds = sum(1 for r in run.summary["rounds"] if r["sent"])
    assert totals["rpi4-1"] == {"receive": 4.0 * delivered_rounds, "transmit": 0.5 * delivered_rounds,
                                "compute": 0.2 * delivered_rounds, "idle": 0.8 * delivered_rounds}
    figure = plot_energy([run])
    bars_axes, rounds_axes = figure.axes
    assert [label.get_text() for label in bars_axes.get_yticklabels()] == ["jetson-nano-0", "rpi4-0", "rpi4-1"]
    legend = [text.get_text() for text in rounds_axes.get_legend().get_texts()]
    assert legend[:4] == ["receive (update download)", "transmit (report upload)", "compute (apply + inference)",
                          "idle (rest of the round period)"]
    assert {"jetson-nano-0", "rpi4-0", "rpi4-1"} <= set(legend)  # a line per device in the per-round panel
    assert " 16.5 J (active 14.1)" in texts(figure)  # rpi4-1: (4 + 0.5 + 0.2 + 0.8) J x 3 rounds, idle 2.4 J


def test_delivery_plot_keeps_profiles_apart(tmp_path: Path) -> None:
    run = load_run(make_run(tmp_path / "run"))
    strip_axes = plot_delivery([run]).axes[0]
    jetson, rpi = strip_axes.collections[:2]
    assert jetson.get_paths()[0].vertices.tolist() != rpi.get_paths()[0].vertices.tolist()  # a shape per profile
    jetson_x = {round(x - round(x), 6) for x, _ in jetson.get_offsets().tolist()}
    rpi_x = {round(x - round(x), 6) for x, _ in rpi.get_offsets().tolist()}
    assert jetson_x.isdisjoint(rpi_x), (jetson_x, rpi_x)  # a column per profile within the round
    offsets = strip_offsets(3, 4)
    flat = [x for column in offsets for x in column]
    assert len(set(flat)) == 12 and max(flat) - min(flat) < 0.7 and offsets == strip_offsets(3, 4)


def test_short_labels_keep_what_differs() -> None:
    def run(folder: str, **summary: Any) -> RunData:
        full = {"scenario": "lowband", "strategy": "dpu", "ratio": 0.05, "seed": 7, "rounds": [], **summary}
        return RunData(Path(folder), full, [], "label")

    assert short_labels([run("a"), run("b", strategy="full", ratio=1.0)]) == ["dpu k=0.05", "full k=1.0"]
    assert short_labels([run("a"), run("b", seed=8)]) == ["seed 7", "seed 8"]
    assert short_labels([run("x/a"), run("y/b")]) == ["a", "b"]
    assert short_labels([run("a"), run("b"), run("c", strategy="rpu")]) == ["dpu (a)", "dpu (b)", "rpu"]


def test_overlay_legends_sit_outside_the_axes_and_labels_do_not_overlap(tmp_path: Path) -> None:
    folders = [make_run(tmp_path / "dpu"), make_run(tmp_path / "rpu", strategy="rpu", update_fraction=0.2),
               make_run(tmp_path / "full", strategy="full", ratio=1.0, update_fraction=1.0)]
    record_events(folders[0])
    runs = [load_run(folder) for folder in folders]
    runs = [RunData(r.folder, r.summary, r.records, r.label, r.events, short)
            for r, short in zip(runs, short_labels(runs))]
    for plot in (plot_accuracy, plot_energy, plot_delivery):
        figure = plot(runs)
        renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
        legend_axes = [axes for axes in figure.axes if axes.get_legend() is not None]
        assert len(legend_axes) == 1, plot.__name__
        legend = legend_axes[0].get_legend()
        assert legend.get_window_extent(renderer).x0 >= max(a.get_window_extent(renderer).x1 for a in figure.axes) - 1
        legend_texts = [text.get_text() for text in legend.get_texts()]
        assert any(text.startswith("dpu k=0.05") for text in legend_texts), legend_texts
        assert not any("handmade" in text for text in legend_texts), legend_texts
    bars_axes = plot_energy(runs).axes[0]
    renderer = bars_axes.figure.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = sorted((label.get_window_extent(renderer) for label in bars_axes.get_yticklabels()), key=lambda b: b.y0)
    assert len(boxes) == 9
    assert all(lower.y1 <= upper.y0 for lower, upper in zip(boxes, boxes[1:])), "device labels overlap"


def test_plots_are_the_same_bytes_for_the_same_results(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run")
    record_events(folder)
    runs = [load_run(folder)]
    first, second = write_plots(runs, tmp_path / "one"), write_plots(runs, tmp_path / "two")
    for name in PLOTS:
        assert first[name].read_bytes() == second[name].read_bytes(), name


def test_a_run_stopped_before_its_first_round_still_gets_its_plots(tmp_path: Path) -> None:
    folder = make_run(tmp_path / "run", rounds=0)  # Ctrl-C while round 0 trained: no round, no record
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["rounds"] == [] and (folder / "results.jsonl").read_text() == ""
    write_report(folder)
    for name in PLOTS:
        png_size((folder / name).read_bytes())
