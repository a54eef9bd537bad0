"""bench/proxy_cpu.py runs end to end (both write paths over real sockets) and refuses bad arguments in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "bench/proxy_cpu.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_a_short_run_prints_both_write_paths_and_their_ratio() -> None:
    done = run_bench("--rates", "8", "--seconds", "0.3", "--repeats", "2")
    assert done.returncode == 0, done.stderr
    assert "# rerun: python bench/proxy_cpu.py --rates 8 --seconds 0.3 --repeats 2" in done.stdout
    row = re.search(r"^\s+8 Mbit \|\s+([\d.]+) \([\d.]+-[\d.]+\) \|\s+([\d.]+) \([\d.]+-[\d.]+\) \|\s+([\d.]+) \|",
                    done.stdout, re.MULTILINE)
    assert row is not None, done.stdout
    baseline, current, ratio = (float(value) for value in row.groups())
    assert baseline > 0 and current > 0
    assert abs(ratio - current / baseline) < 0.01  # the ratio printed is of the medians printed (to their rounding)
    assert done.stderr == ""


def test_bad_arguments_are_one_line_errors() -> None:
    done = run_bench("--rates", "fast")
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == ("proxy_cpu.py: error: --rates 'fast' is invalid: expected Mbit/s numbers "
                                             "separated by commas, e.g. 2,10,50")
    done = run_bench("--repeats", "0")
    assert done.returncode == 2 and done.stderr.splitlines()[-1].endswith("--repeats >= 1")
