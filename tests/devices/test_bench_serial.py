"""bench/serial_throughput.py runs and prints its figure next to the net line rate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_serial_throughput_bench_prints_the_ratio_to_the_line_rate() -> None:
    completed = subprocess.run(
        [sys.executable, str(REPO / "bench" / "serial_throughput.py"), "--seconds", "0.6"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr
    ratios = [float(value) for value in re.findall(r"= (\d\.\d+) of the net line rate", completed.stdout)]
    assert len(ratios) == 2 and all(0.9 <= ratio <= 1.1 for ratio in ratios)
    assert "net of framing" in completed.stdout
