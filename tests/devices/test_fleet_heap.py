"""Once the fleet is online the heap it built is taken out of the collector's scans, so no full collection of it
stalls the event loop during the rounds."""

from __future__ import annotations

import asyncio
import gc

import pytest

from devices.fleet import EmulatedFleet, ExternalDevice, FleetError


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


async def test_the_heap_is_frozen_once_every_member_is_online(unfrozen) -> None:
    members = [ExternalDevice("board-0"), ExternalDevice("board-1")]
    async with EmulatedFleet(members) as fleet:
        for member in members:
            member.set_online(True)
        assert gc.get_freeze_count() == 0
        await fleet.wait_online(timeout_s=10)
        assert gc.get_freeze_count() > 0


async def test_a_fleet_not_online_is_not_frozen(unfrozen) -> None:
    members = [ExternalDevice("board-0")]
    async with EmulatedFleet(members) as fleet:
        with pytest.raises(FleetError, match="devices not online after 0 s: board-0"):
            await fleet.wait_online(timeout_s=0.05)
    await asyncio.sleep(0)
    assert gc.get_freeze_count() == 0
