"""The events a run performs: a broker restart (embedded broker) and device crashes, each in the middle of a
transfer; every device still ends on the server's final weights, with one results record per device and round."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from testbed.core.scenario import parse_scenario
from testbed.events import read_events
from testbed.run_summary import RunResult
from testbed.runner import ScenarioRun

pytestmark = pytest.mark.timeout(300)

DEVICES = 3
ROUNDS = 3


def fault_scenario(events: list[dict[str, Any]], broker: str = "embedded", rounds: int = ROUNDS,
                   reset_after: str = "10s") -> Any:
    return parse_scenario({
        "name": "fault", "seed": 6, "rounds": rounds, "round_timeout": "90s",
        "data": {"initial_samples": 200, "new_samples_per_round": 60},
        "update": {"epochs": 2, "ratio": 0.1}, "model": {"hidden": [16]},
        "devices": [{"profile": "rpi4", "count": DEVICES}],
        # round 0's snapshot (about 5 kB) takes about 2 s at 20 kbit/s: events 0.5 s into it hit a transfer
        "channel": {"downlink": {"rate": "20kbit", "delay": "50ms"}, "reset_after": reset_after},
        "broker": broker, "metrics": {"enabled": False}, "events": events,
    })


async def run(scenario: Any, out: Path) -> tuple[RunResult, list[tuple[str, dict[str, Any]]]]:
    progress: list[tuple[str, dict[str, Any]]] = []
    result = await asyncio.wait_for(
        ScenarioRun(scenario, out, lambda event, data: progress.append((event, data))).execute(), 240)
    return result, progress


def assert_converged(result: RunResult, out: Path, rounds: int = ROUNDS) -> None:
    summary = result.summary
    assert len(summary["rounds"]) == rounds
    for device_id, state in summary["devices"].items():
        assert (state["final_version"], state["hash_matches_server"]) == (summary["server"]["final_version"], True), \
            device_id
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((record["round"], record["device"]) for record in records) == sorted(
        (round_index, device_id) for round_index in range(rounds) for device_id in summary["devices"])


async def test_the_embedded_broker_restarted_mid_transfer_does_not_end_the_run(tmp_path: Path) -> None:
    scenario = fault_scenario([{"round": 0, "phase": "delivery", "after": "500ms", "action": "broker_restart",
                                "for": "2s"}])
    result, progress = await run(scenario, tmp_path / "out")
    assert any(event == "broker-reconnected" for event, _ in progress)
    assert not [data for event, data in progress if event == "warning"]
    records = read_events(tmp_path / "out")
    assert [(record["action"], record["kind"], record["round"]) for record in records] == [
        ("broker_restart", "fire", 0), ("broker_restart", "end", 0)]
    assert records[1]["t"] - records[0]["t"] >= 2.0
    assert_converged(result, tmp_path / "out")


async def test_an_external_broker_is_not_restarted_and_the_run_says_so(mosquitto: tuple[str, int],
                                                                         tmp_path: Path) -> None:
    host, port = mosquitto
    scenario = fault_scenario([{"round": 0, "action": "broker_restart", "for": "1s"}],
                              broker=f"mqtt://{host}:{port}", rounds=1)
    result, progress = await run(scenario, tmp_path / "out")
    warnings = [data["message"] for event, data in progress if event == "warning"]
    assert len(warnings) == 1 and "cannot be restarted by the testbed" in warnings[0]
    assert [record["kind"] for record in read_events(tmp_path / "out")] == ["fire", "end"]
    assert_converged(result, tmp_path / "out", rounds=1)


async def test_devices_crashed_mid_transfer_reboot_from_their_saved_state_and_catch_up(tmp_path: Path) -> None:
    scenario = fault_scenario([
        # rpi4-0 dies in the middle of round 0's snapshot and reboots 2 s later, holding version 0
        {"round": 0, "phase": "delivery", "after": "500ms", "action": "device_crash", "device": "rpi4-0",
         "for": "2s"},
        # every device dies as round 1's reports come in, and reboots at once
        {"round": 1, "phase": "report", "action": "device_crash", "all": True},
    ])
    result, progress = await run(scenario, tmp_path / "out")
    assert not [data for event, data in progress if event == "warning"]
    catch_ups = [data for event, data in progress if event == "catch-up"]
    assert any(data["device"] == "rpi4-0" and data["round"] == 0 and "reconnected" in data["reason"]
               for data in catch_ups)
    records = read_events(tmp_path / "out")
    assert [(record["index"], record["kind"]) for record in records] == [(0, "fire"), (0, "end"), (1, "fire")]
    assert_converged(result, tmp_path / "out")


async def test_an_outage_longer_than_reset_after_resets_the_link_and_the_device_catches_up(tmp_path: Path) -> None:
    scenario = fault_scenario([{"round": 0, "phase": "delivery", "after": "300ms", "action": "outage",
                                "device": "rpi4-1", "for": "3s"}], reset_after="1s")
    progress: list[tuple[str, dict[str, Any]]] = []
    run_ = ScenarioRun(scenario, tmp_path / "out", lambda event, data: progress.append((event, data)))
    result = await asyncio.wait_for(run_.execute(), 240)
    assert not [data for event, data in progress if event == "warning"]
    assert run_.assembly.device_links["rpi4-1"].outage_resets >= 1
    assert run_.assembly.device_links["rpi4-0"].outage_resets == 0
    assert any(data["device"] == "rpi4-1" and "reconnected" in data["reason"]
               for event, data in progress if event == "catch-up")
    assert_converged(result, tmp_path / "out")


async def test_link_changes_apply_to_the_targets_and_come_back_after_their_for(tmp_path: Path) -> None:
    scenario = fault_scenario([
        {"round": 0, "action": "link", "device": "rpi4-0", "direction": "downlink", "set": {"rate": "200kbit"}},
        {"round": 0, "phase": "delivery", "action": "link", "device": "rpi4-1", "set": {"delay": "300ms",
                                                                                        "loss": "2%"}, "for": "1s"},
    ])
    progress: list[tuple[str, dict[str, Any]]] = []
    run_ = ScenarioRun(scenario, tmp_path / "out", lambda event, data: progress.append((event, data)))
    result = await asyncio.wait_for(run_.execute(), 240)
    assert not [data for event, data in progress if event == "warning"]
    links = run_.assembly.device_links
    assert links["rpi4-0"].downlink.rate_bps == 200_000 and links["rpi4-0"].uplink.rate_bps is None
    assert links["rpi4-1"].downlink.delay_s == 0.05 and links["rpi4-1"].downlink.loss == 0.0  # back after 1 s
    assert links["rpi4-2"].downlink.rate_bps == 20_000
    assert [(record["index"], record["kind"]) for record in read_events(tmp_path / "out")] == [
        (0, "fire"), (1, "fire"), (1, "end")]
    assert_converged(result, tmp_path / "out")


async def test_a_partitioned_device_is_cut_off_then_reconnects_and_catches_up(tmp_path: Path) -> None:
    scenario = fault_scenario([{"round": 0, "phase": "delivery", "after": "300ms", "action": "partition",
                                "device": "rpi4-2", "for": "3s"}])
    progress: list[tuple[str, dict[str, Any]]] = []
    run_ = ScenarioRun(scenario, tmp_path / "out", lambda event, data: progress.append((event, data)))
    result = await asyncio.wait_for(run_.execute(), 240)
    assert not [data for event, data in progress if event == "warning"]
    links = run_.assembly.device_links
    assert links["rpi4-2"].partitions == 1 and links["rpi4-0"].partitions == 0
    assert links["rpi4-2"].refused_during_outage >= 1  # it tried to come back while cut off
    assert any(data["device"] == "rpi4-2" and "reconnected" in data["reason"]
               for event, data in progress if event == "catch-up")
    assert_converged(result, tmp_path / "out")
