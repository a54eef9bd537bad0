"""Ctrl-C on `testbed run`: the round in progress ends, summary.json (interrupted) and the report are written, exit 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.timeout(240)


def test_ctrl_c_writes_the_summary_and_the_report_and_exits_130(tmp_path: Path) -> None:
    scenario = tmp_path / "interrupted.yaml"
    scenario.write_text(yaml.safe_dump({
        "name": "interrupted", "seed": 2, "rounds": 8, "round_timeout": "60s",
        "data": {"initial_samples": 200, "new_samples_per_round": 60},
        "update": {"epochs": 2, "ratio": 0.1}, "model": {"hidden": [16]},
        "devices": [{"profile": "rpi4", "count": 2}],
        "channel": {"downlink": {"rate": "20kbit", "delay": "100ms"}},
        "metrics": {"enabled": False},
    }))
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(scenario), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 150
    try:
        for line in process.stdout:  # wait for the first round to end, then press Ctrl-C
            lines.append(line)
            if line.startswith("round 0:"):
                break
            assert time.monotonic() < deadline, "".join(lines)
        process.send_signal(signal.SIGINT)
        interrupted_at = time.monotonic()
        rest, _ = process.communicate(timeout=90)
    finally:
        process.kill()
    lines.append(rest)
    output = "".join(lines)
    assert process.returncode == 130, output
    assert time.monotonic() - interrupted_at < 60, output  # well before the 7 rounds left
    assert "Ctrl-C: ending the round in progress" in output and "interrupted after" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["rounds_planned"] == 8
    recorded = len(summary["rounds"])
    assert 1 <= recorded < 8
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == 2 * recorded  # each device once per recorded round
    assert (out / "report.html").exists()
