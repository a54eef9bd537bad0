"""Link events on a cell (testbed.event_actions): a `cell:` or `all` target changes the cell's shared link once, a
`device:` in a cell cuts that device's flow only, and `for:` puts the shared link's parameters back exactly."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from channel.proxy import LinkProxy
from channel.shared import SharedFlow
from testbed.event_actions import LinkChanges, Outages, Partitions
from testbed.events import FiredEvent
from testbed.links import DeviceLinks
from testbed.metrics import RunMetrics
from testbed.run_events import RunEvents
from tests.faults.matrix import FAST_LINK, fault_scenario

CHANNEL = {"downlink": FAST_LINK, "uplink": FAST_LINK, "reset_after": "2s",
           "cells": [{"name": "tower", "devices": ["rpi4-0", "rpi4-1"]}]}


def fired(scenario: Any, index: int, kind: str = "fire") -> FiredEvent:
    return FiredEvent(index, scenario.events[index], kind, 0.0, 0.0, 1, "publish")  # type: ignore[arg-type]


async def run_events(tmp_path: Path, events: list[dict[str, Any]]) -> tuple[Any, RunEvents, dict[str, LinkProxy]]:
    scenario = fault_scenario(events, channel=CHANNEL)
    links = DeviceLinks(scenario.channel, scenario.seed)
    device_links = {device_id: links.open(device_id, ("127.0.0.1", 1), seed=index)
                    for index, device_id in enumerate(scenario.device_ids())}
    warnings: list[dict[str, Any]] = []
    run = RunEvents(scenario, tmp_path, RunMetrics("cells", "dpu"), lambda kind, data: warnings.append(data))
    return scenario, run, device_links


async def perform(handler: Any, event: FiredEvent) -> None:
    action = handler(event)
    assert callable(action), action
    await action()


async def close(device_links: dict[str, LinkProxy]) -> None:
    for proxy in device_links.values():
        await proxy.aclose()  # stops the outage watches the events started


def shared_of(proxy: LinkProxy) -> Any:
    assert isinstance(proxy.downlink_model, SharedFlow) and isinstance(proxy.uplink_model, SharedFlow)
    return proxy.downlink_model.shared, proxy.uplink_model.shared


async def test_a_cell_outage_takes_the_shared_link_down_once_for_every_member(tmp_path: Path) -> None:
    scenario, run, links = await run_events(tmp_path, [{"round": 1, "action": "outage", "cell": "tower",
                                                        "direction": "downlink", "for": "5s"},
                                                       {"round": 1, "action": "partition", "all": True,
                                                        "direction": "uplink", "for": "5s"}])
    try:
        downlink, uplink = shared_of(links["rpi4-0"])
        now = asyncio.get_running_loop().time()
        await perform(Outages(run, scenario, links), fired(scenario, 0))
        window = downlink.outage_at(now + 1.0)
        assert window is not None and window[1] - window[0] == pytest.approx(5.0, abs=1e-9)  # once, not per member
        assert uplink.outage_at(now + 1.0) is None
        assert links["rpi4-2"].downlink_model.outage_at(now + 1.0) is None  # not in the cell
        assert all(links[device_id]._outage_watch is not None for device_id in ("rpi4-0", "rpi4-1"))
        await perform(Partitions(run, scenario, links), fired(scenario, 1))  # all: the cell once, rpi4-2's own
        assert uplink.outage_at(now + 1.0) is not None and links["rpi4-2"].uplink_model.outage_at(now + 1.0)
        assert links["rpi4-2"].downlink_model.outage_at(now + 1.0) is None
        assert not run.not_emulated
    finally:
        await close(links)


async def test_an_outage_of_one_member_cuts_its_flow_only(tmp_path: Path) -> None:
    scenario, run, links = await run_events(tmp_path, [{"round": 1, "action": "outage", "device": "rpi4-1",
                                                        "for": "5s"}])
    try:
        downlink, _ = shared_of(links["rpi4-1"])
        now = asyncio.get_running_loop().time()
        await perform(Outages(run, scenario, links), fired(scenario, 0))
        assert links["rpi4-1"].downlink_model.outage_at(now + 1.0) is not None
        assert links["rpi4-1"].uplink_model.outage_at(now + 1.0) is not None
        assert links["rpi4-0"].downlink_model.outage_at(now + 1.0) is None and downlink.outage_at(now + 1.0) is None
    finally:
        await close(links)


async def test_a_cell_link_change_is_made_once_and_undone_exactly(tmp_path: Path) -> None:
    scenario, run, links = await run_events(tmp_path, [{"round": 1, "action": "link", "all": True,
                                                        "set": {"rate": "16kbit", "outages": [
                                                            {"at": "1min", "duration": "1s"}]}, "for": "2s"}])
    try:
        downlink, uplink = shared_of(links["rpi4-0"])
        before = (downlink.params, uplink.params, links["rpi4-2"].downlink, links["rpi4-2"].uplink)
        changes = LinkChanges(run, scenario, links)
        await perform(changes, fired(scenario, 0))
        assert downlink.params.rate_bps == uplink.params.rate_bps == 16_000
        assert links["rpi4-0"].downlink is downlink.params and links["rpi4-1"].uplink is uplink.params
        assert links["rpi4-2"].downlink.rate_bps == 16_000  # its own link too
        assert len(changes.saved[0]) == 2  # what to put back: the cell's shared link once, and rpi4-2's link
        assert all(links[device_id]._outage_watch is not None for device_id in ("rpi4-0", "rpi4-1"))
        await perform(changes, fired(scenario, 0, "end"))
        assert (downlink.params, uplink.params, links["rpi4-2"].downlink, links["rpi4-2"].uplink) == before
        assert downlink.params is before[0] and uplink.params is before[1]
    finally:
        await close(links)
