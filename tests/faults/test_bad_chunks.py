"""Chunks corrupted, duplicated or reordered between the channel and the device: corrupted ones are refused by their
digest and repaired by a catch-up, duplicates change nothing, a shuffled order is put right."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.matrix import DEVICES, assert_survived, fault_scenario, run_faults

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_corrupted_chunks_are_refused_by_digest_and_repaired(tmp_path: Path) -> None:
    # round 1's update is 4 chunks of 256 B: the first 3 reach rpi4-0 with 2 bits flipped each
    faults = await run_faults(fault_scenario([{"round": 1, "action": "corrupt", "device": "rpi4-0", "chunks": 3,
                                               "bits": 2}]), tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    agents = faults.agents()
    assert agents["rpi4-0"].chunk_faults.corrupted == 3 and agents["rpi4-0"].damage.repairs_asked == 1
    devices = faults.result.summary["devices"]
    assert devices["rpi4-0"]["rejected_by_reason"] == {"bad_chunk": 3}
    assert all(devices[device_id]["rejected_by_reason"] == {} for device_id in ("rpi4-1", "rpi4-2"))
    repairs = [data for data in faults.said("catch-up") if data["device"] == "rpi4-0"]
    assert [(data["round"], data["from"]) for data in repairs] == [(1, 1)] and "digest" in repairs[0]["reason"]


async def test_a_damaged_repair_is_asked_for_again_and_repaired_within_the_round(tmp_path: Path) -> None:
    # 6 chunks corrupted: round 1's 4 and the first 2 of the catch-up that repairs them, so rpi4-0 asks again on
    # the same connection from the same version (its second repair), and ends on round 1's version in round 1
    faults = await run_faults(fault_scenario([{"round": 1, "action": "corrupt", "device": "rpi4-0", "chunks": 6}]),
                              tmp_path / "out")
    assert_survived(faults)  # rpi4-0 delivered in round 1, on the server's hash
    assert not faults.event_warnings()
    agent = faults.agents()["rpi4-0"]
    assert agent.chunk_faults.corrupted == 6 and agent.damage.repairs_asked == 2 and agent.reconnects == 0
    assert faults.result.summary["devices"]["rpi4-0"]["rejected_by_reason"] == {"bad_chunk": 6}
    repairs = [(data["round"], data["from"]) for data in faults.said("catch-up") if data["device"] == "rpi4-0"]
    assert repairs == [(1, 1), (1, 1)]


async def test_duplicated_chunks_are_taken_once(tmp_path: Path) -> None:
    # every chunk of round 0 (4) and the first 2 of round 1 reach every device twice
    faults = await run_faults(fault_scenario([{"round": 0, "action": "duplicate", "all": True, "chunks": 6}]),
                              tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    assert [agent.chunk_faults.duplicated for agent in faults.agents().values()] == [6] * DEVICES
    assert all(state["rejected_by_reason"] == {} for state in faults.result.summary["devices"].values())
    assert not faults.said("catch-up")  # nothing was missing, nothing refused


async def test_reordered_chunks_are_put_in_order(tmp_path: Path) -> None:
    # a group of 6 on rpi4-2: round 1's 4 chunks are held until the hold time (1 s) says the rest is not coming,
    # then delivered shuffled; round 2's first 2 complete the group
    faults = await run_faults(fault_scenario([{"round": 1, "action": "reorder", "device": "rpi4-2", "chunks": 6}]),
                              tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    assert faults.agents()["rpi4-2"].chunk_faults.reordered == 6
    assert all(state["rejected_by_reason"] == {} for state in faults.result.summary["devices"].values())
    assert not faults.said("catch-up")
    held = next(record for record in faults.records() if (record["round"], record["device"]) == (1, "rpi4-2"))
    assert held["delivery_seconds"] >= 1.0  # the chunks waited out the hold time
