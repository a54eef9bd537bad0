"""Benchmark: how many emulated devices a run carries on this host, and whether its timing stays real.

For each broker, worker count and event loop, and each fleet size N (stopping at the first that fails), it
runs `testbed run` in a child process on a small scenario (digits MLP, DPU at 5%, 3 rounds, N × rpi4 behind
links of `--rate` and `--delay`, default 1 Mbit/s 20 ms), `--repeats` times, and reports: wall time, round
times, p50 delivery against the link's own floor (bytes × 8 / rate + delay: the physical limit the emulator
should reach), lateness p50/p99 and event-loop lag p99 from the run's own timing section, peak RSS (the run's
process and its workers) per device, CPU ms per device per update, and converged or the error. With two
event loops (`--loops default,uvloop`) it prints the ratio of their median lateness p99 and wall time.
The goals of issue 13 are printed beside the figures: lateness p99 ≤ 10 ms, p50 delivery ≤ 1.10 × floor,
RSS ≤ 0.5 MiB per device beyond the model, converged.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_SCENARIO = ROOT / "scenarios" / "lowband.yaml"
DEFAULT_RATE = "1mbit"
DEFAULT_DELAY = "20ms"
GOAL_DELIVERY_OVER_FLOOR = 1.10
GOAL_LATENESS_P99_MS = 10.0
GOAL_RSS_PER_DEVICE_MIB = 0.5
EVENT_LOOP_VARIABLE = "TESTBED_EVENT_LOOP"
"""The environment variable a run (and its workers) read to pick the event loop (testbed/event_loop.py)."""
_UNIT_FACTORS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0, "ms": 1e-3, "s": 1.0}


def parse_quantity(text: str) -> float:
    """`100kbit` → 100000.0 bits/s, `50ms` → 0.05 s (the scenario's units); ValueError names a bad one."""
    for unit in sorted(_UNIT_FACTORS, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * _UNIT_FACTORS[unit]
            except ValueError:
                break
    raise ValueError(f"{text!r} is not a rate or a time: write e.g. 100kbit or 50ms")


@dataclass(frozen=True)
class ScaleSetup:
    """What one measured configuration runs: broker, worker processes, event loop, and the links."""

    broker: str = "embedded"
    workers: int = 1
    loop: str = "auto"
    """`auto`: TESTBED_EVENT_LOOP unset (asyncio's loop for the run, uvloop for its workers where installed);
    `default` or `uvloop`: that loop everywhere."""
    rate: str = DEFAULT_RATE
    delay: str = DEFAULT_DELAY

    @property
    def label(self) -> str:
        loops = "testbed's loops" if self.loop == "auto" else f"{self.loop} loop"
        return f"{self.broker}, {self.workers} worker{'s' if self.workers > 1 else ''}, {loops}"

    @property
    def rate_bps(self) -> float:
        return parse_quantity(self.rate)

    @property
    def delay_s(self) -> float:
        return parse_quantity(self.delay)

    def link_floor_s(self, update_bytes: int) -> float:
        """The least time the update can take on the link: serialisation at the rate plus one propagation delay."""
        return update_bytes * 8 / self.rate_bps + self.delay_s


@dataclass
class ScaleResult:
    """What one run of N devices measured (or why it failed)."""

    devices: int
    setup: ScaleSetup
    wall_s: float
    converged: bool
    error: str = ""
    round_seconds: list[float] = field(default_factory=list)
    p50_delivery_over_floor: float | None = None
    lateness_p50_ms: float | None = None
    lateness_p99_ms: float | None = None
    loop_lag_p99_ms: float | None = None
    faithful: bool | None = None
    peak_rss_mib: float = 0.0
    cpu_s: float = 0.0
    updates: int = 0

    def rss_per_device_mib(self, smallest: ScaleResult) -> float | None:
        """Marginal peak RSS per device over the smallest fleet of the same setup (training, data, workers' imports
        and the model weigh the same in both, so the difference is what the devices cost)."""
        extra = self.devices - smallest.devices
        return None if extra <= 0 else (self.peak_rss_mib - smallest.peak_rss_mib) / extra

    def cpu_ms_per_device_update(self, smallest: ScaleResult) -> float | None:
        """Marginal CPU time per delivered update over the smallest fleet (server training cancels out)."""
        extra = self.updates - smallest.updates
        return None if extra <= 0 else (self.cpu_s - smallest.cpu_s) * 1e3 / extra


def scenario_overrides(devices: int, broker: str, rounds: int, setup: ScaleSetup | None = None) -> list[str]:
    """`--set` overrides turning lowband into the scale scenario of `devices` rpi4s."""
    setup = setup or ScaleSetup(broker=broker)
    device_list = json.dumps([{"profile": "rpi4", "count": devices}])
    link = json.dumps({"rate": setup.rate, "delay": setup.delay})
    return ["--set", f"devices={device_list}", "--set", f"rounds={rounds}", "--set", f"broker={broker}",
            "--set", f"channel.downlink={link}", "--set", f"channel.uplink={link}", "--set", "metrics.port=0",
            "--set", "data.device_test_samples=50", "--set", f"round_timeout={max(120, devices // 2)}s",
            "--set", f"fleet.workers={setup.workers}"]


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (its fleet workers, its Mosquitto), from /proc's children lists."""
    tree, index = [pid], 0
    while index < len(tree):
        try:
            for task in os.listdir(f"/proc/{tree[index]}/task"):
                with open(f"/proc/{tree[index]}/task/{task}/children", encoding="ascii") as children:
                    tree.extend(int(child) for child in children.read().split())
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            pass
        index += 1
    return tree


def tree_rss_kib(pid: int) -> int:
    """Resident memory of `pid` and every process under it."""
    return sum(_status_kib(member, "VmRSS") for member in _process_tree(pid))


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
                ratios.append(record["delivery_seconds"] / result.setup.link_floor_s(int(record["update_bytes"])))
    result.updates = updates
    result.p50_delivery_over_floor = statistics.median(ratios) if ratios else None
    timing = summary.get("timing") or {}
    if isinstance(timing, dict):
        lateness = timing.get("lateness_ms") or {}
        result.lateness_p50_ms, result.lateness_p99_ms = lateness.get("p50"), lateness.get("p99")
        result.loop_lag_p99_ms = (timing.get("loop_lag_ms") or {}).get("p99")
        result.faithful = timing.get("faithful")


def child_environment(setup: ScaleSetup, base: Mapping[str, str]) -> dict[str, str]:
    """The run's environment: ``base`` with TESTBED_EVENT_LOOP set to the setup's loop, or unset for `auto`."""
    environment = dict(base)
    environment.pop(EVENT_LOOP_VARIABLE, None)
    if setup.loop != "auto":
        environment[EVENT_LOOP_VARIABLE] = setup.loop
    return environment


def run_once(devices: int, setup: ScaleSetup, rounds: int, timeout_s: float, keep: Path | None = None) -> ScaleResult:
    """One `testbed run` of `devices` devices in a child process, its process tree sampled for RSS every 0.2 s;
    with `keep`, its summary, results, console log and fleet workers' logs are copied there."""
    with tempfile.TemporaryDirectory(prefix="scale-") as folder:
        out_dir = Path(folder) / "run"
        command = [sys.executable, "-m", "testbed.cli", "run", str(BASE_SCENARIO), "--out", str(out_dir),
                   *scenario_overrides(devices, setup.broker, rounds, setup)]
        environment = child_environment(setup, os.environ)
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        log_path = Path(folder) / "console.log"
        with open(log_path, "w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=environment)
            peak = 0
            while child.poll() is None:
                peak = max(peak, tree_rss_kib(child.pid))
                if time.monotonic() - started > timeout_s:
                    child.kill()
                    break
                time.sleep(0.2)
            code = child.wait(timeout=60)
        wall = time.monotonic() - started
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped children (the run; its workers are its own)
        cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
        result = ScaleResult(devices, setup, wall, converged=False, peak_rss_mib=peak / 1024, cpu_s=cpu_s)
        if (out_dir / "summary.json").exists():
            summarise_run(out_dir, result)
        if code != 0 or not result.converged:
            lines = [line for line in log_path.read_text().splitlines() if line.strip()]
            result.error = (f"exit {code}" + (f" after the {timeout_s:.0f} s limit" if wall > timeout_s else "")
                            + (f": {lines[-1][:160]}" if lines else ""))
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("summary.json", "results.jsonl"):
                if (out_dir / name).exists():
                    shutil.copy(out_dir / name, keep / name)
            shutil.copy(log_path, keep / "console.log")
            if (out_dir / "fleet").is_dir():  # the workers' logs: why one ended, if one did
                shutil.copytree(out_dir / "fleet", keep / "fleet", dirs_exist_ok=True)
        return result


def _cell(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def table(results: list[ScaleResult]) -> str:
    rows = ["| setup | N | wall (s) | round times (s) | p50 delivery / floor | lateness p50 / p99 (ms) | "
            "loop lag p99 (ms) | peak RSS (MiB) | RSS / device (MiB) | CPU ms / device update | converged |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    smallest: dict[ScaleSetup, ScaleResult] = {}
    for result in results:
        first = smallest.setdefault(result.setup, result)
        rows.append(
            f"| {result.setup.label} | {result.devices} | {result.wall_s:.1f} | "
            f"{' / '.join(f'{s:.1f}' for s in result.round_seconds) or '—'} | "
            f"{_cell(result.p50_delivery_over_floor, '.2f')} | "
            f"{_cell(result.lateness_p50_ms, '.1f')} / {_cell(result.lateness_p99_ms, '.1f')} | "
            f"{_cell(result.loop_lag_p99_ms, '.1f')} | "
            f"{result.peak_rss_mib:.0f} | {_cell(result.rss_per_device_mib(first), '.3f')} | "
            f"{_cell(result.cpu_ms_per_device_update(first), '.1f')} | "
            f"{'yes' if result.converged else 'no: ' + result.error} |")
    return "\n".join(rows)


def _median_ratio(values: list[float | None], references: list[float | None]) -> float | None:
    """median(values) / median(references) over the measured ones; None if either has none or the reference is 0."""
    measured = [[value for value in side if value is not None] for side in (values, references)]
    if not all(measured) or statistics.median(measured[1]) == 0:
        return None
    return statistics.median(measured[0]) / statistics.median(measured[1])


def _by_setup_and_size(results: list[ScaleResult]) -> dict[tuple[ScaleSetup, int], list[ScaleResult]]:
    """The results of each setup and fleet size (its repeats), in the order they first ran."""
    by_key: dict[tuple[ScaleSetup, int], list[ScaleResult]] = {}
    for result in results:
        by_key.setdefault((result.setup, result.devices), []).append(result)
    return by_key


def loop_ratios(results: list[ScaleResult]) -> list[str]:
    """For each setup and N run with both loops: uvloop's median lateness p50, p99 and wall time over the default's."""
    lines = []
    by_key = _by_setup_and_size(results)
    for (setup, devices), group in by_key.items():
        if setup.loop != "uvloop":
            continue
        default = by_key.get((dataclasses.replace(setup, loop="default"), devices))
        if not default:
            continue
        ratios = [_median_ratio([getattr(r, name) for r in group], [getattr(r, name) for r in default])
                  for name in ("lateness_p50_ms", "lateness_p99_ms", "wall_s")]
        lines.append(f"uvloop / default loop, {setup.broker}, {setup.workers} worker(s), N={devices}: lateness p50 "
                     f"{_cell(ratios[0], '.2f')}, p99 {_cell(ratios[1], '.2f')}, wall {_cell(ratios[2], '.2f')} "
                     f"(medians of {len(group)} and {len(default)} runs)")
    return lines


def goal_medians(results: list[ScaleResult]) -> list[str]:
    """For each setup and N run more than once: the medians over its runs (each run's figures in brackets) of lateness
    p99 and p50 delivery / floor, each against its goal (timings are noisy; a goal is judged on the median of repeats)."""
    lines = []
    by_key = _by_setup_and_size(results)
    for (setup, devices), group in by_key.items():
        if len(group) < 2:
            continue
        verdicts = []
        for name, label, goal, pattern in (("lateness_p99_ms", "lateness p99", GOAL_LATENESS_P99_MS, ".1f"),
                                           ("p50_delivery_over_floor", "p50 delivery / floor",
                                            GOAL_DELIVERY_OVER_FLOOR, ".2f")):
            values = [getattr(result, name) for result in group]
            if any(value is None for value in values):
                verdicts.append(f"{label}: not measured in every run")
                continue
            median = statistics.median(values)
            verdicts.append(f"{label} {median:{pattern}} ({', '.join(format(v, pattern) for v in values)}) "
                            f"{'≤' if median <= goal else '>'} {goal:g}: {'met' if median <= goal else 'MISSED'}")
        converged = sum(result.converged for result in group)
        lines.append(f"median of {len(group)} runs, {setup.label}, N={devices}: {'; '.join(verdicts)}; "
                     f"converged {converged} of {len(group)}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,300,1000", help="fleet sizes to try, in order (default %(default)s)")
    parser.add_argument("--brokers", default="embedded", help="comma-separated: embedded, mosquitto")
    parser.add_argument("--workers", default="1", help="comma-separated worker process counts (default %(default)s)")
    parser.add_argument("--loops", default="auto",
                        help="comma-separated event loops: auto (the testbed's: asyncio's for the run, uvloop for "
                             "its workers where installed), default (asyncio's everywhere), uvloop (everywhere)")
    parser.add_argument("--rate", default=DEFAULT_RATE, help="both links' rate (default %(default)s)")
    parser.add_argument("--delay", default=DEFAULT_DELAY, help="both links' delay (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each setup and size (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a run counts as failed")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--keep", default=None, metavar="DIR", help="keep each run's summary, results and console")
    args = parser.parse_args(argv)
    try:
        sizes = [int(size) for size in args.sizes.split(",")]
        workers = [int(count) for count in args.workers.split(",")]
        parse_quantity(args.rate), parse_quantity(args.delay)
    except ValueError as error:
        parser.error(str(error))
    loops = args.loops.split(",")
    if not set(loops) <= {"auto", "default", "uvloop"}:
        parser.error(f"--loops {args.loops!r}: each must be auto, default or uvloop")
    setups = [ScaleSetup(broker, count, loop, args.rate, args.delay)
              for broker in args.brokers.split(",") for count in workers for loop in loops]
    results: list[ScaleResult] = []
    failed: set[ScaleSetup] = set()
    for repeat in range(args.repeats):
        for devices in sizes:
            for setup in setups:  # interleaved, so the machine's load falls on every setup alike
                if setup in failed:
                    continue  # larger fleets of a setup that failed would fail too
                print(f"scale: {devices} devices, {setup.label} (run {repeat + 1}) ...", file=sys.stderr, flush=True)
                keep = None if args.keep is None else Path(args.keep) / (
                    f"{setup.broker}-w{setup.workers}-{setup.loop}-n{devices}-r{repeat + 1}")
                result = run_once(devices, setup, args.rounds, args.timeout, keep)
                results.append(result)
                print(table(results).splitlines()[-1], file=sys.stderr, flush=True)
                if not result.converged:
                    failed.add(setup)
    print(f"Fleet scale on {os.cpu_count()} cores: {args.rounds} rounds, N × rpi4 on {args.rate} {args.delay} links "
          f"(python bench/scale.py {' '.join(argv if argv is not None else sys.argv[1:])})")
    print(f"Goals (issue 13): lateness p99 ≤ {GOAL_LATENESS_P99_MS:g} ms; p50 delivery ≤ "
          f"{GOAL_DELIVERY_OVER_FLOOR:.2f} × the link floor; RSS ≤ {GOAL_RSS_PER_DEVICE_MIB} MiB per device; every "
          f"device on the server's final hash. Per-device RSS and CPU are marginal over the smallest fleet of the same "
          f"setup; RSS sums the run's process and its children (workers, Mosquitto).")
    print(table(results))
    for line in loop_ratios(results) + goal_medians(results):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps([dict(vars(r), setup=dataclasses.asdict(r.setup)) for r in results],
                                              indent=2))
    return 0 if all(result.converged for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
