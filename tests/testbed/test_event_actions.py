"""The events a run performs beyond the fault matrix (tests/faults): an external broker that is not restarted, a
device crashed mid-transfer, link changes and a partition of both directions; every device still ends on the
server's final weights, with one results record per device and round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from testbed.events import read_events
from tests.faults.matrix import assert_survived, fault_scenario, run_faults

pytestmark = pytest.mark.timeout(300)

# An update (about 800 B in 256 B chunks) and its manifest (about 1 kB): what does not fit the token bucket's
# one-packet burst (about 300 B) takes 0.1 s or more at 20 kbit/s, 0.3 s at 8 kbit/s.
SLOW_DOWNLINK = {"downlink": {"rate": "20kbit", "delay": "50ms"}, "reset_after": "10s"}


def slow_scenario(events: list[dict[str, Any]], *overrides: str) -> Any:
    return fault_scenario(events, overrides, channel=SLOW_DOWNLINK)


async def test_an_external_broker_is_not_restarted_and_the_run_says_so(mosquitto: tuple[str, int],
                                                                         tmp_path: Path) -> None:
    host, port = mosquitto
    faults = await run_faults(slow_scenario([{"round": 0, "action": "broker_restart", "for": "1s"}],
                                            f"broker=mqtt://{host}:{port}", "rounds=1"), tmp_path / "out")
    warnings = faults.event_warnings()
    assert len(warnings) == 1 and "cannot be restarted by the testbed" in warnings[0]
    assert [record["kind"] for record in read_events(faults.out)] == ["fire", "end"]
    assert_survived(faults)


async def test_devices_crashed_mid_transfer_reboot_from_their_saved_state_and_catch_up(tmp_path: Path) -> None:
    faults = await run_faults(slow_scenario([
        # rpi4-0 dies 100 ms into round 0's update (at 8 kbit/s it needs 0.35 s or more) and reboots 2 s later,
        # holding version 0
        {"round": 0, "after": "100ms", "action": "device_crash", "device": "rpi4-0", "for": "2s"},
        # every device dies as round 1's reports come in, and reboots at once
        {"round": 1, "phase": "report", "action": "device_crash", "all": True},
    ], "channel.downlink.rate=8kbit"), tmp_path / "out")
    assert not faults.event_warnings()
    assert any((data["device"], data["round"], data["from"]) == ("rpi4-0", 0, 0) and "reconnected" in data["reason"]
               for data in faults.said("catch-up"))
    records = read_events(faults.out)
    assert [(record["index"], record["kind"]) for record in records] == [(0, "fire"), (0, "end"), (1, "fire")]
    assert_survived(faults)


async def test_link_changes_apply_to_the_targets_and_come_back_after_their_for(tmp_path: Path) -> None:
    faults = await run_faults(slow_scenario([
        {"round": 0, "action": "link", "device": "rpi4-0", "direction": "downlink", "set": {"rate": "200kbit"}},
        {"round": 0, "phase": "delivery", "action": "link", "device": "rpi4-1", "set": {"delay": "300ms",
                                                                                        "loss": "2%"}, "for": "1s"},
    ]), tmp_path / "out")
    assert not faults.event_warnings()
    links = faults.run.assembly.device_links
    assert links["rpi4-0"].downlink.rate_bps == 200_000 and links["rpi4-0"].uplink.rate_bps is None
    assert links["rpi4-1"].downlink.delay_s == 0.05 and links["rpi4-1"].downlink.loss == 0.0  # back after 1 s
    assert links["rpi4-2"].downlink.rate_bps == 20_000
    assert [(record["index"], record["kind"]) for record in read_events(faults.out)] == [
        (0, "fire"), (1, "fire"), (1, "end")]
    assert_survived(faults)


async def test_a_partitioned_device_is_cut_off_then_reconnects_and_catches_up(tmp_path: Path) -> None:
    faults = await run_faults(slow_scenario([{"round": 0, "phase": "delivery", "after": "300ms",
                                              "action": "partition", "device": "rpi4-2", "for": "3s"}]),
                              tmp_path / "out")
    assert not faults.event_warnings()
    links = faults.run.assembly.device_links
    assert links["rpi4-2"].partitions == 1 and links["rpi4-0"].partitions == 0
    assert links["rpi4-2"].refused_during_outage >= 1  # it tried to come back while cut off
    assert any(data["device"] == "rpi4-2" and "reconnected" in data["reason"] for data in faults.said("catch-up"))
    assert_survived(faults)


async def test_a_cell_is_partitioned_device_by_device_and_a_one_way_cut_takes_its_shared_link_down(
        tmp_path: Path) -> None:
    channel = {**SLOW_DOWNLINK, "cells": [{"name": "tower", "devices": ["rpi4-1", "rpi4-2"]}]}
    faults = await run_faults(fault_scenario([
        {"round": 0, "phase": "delivery", "after": "300ms", "action": "partition", "cell": "tower", "for": "2s"},
        {"round": 1, "action": "partition", "cell": "tower", "direction": "uplink", "for": "1s"},
    ], channel=channel), tmp_path / "out")
    links = faults.run.assembly.device_links
    assert [links[device_id].partitions for device_id in ("rpi4-0", "rpi4-1", "rpi4-2")] == [0, 1, 1]
    assert not faults.event_warnings()
    assert faults.result.summary["rounds"][1]["round_seconds"] >= 1.0 - 0.01  # the cell's reports waited for the cut
    assert_survived(faults)
