"""Devices that crash while applying an update, and devices that leave the run and join it again."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.matrix import DEVICES, FAST_LINK, assert_survived, fault_scenario, run_faults

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_devices_crashed_mid_apply_reboot_and_report_once(tmp_path: Path) -> None:
    # A report takes about 1 s on a 10 kbit/s uplink: when the run has round 1's first report, the devices are
    # between receiving and the acknowledgement of their report (the swap itself is one synchronous step)
    scenario = fault_scenario([{"round": 1, "phase": "report", "action": "device_crash", "all": True, "for": "1s"}],
                              channel={"downlink": FAST_LINK, "uplink": {"rate": "10kbit", "delay": "20ms"}})
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    interrupted = dict(faults.downtime.interrupted)
    assert sorted(interrupted) == [f"rpi4-{index}" for index in range(DEVICES)]
    assert "update applied, its report not acknowledged yet" in interrupted.values(), interrupted
    assert all(agent.reconnects >= 1 for agent in faults.agents().values())  # each is a rebooted agent


async def test_a_device_that_leaves_misses_a_round_and_catches_up_when_it_joins(tmp_path: Path) -> None:
    # rpi4-0 is gone for round 1 (the round waits its round_timeout for it) and joins as round 2 begins
    scenario = fault_scenario([{"round": 1, "action": "device_leave", "device": "rpi4-0"},
                               {"round": 2, "action": "device_join", "device": "rpi4-0"}],
                              overrides=["round_timeout=12s"])
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults, away={(1, "rpi4-0")})
    assert not faults.event_warnings()
    assert [device_id for device_id, _ in faults.downtime.interrupted] == ["rpi4-0"]
    assert not faults.downtime.away and not faults.downtime.down
    catch_ups = [(data["round"], data["from"]) for data in faults.said("catch-up") if data["device"] == "rpi4-0"]
    assert catch_ups and catch_ups[0] == (2, 1)  # from the version it left with to the deployed one
