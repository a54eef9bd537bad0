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


async def test_a_device_that_leaves_does_not_hold_the_round_and_catches_up_when_it_joins(tmp_path: Path) -> None:
    # rpi4-0 is gone for round 1 and joins as round 2 begins; the round does not wait its 60 s round_timeout for it
    scenario = fault_scenario([{"round": 1, "action": "device_leave", "device": "rpi4-0"},
                               {"round": 2, "action": "device_join", "device": "rpi4-0"}])
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults, away={(1, "rpi4-0")})
    assert not faults.event_warnings()
    assert [device_id for device_id, _ in faults.downtime.interrupted] == ["rpi4-0"]
    assert not faults.downtime.away and not faults.downtime.down
    assert faults.result.summary["rounds"][1]["round_seconds"] < scenario.round_timeout_s
    catch_ups = [(data["round"], data["from"]) for data in faults.said("catch-up") if data["device"] == "rpi4-0"]
    assert catch_ups and catch_ups[0] == (2, 1)  # from the version it left with to the deployed one


async def test_a_device_crashed_past_the_round_does_not_hold_it(tmp_path: Path) -> None:
    # rpi4-0's reboot is due 120 s after round 1 begins, after the 20 s deadline of rounds 1 and 2: neither waits
    # for it (a crash it comes back from within the round is waited for: tests/testbed/test_event_actions.py)
    scenario = fault_scenario([{"round": 1, "action": "device_crash", "device": "rpi4-0", "for": "120s"}],
                              overrides=["round_timeout=20s"])
    faults = await run_faults(scenario, tmp_path / "out")
    assert not faults.event_warnings()
    rounds = faults.result.summary["rounds"]
    assert [record["round_seconds"] < scenario.round_timeout_s for record in rounds] == [True] * 3
    delivered = {(record["round"], record["device"]): record["delivered"] for record in faults.records()}
    assert delivered == {(round_index, device_id): (round_index, device_id) not in {(1, "rpi4-0"), (2, "rpi4-0")}
                         for round_index in range(3) for device_id in faults.result.summary["devices"]}
