"""What the run does when a scenario event fires or ends: the actions it emulates, registered on RunEvents."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from devices.agent import DeviceAgent
from devices.fleet import EmulatedFleet
from testbed.broker import EmbeddedBroker
from testbed.core.event_checks import target_device_ids
from testbed.core.scenario import Scenario
from testbed.events import FiredEvent
from testbed.run_events import RunEvents

logger = logging.getLogger("testbed.events")

EMULATED_ACTIONS = ("broker_restart", "device_crash")
"""The actions `testbed run` performs; every other one is recorded and warned about, not emulated yet."""

Action = Callable[[], Awaitable[None]]


def register_actions(events: RunEvents, scenario: Scenario, broker: EmbeddedBroker | None,
                     fleet: EmulatedFleet) -> None:
    """Perform broker restarts on `broker` (None: an external broker) and device crashes in `fleet`."""
    events.on("broker_restart", BrokerRestarts(broker, scenario.broker.url))
    events.on("device_crash", DeviceCrashes(events, scenario, fleet))


class BrokerRestarts:
    """`broker_restart`: the embedded broker stops when the event fires and starts again (same port) when it ends."""

    def __init__(self, broker: EmbeddedBroker | None, url: str | None) -> None:
        self.broker = broker
        self.url = url

    def __call__(self, fired: FiredEvent) -> Action | str:
        broker = self.broker
        if broker is None:
            return (f"the broker is external ({self.url}) and cannot be restarted by the testbed; restart it by hand "
                    "to try this")
        if fired.kind == "fire":
            return broker.stop
        return broker.start


class DeviceCrashes:
    """`device_crash`: an emulated device's agent task is cancelled; it reboots (DeviceAgent.rebooted) at the end."""

    def __init__(self, events: RunEvents, scenario: Scenario, fleet: EmulatedFleet) -> None:
        self.events = events
        self.scenario = scenario
        self.fleet = fleet
        self.crashed: dict[int, list[str]] = {}  # event index → the devices it crashed, until they reboot

    def __call__(self, fired: FiredEvent) -> Action | None:
        if fired.kind == "end":
            return self._reboot_all(self.crashed.pop(fired.index, []))
        emulated = []
        for device_id in target_device_ids(fired.event, self.scenario):
            if isinstance(self.fleet.member(device_id), DeviceAgent):
                emulated.append(device_id)
            else:
                self.events.warn_not_emulated(fired, "only emulated devices crash (a serial board: board_reset)")
        if not emulated:
            return None
        if fired.event.duration_s is None:  # no `for:`: it reboots at once
            return self._crash_and_reboot(emulated)
        self.crashed[fired.index] = emulated
        return self._crash_all(emulated)

    def _crash_all(self, device_ids: list[str]) -> Action:
        async def crash() -> None:
            for device_id in device_ids:
                await self.fleet.crash(device_id)
                logger.info("device %s crashed", device_id)
        return crash

    def _reboot_all(self, device_ids: list[str]) -> Action:
        async def reboot() -> None:
            for device_id in device_ids:
                member = self.fleet.member(device_id)
                assert isinstance(member, DeviceAgent)
                self.fleet.restart(device_id, member.rebooted())
                logger.info("device %s rebooted", device_id)
        return reboot

    def _crash_and_reboot(self, device_ids: list[str]) -> Action:
        crash, reboot = self._crash_all(device_ids), self._reboot_all(device_ids)

        async def both() -> None:
            await crash()
            await reboot()
        return both
