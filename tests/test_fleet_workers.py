"""Fleet workers: selectors and shares, the `fleet` section's checks, a run's results the same with 1 or 2 workers,
link reports reaching the run's metrics, and no worker left behind when the run ends, fails or is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from testbed.core.fleet_plan import SelectorError, select_devices, worker_count, worker_shares
from testbed.core.scenario import ScenarioError, parse_scenario
from testbed.runner import ScenarioRun

REPO = Path(__file__).resolve().parents[1]
SMALL: dict[str, Any] = {
    "name": "fleet-small", "seed": 5, "rounds": 2, "round_timeout": "120s",
    "data": {"dataset": "digits", "initial_samples": 200, "new_samples_per_round": 80, "validation_samples": 100,
             "test_samples": 200, "device_test_samples": 100},
    "model": {"kind": "mlp", "hidden": [16]},
    "update": {"strategy": "dpu", "ratio": 0.1, "epochs": 2, "chunk_size": "1KiB"},
    "channel": {"downlink": {"rate": "500kbit", "delay": "20ms"}, "uplink": {"rate": "500kbit", "delay": "20ms"},
                "cells": [{"name": "cell-a", "devices": ["rpi4-2", "rpi4-3"]}]},
    "devices": [{"profile": "rpi4", "count": 4}, {"profile": "jetson-nano", "count": 2}],
    "metrics": {"port": 0},
}
HOST_DEPENDENT_SUMMARY = ("run_id", "host", "timing")
HOST_DEPENDENT_ROUND = ("training_seconds", "round_seconds", "timing")
HOST_DEPENDENT_RECORD = ("run", "delivery_seconds", "timing_faithful")


# --- selectors, the auto rule, shares -------------------------------------------------------------------------

DEVICES = [f"rpi4-{index}" for index in range(12)] + ["jetson-nano-0", "board"]


def test_a_selector_takes_ranges_cells_and_names_in_scenario_order() -> None:
    cells = {"cell-a": ["rpi4-10", "rpi4-11"]}
    assert select_devices("board,rpi4-0..2", DEVICES, cells) == ["rpi4-0", "rpi4-1", "rpi4-2", "board"]
    assert select_devices("cell-a, jetson-nano-0", DEVICES, cells) == ["rpi4-10", "rpi4-11", "jetson-nano-0"]
    assert select_devices("rpi4-10..99", DEVICES, cells) == ["rpi4-10", "rpi4-11"]  # the devices the run has


@pytest.mark.parametrize(("selector", "message"), [
    ("pi-0..3", "device selector item 'pi-0..3' selects no device of the run"),
    ("rpi4-5..2", "the range ends before it starts"),
    ("rpi4-0,,rpi4-1", "has an empty item"),
])
def test_a_selector_that_selects_nothing_is_one_line_naming_the_item(selector: str, message: str) -> None:
    with pytest.raises(SelectorError) as raised:
        select_devices(selector, DEVICES, {})
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_auto_is_one_worker_per_core_above_200_emulated_devices_and_in_process_below() -> None:
    assert [worker_count("auto", devices, 4) for devices in (6, 200, 201, 5000)] == [1, 1, 4, 4]
    assert worker_count(3, 10, 1) == 3 and worker_count(8, 2, 1) == 2  # N as given, at most one per device


@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(1, 8))
def test_shares_cover_every_device_in_order_keep_cells_whole_and_are_at_most_the_workers(
        cells: list[int], workers: int) -> None:
    devices = [f"d{index}" for index in range(len(cells))]
    cell_of = {device: f"cell{cell}" for device, cell in zip(devices, cells) if cell}  # 0: a link of its own
    shares = worker_shares(devices, cell_of, workers)
    assert 1 <= len(shares) <= workers and all(shares)
    assert sorted(device for share in shares for device in share) == sorted(devices)
    for cell in set(cell_of.values()):
        assert sum(any(cell_of.get(device) == cell for device in share) for share in shares) == 1


def test_shares_without_cells_are_contiguous_and_even() -> None:
    assert worker_shares(DEVICES[:7], {}, 2) == [DEVICES[:4], DEVICES[4:7]]
    assert [len(share) for share in worker_shares(DEVICES[:12], {}, 3)] == [4, 4, 4]


# --- the fleet section ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("fleet", "extra", "message"), [
    ({"workers": 0}, {}, "fleet.workers: workers must be 'auto' or a number of processes from 1 to 1024"),
    ({"workers": "many"}, {}, "fleet.workers"),
    ({"remote": ["pi-0..3"]}, {}, "fleet.remote.0: device selector item 'pi-0..3' selects no device"),
    ({"workers": 2}, {"events": [{"round": 1, "action": "device_crash", "device": "rpi4-0", "for": "1s"}]},
     "fleet: events act on 'rpi4-0', which a worker process or another host would run"),
    ({"remote": ["cell-a"]}, {"events": [{"at": "10s", "action": "outage", "cell": "cell-a", "for": "1s"}]},
     "fleet: events act on 'rpi4-2'"),
    ({"workers": 2}, {"broker": {"url": "embedded", "username": "srv", "password": "pw",
                                 "device_credentials": "/nonexistent"}},
     "fleet: workers and remote devices connect as the run's identity; broker.device_credentials"),
])
def test_a_fleet_section_that_cannot_be_is_one_line_naming_it(fleet: dict[str, Any], extra: dict[str, Any],
                                                              message: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        parse_scenario({**SMALL, **extra, "fleet": fleet})
    assert message in str(raised.value), str(raised.value)
    assert len(str(raised.value).splitlines()) == 2  # the source line and the one problem


def test_remote_devices_are_what_the_selectors_name_and_auto_keeps_events_in_process() -> None:
    scenario = parse_scenario({**SMALL, "fleet": {"remote": ["cell-a", "jetson-nano-1"]}})
    assert scenario.remote_devices() == ["rpi4-2", "rpi4-3", "jetson-nano-1"]
    parse_scenario({**SMALL, "fleet": {"workers": "auto"},
                    "events": [{"round": 1, "action": "device_crash", "device": "rpi4-0", "for": "1s"}]})  # accepted


# --- whole runs -----------------------------------------------------------------------------------------------

def _comparable_summary(summary: dict[str, Any]) -> dict[str, Any]:
    kept = {key: value for key, value in summary.items() if key not in HOST_DEPENDENT_SUMMARY}
    kept["rounds"] = [{key: value for key, value in record.items() if key not in HOST_DEPENDENT_ROUND}
                      for record in summary["rounds"]]
    kept["devices"] = {device: {key: value for key, value in fields.items() if key != "timing"}
                       for device, fields in summary["devices"].items()}
    return kept


def _comparable_records(path: Path) -> list[dict[str, Any]]:
    return [{key: value for key, value in json.loads(line).items() if key not in HOST_DEPENDENT_RECORD}
            for line in path.read_text().splitlines()]


@pytest.mark.slow
async def test_the_same_seed_gives_the_same_results_with_one_worker_or_two(tmp_path: Path) -> None:
    outcomes = {}
    for workers in (1, 2):
        run = ScenarioRun(parse_scenario({**SMALL, "fleet": {"workers": workers}}), tmp_path / f"w{workers}")
        result = await asyncio.wait_for(run.execute(), 600)
        assert result.summary["server"]["final_version"] == 2
        assert all(device["hash_matches_server"] for device in result.summary["devices"].values())
        outcomes[workers] = (result.summary, run)
    (one, _), (two, run_two) = outcomes[1], outcomes[2]
    assert _comparable_summary(one) == _comparable_summary(two)
    assert (_comparable_records(tmp_path / "w1" / "results.jsonl")
            == _comparable_records(tmp_path / "w2" / "results.jsonl"))
    assert run_two.assembly.worker_shares == [["rpi4-0", "rpi4-1", "rpi4-2", "rpi4-3"], ["jetson-nano-0",
                                                                                         "jetson-nano-1"]]
    # the workers' link reports reached the run: its link metrics and per-device timing count what they carried
    for device in run_two.profiles:
        payload = run_two.metrics.registry.get_sample_value(
            "testbed_link_payload_bytes_total", {"run": run_two.run_id, "device": device, "profile":
                                                 run_two.profiles[device], "direction": "downlink"})
        # the link carried at least the MQTT packets the device counted receiving (and its CONNACK, SUBACKs...)
        assert payload is not None and payload >= two["devices"][device]["bytes_received"] > 0, (device, payload)
        assert two["devices"][device]["timing"]["segments"] > 0
    assert two["timing"]["timed_links"] == 6
    assert all(record["timing"]["segments"] > 0 for record in two["rounds"])  # read after each round's refresh


# --- no worker outlives its run -------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout_s:.0f} s: {what}")


def _start_run(tmp_path: Path, rounds: int) -> tuple[subprocess.Popen[bytes], list[int]]:
    """`testbed run` with 2 workers in a session of its own; returns it once both workers are up, with their pids."""
    scenario = {**SMALL, "rounds": rounds, "round_period": "60s", "fleet": {"workers": 2},
                "data": {**SMALL["data"], "new_samples_per_round": 20}}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    log = open(tmp_path / "run.log", "wb")
    process = subprocess.Popen([sys.executable, "-m", "testbed", "run", str(path), "--out", str(tmp_path / "out")],
                               stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    workers = _wait_for(lambda: len(children := [pid for pid in _children(process.pid)
                                                 if b"fleet" in Path(f"/proc/{pid}/cmdline").read_bytes()]) == 2
                        and children, 300, "two worker processes")
    _wait_for(lambda: (tmp_path / "out" / "results.jsonl").exists()
              and (tmp_path / "out" / "results.jsonl").read_text(), 300,
              "the first round's records (the workers' devices reported)")
    return process, workers


@pytest.mark.slow
def test_ctrl_c_ends_the_run_and_its_workers(tmp_path: Path) -> None:
    process, workers = _start_run(tmp_path, rounds=40)
    os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
    assert process.wait(120) == 130, (tmp_path / "run.log").read_text()
    _wait_for(lambda: not any(_alive(pid) for pid in workers), 30, f"workers {workers} ending")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["interrupted"] is True


@pytest.mark.slow
def test_workers_end_when_the_run_is_killed_and_a_dead_worker_fails_the_run(tmp_path: Path) -> None:
    process, workers = _start_run(tmp_path / "killed", rounds=40)
    os.kill(process.pid, signal.SIGKILL)  # no cleanup at all: the workers' parent-death signal ends them
    process.wait(30)
    _wait_for(lambda: not any(_alive(pid) for pid in workers), 30, f"workers {workers} ending after SIGKILL")
    process, workers = _start_run(tmp_path / "failed", rounds=40)
    os.kill(workers[0], signal.SIGKILL)
    code = process.wait(300)
    output = (tmp_path / "failed" / "run.log").read_text()
    assert code == 1 and "fleet worker" in output and "exited with code -9" in output, output
    _wait_for(lambda: not any(_alive(pid) for pid in workers), 30, f"the other worker of {workers} ending")


# --- testbed fleet's arguments and the console ----------------------------------------------------------------

@pytest.mark.parametrize(("arguments", "message"), [
    (["--broker", "nowhere", "--devices", "rpi4-0"],
     "testbed fleet: error: --broker: expected HOST:PORT, got 'nowhere'"),
    (["--broker", "127.0.0.1:1", "--devices", "rpi4-0", "--username", "u", "--password-file", "/nonexistent"],
     "testbed fleet: error: --password-file: cannot read a password from '/nonexistent': No such file or directory"),
])
def test_bad_fleet_arguments_are_one_line_each(arguments: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, "-m", "testbed", "fleet", *arguments], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == message, done.stderr


async def test_no_run_with_the_selected_devices_on_the_broker_is_one_line_naming_them() -> None:
    from devices.errors import DeviceError
    from testbed.broker import EmbeddedBroker
    from testbed.core.mqtt import MqttEndpoint
    from testbed.fleet_commands import find_fleet_run

    async with EmbeddedBroker() as broker:
        with pytest.raises(DeviceError) as raised:
            await asyncio.wait_for(find_fleet_run(MqttEndpoint(broker.host, broker.port), "rpi4-0..9", None,
                                                  wait_s=1.0), 30)
    assert str(raised.value) == ("no config of any run with devices 'rpi4-0..9' on the broker within 1 s; start "
                                 "`testbed run` first and check --broker")


def test_the_console_prints_the_fleet_command_for_remote_devices(tmp_path: Path) -> None:
    from rich.console import Console

    from testbed.cli import _RichProgress

    output = tmp_path / "console.txt"
    with open(output, "w") as handle:
        _RichProgress(Console(file=handle, soft_wrap=True, width=60))(
            "waiting-for-fleet", {"devices": "rpi4-0..99", "run_id": "run-1"})
    assert output.read_text().splitlines() == [
        "waiting for devices rpi4-0..99: on the host that runs them, run",
        "  testbed fleet --broker HOST:PORT --run run-1 --devices rpi4-0..99"]
