"""Benchmark: how many emulated devices a run carries on this host, and whether its timing stays real.

For each fleet size N (stopping at the first that fails) it runs `testbed run` in a child process on a
small scenario (digits MLP, DPU at 5%, 3 rounds, N × rpi4 behind 1 Mbit/s 20 ms links) and reports:
wall time, round times, p50 delivery against the link's own floor (bytes × 8 / rate + delay: the
physical limit the emulator should reach), lateness p99 from the run's own timing section (when the
run reports one), peak RSS per device, CPU ms per device per update, and converged or the error.
The goals of issue 13 are printed beside the figures: p50 delivery ≤ 1.10 × floor, RSS ≤ 0.5 MiB
per device beyond the model, converged.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASE_SCENARIO = ROOT / "scenarios" / "lowband.yaml"
RATE_BPS = 1_000_000
DELAY_S = 0.020
GOAL_DELIVERY_OVER_FLOOR = 1.10
GOAL_RSS_PER_DEVICE_MIB = 0.5


@dataclass
class ScaleResult:
    """What one run of N devices measured (or why it failed)."""

    devices: int
    broker: str
    wall_s: float
    converged: bool
    error: str = ""
    round_seconds: list[float] = field(default_factory=list)
    p50_delivery_over_floor: float | None = None
    lateness_p99_ms: float | None = None
    peak_rss_mib: float = 0.0
    cpu_s: float = 0.0
    updates: int = 0

    def rss_per_device_mib(self, smallest: ScaleResult) -> float | None:
        """Marginal peak RSS per device over the smallest fleet of the same broker (training, data and the
        model weigh the same in both, so the difference is what the devices cost)."""
        extra = self.devices - smallest.devices
        return None if extra <= 0 else (self.peak_rss_mib - smallest.peak_rss_mib) / extra

    def cpu_ms_per_device_update(self, smallest: ScaleResult) -> float | None:
        """Marginal CPU time per delivered update over the smallest fleet (server training cancels out)."""
        extra = self.updates - smallest.updates
        return None if extra <= 0 else (self.cpu_s - smallest.cpu_s) * 1e3 / extra


def scenario_overrides(devices: int, broker: str, rounds: int) -> list[str]:
    """`--set` overrides turning lowband into the scale scenario of `devices` rpi4s."""
    device_list = json.dumps([{"profile": "rpi4", "count": devices}])
    link = json.dumps({"rate": f"{RATE_BPS // 1000}kbit", "delay": f"{DELAY_S * 1e3:g}ms"})
    return ["--set", f"devices={device_list}", "--set", f"rounds={rounds}", "--set", f"broker={broker}",
            "--set", f"channel.downlink={link}", "--set", f"channel.uplink={link}", "--set", "metrics.port=0",
            "--set", "data.device_test_samples=50", "--set", f"round_timeout={max(120, devices // 2)}s"]


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def link_floor_s(update_bytes: int) -> float:
    """The least time the update can take on the link: serialisation at the rate plus one propagation delay."""
    return update_bytes * 8 / RATE_BPS + DELAY_S


def summarise_run(out_dir: Path, result: ScaleResult) -> None:
    """Fill `result` from the run's summary.json and results.jsonl."""
    summary = json.loads((out_dir / "summary.json").read_text())
    result.round_seconds = [float(record["round_seconds"]) for record in summary["rounds"]]
    devices = summary["devices"]
    result.converged = len(devices) == result.devices and all(d.get("hash_matches_server") for d in devices.values())
    ratios, updates = [], 0
    for line in (out_dir / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("update_sent") and record.get("delivered"):
            updates += 1
            if record.get("delivery_seconds") is not None and record.get("update_bytes"):
                ratios.append(record["delivery_seconds"] / link_floor_s(int(record["update_bytes"])))
    result.updates = updates
    result.p50_delivery_over_floor = statistics.median(ratios) if ratios else None
    timing = summary.get("timing") or {}
    lateness = (timing.get("lateness_ms") or {}) if isinstance(timing, dict) else {}
    result.lateness_p99_ms = lateness.get("p99")


def run_once(devices: int, broker: str, rounds: int, timeout_s: float) -> ScaleResult:
    """One `testbed run` of `devices` devices in a child process, sampled for RSS every 0.2 s."""
    with tempfile.TemporaryDirectory(prefix="scale-") as folder:
        out_dir = Path(folder) / "run"
        command = [sys.executable, "-m", "testbed.cli", "run", str(BASE_SCENARIO), "--out", str(out_dir),
                   *scenario_overrides(devices, broker, rounds)]
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        log_path = Path(folder) / "console.log"
        with open(log_path, "w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            peak = 0
            while child.poll() is None:
                peak = max(peak, _status_kib(child.pid, "VmRSS"))
                if time.monotonic() - started > timeout_s:
                    child.kill()
                    break
                time.sleep(0.2)
            code = child.wait(timeout=60)
        wall = time.monotonic() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child is reaped: its CPU time is in
        result = ScaleResult(devices, broker, wall, converged=False, peak_rss_mib=peak / 1024,
                             cpu_s=(cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime))
        if (out_dir / "summary.json").exists():
            summarise_run(out_dir, result)
        if code != 0 or not result.converged:
            lines = [line for line in log_path.read_text().splitlines() if line.strip()]
            result.error = (f"exit {code}" + (f" after the {timeout_s:.0f} s limit" if wall > timeout_s else "")
                            + (f": {lines[-1][:160]}" if lines else ""))
        return result


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(results: list[ScaleResult]) -> str:
    rows = ["| broker | N | wall (s) | round times (s) | p50 delivery / floor | lateness p99 (ms) | "
            "peak RSS (MiB) | RSS / device (MiB) | CPU ms / device update | converged |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    smallest: dict[str, ScaleResult] = {}
    for result in results:
        first = smallest.setdefault(result.broker, result)
        rows.append(
            f"| {result.broker} | {result.devices} | {result.wall_s:.1f} | "
            f"{' / '.join(f'{s:.1f}' for s in result.round_seconds) or '—'} | "
            f"{_cell(result.p50_delivery_over_floor, '.2f')} | {_cell(result.lateness_p99_ms, '.1f')} | "
            f"{result.peak_rss_mib:.0f} | {_cell(result.rss_per_device_mib(first), '.3f')} | "
            f"{_cell(result.cpu_ms_per_device_update(first), '.1f')} | "
            f"{'yes' if result.converged else 'no: ' + result.error} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,300,1000", help="fleet sizes to try, in order (default %(default)s)")
    parser.add_argument("--brokers", default="embedded", help="comma-separated: embedded, mosquitto")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run counts as failed")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    results: list[ScaleResult] = []
    for broker in args.brokers.split(","):
        for devices in sizes:
            print(f"scale: {devices} devices, broker {broker} ...", file=sys.stderr, flush=True)
            result = run_once(devices, broker, args.rounds, args.timeout)
            results.append(result)
            print(table(results).splitlines()[-1], file=sys.stderr, flush=True)
            if not result.converged:
                break  # larger fleets on this broker would fail too
    print(f"Fleet scale on {os.cpu_count()} cores: {args.rounds} rounds, N × rpi4 on "
          f"{RATE_BPS // 1000} kbit/s {DELAY_S * 1e3:g} ms links (python bench/scale.py --sizes {args.sizes} "
          f"--brokers {args.brokers})")
    print(f"Goals (issue 13): p50 delivery ≤ {GOAL_DELIVERY_OVER_FLOOR:.2f} × the link floor; RSS ≤ "
          f"{GOAL_RSS_PER_DEVICE_MIB} MiB per device; every device on the server's final hash. Per-device RSS "
          f"and CPU are marginal over the smallest fleet of the same broker.")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([vars(r) for r in results], indent=2))
    return 0 if all(result.converged for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
