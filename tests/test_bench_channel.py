"""bench/link_fidelity.py --quick runs end to end against a real Mosquitto and writes well-formed, sane rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROW_FIELDS = {
    "backend": str, "profile": str, "case": str, "configured_rate_bps": float, "configured_delay_ms": float,
    "configured_loss": float, "configured_goodput_bps": float, "goodput_bps": float, "goodput_ratio": float,
    "model_goodput_bps": float, "goodput_model_ratio": float, "delay_p50_ms": float, "delay_p99_ms": float,
    "loss": float, "loss_ci_low": float, "loss_ci_high": float, "segment_attempts": int, "lost_segments": int,
    "messages": int, "reference": str,
}


def run_quick_bench(out: Path) -> dict[str, Any]:
    completed = subprocess.run([sys.executable, "bench/link_fidelity.py", "--quick", "--json", str(out)],
                               cwd=ROOT, capture_output=True, text=True, timeout=100)
    assert completed.returncode == 0, completed.stderr
    assert "targets:" in completed.stdout and "# rerun: python bench/link_fidelity.py --quick --backend all" in completed.stdout
    result: dict[str, Any] = json.loads(out.read_text())
    return result


DELAY_LOAD_MARGIN_MS = 20.0


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_benchmark_writes_sane_rows(tmp_path: Path) -> None:
    result = run_quick_bench(tmp_path / "channel.json")
    rows = result["rows"]
    assert len(rows) >= 4
    for row in rows:
        for field, kind in ROW_FIELDS.items():
            value = row[field]
            assert isinstance(value, (int, float) if kind is float else kind), (field, value)
            if kind is float:
                assert math.isfinite(value), (field, value)
        assert row["backend"] in result["backends"]
        assert 0.8 <= row["goodput_model_ratio"] <= 1.15, row  # the link keeps to its model's schedule
        assert 0.0 < row["goodput_ratio"] <= 1.1, row
        if row["configured_loss"] == 0:
            assert 0.8 <= row["goodput_ratio"] <= 1.1, row
        assert row["loss_ci_low"] <= row["loss"] <= row["loss_ci_high"]
        assert row["delay_p50_ms"] <= row["delay_p99_ms"]
        assert -1.0 < row["delay_p50_ms"] < 50.0, row
    assert {row["profile"] for row in rows} > {"custom"}  # at least one named profile
    assert "proxy" in result["backends"] and {row["backend"] for row in rows} == set(result["backends"])
    if os.geteuid() == 0 and Path("/dev/net/tun").exists():  # `--backend all` (the default) includes tun here
        assert "tun" in result["backends"]
    for backend in result["backends"]:
        overhead = result["overhead"][backend]
        assert overhead["messages"] >= 500
        assert overhead["throughput_mb_s"] > 0 and overhead["direct_throughput_mb_s"] > 0
    # Every target is met. Some are wall-clock figures (throughput, added latency, goodput over 1.5 s)
    # that a machine busy with other work can miss once; a regression misses them again, so a
    # target missed in the first run must be met in a second one. The p50 delay target (2 ms) is
    # judged on the rows with a load margin instead: beside two CPU hogs (`python3 -c 'while True:
    # pass' &` twice) the scheduler alone put the grid's worst p50 at +10.75 ms (proxy) and +11.04 ms (tun).
    delay_limit_ms = 2.0 + DELAY_LOAD_MARGIN_MS
    assert all(abs(row["delay_p50_ms"]) <= delay_limit_ms for row in rows), [
        (row["backend"], row["case"], row["delay_p50_ms"]) for row in rows]

    def missed_in(run: dict[str, Any]) -> set[str]:
        return {target["target"] for target in run["targets"]
                if target["met"] is not True and not target["target"].startswith("p50 delay")}

    missed = missed_in(result)
    if missed:
        missed &= missed_in(run_quick_bench(tmp_path / "channel-again.json"))
    assert not missed, f"targets missed twice: {missed}"
