"""Reports from hand-made results folders: plots are real PNGs, report.html is self-contained and renders in Chromium."""

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

from testbed.cli import main
from testbed.report import PLOTS, ReportError, load_run, write_report
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


def make_run(folder: Path, strategy: str = "dpu", ratio: float = 0.05, rounds: int = 4, devices: int = 3,
             update_fraction: float = 0.1, seed: int = 0) -> Path:
    """A results folder as `testbed run` writes it: results.jsonl (device x round) and summary.json."""
    folder.mkdir(parents=True)
    full = 40_000
    records: list[dict[str, Any]] = []
    round_records = []
    for round_index in range(rounds):
        sent = round_index != 2  # round 2 sends nothing ("skip if worse")
        update = full if round_index == 0 else int(full * update_fraction)
        round_records.append({
            "round": round_index, "version": round_index + 1, "sent": sent, "base_version": None,
            "reinitialised": False, "server_accuracy": 0.8 + 0.03 * round_index, "validation_accuracy": 0.8,
            "update_bytes": update if sent else 0, "full_model_bytes": full, "index_bits": 1000 * round_index,
            "selected_weights": 100, "partial_weights": 100, "training_samples": 300, "training_seconds": 0.5,
            "round_seconds": 2.0, "devices_updated": devices if sent else 0,
        })
        for device in range(devices):
            record: dict[str, Any] = {"run": f"run-{strategy}", "round": round_index, "device": f"dev-{device}",
                                      "profile": "rpi4" if device else "jetson-nano",
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
        "devices": {f"dev-{device}": {"profile": "rpi4", "final_version": rounds, "final_accuracy": 0.9,
                                      "energy_joules": 12.0, "bytes_received": 60_000, "weights_hash": "ab",
                                      "rounds_missed": 0, "hash_matches_server": True}
                    for device in range(devices)},
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
    assert "dev-2" in text
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
    page = write_report(make_run(tmp_path / "run"))
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
