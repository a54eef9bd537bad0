"""bench/serial_throughput.py runs and prints its figure next to the net line rate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_bench() -> tuple[list[float], str]:
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serial_throughput.py"), "--seconds", "0.6"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr
    ratios = [float(value) for value in re.findall(r"= (\d\.\d+) of the net line rate", completed.stdout)]
    assert len(ratios) == 2, completed.stdout
    assert "net of framing" in completed.stdout
    return ratios, completed.stdout


def test_serial_throughput_bench_prints_the_ratio_to_the_line_rate() -> None:
    # Pacing never sends faster than the line rate; it can fall behind it only when this process is
    # starved of CPU for part of the 0.6 s, which a busy machine does now and then, so a slow
    # figure is measured once more before it counts as a failure.
    ratios, output = run_bench()
    assert all(ratio <= 1.1 for ratio in ratios), output
    if not all(ratio >= 0.9 for ratio in ratios):
        ratios, output = run_bench()
        assert all(0.9 <= ratio <= 1.1 for ratio in ratios), output
