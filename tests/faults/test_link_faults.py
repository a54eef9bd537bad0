"""Links that degrade for two rounds, go down for longer than reset_after, or carry one direction only; the same on a
cell's shared link, and one device of a cell cut while the other goes on."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.events import read_events
from tests.faults.matrix import FAST_LINK, FaultRun, assert_survived, fault_scenario, run_faults

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def record(faults, round_index: int, device_id: str) -> dict:  # type: ignore[no-untyped-def]
    return next(record for record in faults.records() if (record["round"], record["device"]) == (round_index,
                                                                                                   device_id))


async def test_a_link_degraded_for_two_rounds_slows_them_and_comes_back(tmp_path: Path) -> None:
    degraded = {"rate": "16kbit", "delay": "300ms", "gilbert_elliott": {"p": "2%", "r": "30%"}}
    scenario = fault_scenario([
        {"round": 1, "action": "link", "device": "rpi4-0", "direction": "downlink", "set": degraded},
        {"round": 3, "action": "link", "device": "rpi4-0", "direction": "downlink",
         "set": {"rate": "200kbit", "delay": "20ms", "loss": "0%"}},
    ], overrides=["rounds=4"])
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    for round_index in (1, 2):  # no sooner than the 300 ms delay (its bytes fit about one token-bucket burst)
        assert record(faults, round_index, "rpi4-0")["delivery_seconds"] >= 0.3
    link = faults.run.assembly.device_links["rpi4-0"]
    assert (link.downlink.rate_bps, link.downlink.delay_s, link.downlink.loss_model) == (200_000, 0.02, None)


async def test_an_outage_longer_than_reset_after_resets_the_link_and_the_device_catches_up(tmp_path: Path) -> None:
    scenario = fault_scenario([{"round": 1, "action": "outage", "device": "rpi4-1", "for": "5s"}],
                              overrides=["channel.reset_after=2s"])
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    links = faults.run.assembly.device_links
    assert links["rpi4-1"].outage_resets >= 1 and links["rpi4-0"].outage_resets == 0
    assert any(data["device"] == "rpi4-1" and data["round"] == 1 and "reconnected" in data["reason"]
               for data in faults.said("catch-up"))
    # the outage began after round 1 started and carried nothing for 5 s: rpi4-1's report came after it
    assert faults.result.summary["rounds"][1]["round_seconds"] >= 5.0 - 0.01


async def test_a_partition_of_one_direction_carries_the_other(tmp_path: Path) -> None:
    # rpi4-1 hears the update but cannot answer for 3 s; rpi4-2 can answer but hears nothing for 3 s
    scenario = fault_scenario([
        {"round": 1, "action": "partition", "device": "rpi4-1", "direction": "uplink", "for": "3s"},
        {"round": 1, "action": "partition", "device": "rpi4-2", "direction": "downlink", "for": "3s"},
    ], channel={"downlink": FAST_LINK, "uplink": FAST_LINK, "reset_after": "10s"})
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    links = faults.run.assembly.device_links
    assert [links[device_id].connections_accepted for device_id in ("rpi4-0", "rpi4-1", "rpi4-2")] == [1, 1, 1]
    assert record(faults, 1, "rpi4-1")["delivery_seconds"] < 3.0  # received while its uplink was cut
    assert faults.result.summary["rounds"][1]["round_seconds"] >= 3.0 - 0.01  # its report waited for the end
    assert record(faults, 1, "rpi4-2")["delivery_seconds"] >= 3.0 - 0.01  # nothing reached it meanwhile


def cell_channel(reset_after: str) -> dict:  # type: ignore[type-arg]
    """rpi4-0 and rpi4-1 share cell `tower` (one bottleneck each way, FAST_LINK); rpi4-2 has a link of its own."""
    return {"downlink": FAST_LINK, "uplink": FAST_LINK, "reset_after": reset_after,
            "cells": [{"name": "tower", "devices": ["rpi4-0", "rpi4-1"]}]}


async def cell_outage(tmp_path: Path, target: dict[str, str]) -> tuple[FaultRun, list[bool]]:
    """A 5 s round-1 outage of `target` in the cell's scenario (`reset_after: 2s`), survived with no warning;
    the run, and whether each device's link reset its connections."""
    scenario = fault_scenario([{"round": 1, "action": "outage", **target, "for": "5s"}], channel=cell_channel("2s"))
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    assert faults.result.summary["rounds"][1]["round_seconds"] >= 5.0 - 0.01
    links = faults.run.assembly.device_links
    return faults, [links[device_id].outage_resets >= 1 for device_id in ("rpi4-0", "rpi4-1", "rpi4-2")]


async def test_a_cell_outage_longer_than_reset_after_takes_its_shared_link_down_once(tmp_path: Path) -> None:
    faults, resets = await cell_outage(tmp_path, {"cell": "tower"})
    links = faults.run.assembly.device_links
    shared = links["rpi4-0"].downlink_model.shared
    assert links["rpi4-1"].downlink_model.shared is shared  # one bottleneck, taken down once for both members
    assert resets == [True, True, False]
    for device_id in ("rpi4-0", "rpi4-1"):
        assert any(data["device"] == device_id and data["round"] == 1 and "reconnected" in data["reason"]
                   for data in faults.said("catch-up")), device_id


async def test_an_outage_of_one_device_in_a_cell_cuts_its_flow_while_the_other_goes_on(tmp_path: Path) -> None:
    faults, resets = await cell_outage(tmp_path, {"device": "rpi4-1"})
    assert resets == [False, True, False]
    links = faults.run.assembly.device_links
    # round 1's update met the cut on rpi4-1's flow only: rpi4-0's went through the same bottleneck untouched
    assert links["rpi4-1"].downlink_counters.outage_losses >= 1 and links["rpi4-0"].downlink_counters.outage_losses == 0


async def test_a_cell_link_change_for_a_while_slows_both_members_and_comes_back_exactly(tmp_path: Path) -> None:
    degraded = {"rate": "16kbit", "delay": "300ms", "loss": "2%"}
    scenario = fault_scenario([{"round": 1, "action": "link", "cell": "tower", "direction": "downlink",
                                "set": degraded, "for": "3s"}], channel=cell_channel("10s"))
    faults = await run_faults(scenario, tmp_path / "out")
    links = faults.run.assembly.device_links
    before = links["rpi4-0"].downlink  # the cell's downlink as the run left it: back after the 3 s
    assert_survived(faults)
    assert not faults.event_warnings()
    for device_id in ("rpi4-0", "rpi4-1"):  # no sooner than the 300 ms delay
        assert record(faults, 1, device_id)["delivery_seconds"] >= 0.3, device_id
    assert [record["kind"] for record in read_events(faults.out)] == ["fire", "end"]
    assert (before.rate_bps, before.delay_s, before.loss) == (200_000, 0.02, 0.0)
    assert links["rpi4-1"].downlink is before and links["rpi4-2"].downlink.rate_bps == 200_000
