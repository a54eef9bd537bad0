"""bench/cell_recovery.py: a cell's goodput under loss with fast and RTO recovery, measured through real proxies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/cell_recovery.py", *arguments], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_bad_cell_size_is_a_one_line_error() -> None:
    completed = bench("--devices", "0,2")
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == ("bench/cell_recovery.py: error: --devices '0,2': expected "
                                                         "comma-separated cell sizes of at least 1 device")


def test_the_quick_run_measures_both_recoveries_of_one_cell(tmp_path: Path) -> None:
    completed = bench("--quick", "--devices", "2", "--json", str(tmp_path / "rows.json"))
    assert completed.returncode == 0, completed.stderr
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [(row["devices"], row["recovery"]) for row in rows] == [(2, "fast"), (2, "rto")]
    for row in rows:  # every byte arrived (the bench raises otherwise), at no more than the configured rate
        assert 0 < row["cell_goodput_bps"] <= row["configured_goodput_bps"] * 1.05
        assert row["fast_retransmits"] + row["timeout_retransmits"] == (
            row["lost_segments"] if row["recovery"] == "fast" else 0)
    assert "| 2 devices, 10 Mbit/s 0 ms |" in completed.stdout
