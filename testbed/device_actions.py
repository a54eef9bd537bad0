"""What the run does to devices when a scenario event fires: crashes, churn, board resets and faults on their chunks."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from devices.agent import DeviceAgent
from devices.chunk_faults import TapsChunks
from devices.fleet import EmulatedFleet
from devices.serial_bridge import SerialBridge
from testbed.core.event_checks import target_device_ids
from testbed.core.events import BoardResetEvent, CorruptEvent, DuplicateEvent, ReorderEvent
from testbed.core.scenario import Scenario
from testbed.core.seeds import Stream, generator
from testbed.events import FiredEvent
from testbed.run_events import RunEvents

logger = logging.getLogger("testbed.events")

Action = Callable[[], Awaitable[None]]


def _describe_work(agent: DeviceAgent) -> str:
    """What a device was doing when it was stopped, for the log (and the fault tests)."""
    if agent.report_in_flight:
        return "update applied, its report not acknowledged yet"
    if agent.receiver.transfers_in_flight:
        return "update in flight"
    return "idle"


class DeviceDowntime:
    """Which emulated devices are down (crashed, or gone after device_leave) and bringing them back, in one place:
    a crash's reboot does not bring back a device that left meanwhile, and a join brings back a crashed one.

    It is the run's FleetPresence (testbed.report_collector): a device that left, or that crashed with its reboot
    due after a round's deadline, does not hold that round."""

    def __init__(self, events: RunEvents, scenario: Scenario, fleet: EmulatedFleet) -> None:
        self.events = events
        self.scenario = scenario
        self.fleet = fleet
        self.down: set[str] = set()
        self.away: set[str] = set()
        """Devices that left (device_leave) and have not joined again."""
        self.back_at: dict[str, float] = {}
        """Down devices whose reboot is due (a crash with `for`): when (time.monotonic)."""
        self.interrupted: list[tuple[str, str]] = []
        """(device, what it was doing) for every device stopped, in order."""

    def emulated_targets(self, fired: FiredEvent, why_not_others: str) -> list[str]:
        """The event's targets that are emulated agents; the others are warned about (once) with `why_not_others`."""
        emulated = []
        for device_id in target_device_ids(fired.event, self.scenario):
            if isinstance(self.fleet.member(device_id), DeviceAgent):
                emulated.append(device_id)
            else:
                self.events.warn_not_emulated(fired, why_not_others)
        return emulated

    def agent(self, device_id: str) -> DeviceAgent:
        member = self.fleet.member(device_id)
        assert isinstance(member, DeviceAgent), f"{device_id} is not an emulated device"
        return member

    def out_of_run(self, device_id: str, until_s: float) -> bool:
        """Whether `device_id` stays out of the run through `until_s` (time.monotonic): it left and has not joined,
        or it is down with its reboot due after `until_s` (a device down for a moment, or rebooting before, is in)."""
        if device_id in self.away:
            return True
        return device_id in self.down and self.back_at.get(device_id, until_s) > until_s

    async def stop(self, device_id: str, how: str, back_in_s: float | None = None) -> None:
        """Stop the device's agent (its task cancelled: what it held in memory is gone) unless it is down already;
        `back_in_s`: when its reboot is due from now (a crash with `for`)."""
        if back_in_s is not None:
            self.back_at[device_id] = time.monotonic() + back_in_s
        if device_id in self.down:
            return
        doing = _describe_work(self.agent(device_id))
        await self.fleet.crash(device_id)
        self.down.add(device_id)
        self.interrupted.append((device_id, doing))
        logger.info("device %s %s (%s)", device_id, how, doing)

    def start(self, device_id: str, how: str) -> None:
        """Start the device again from what a reboot keeps (DeviceAgent.rebooted), if it is down and not away."""
        if device_id not in self.down or device_id in self.away:
            return
        self.fleet.restart(device_id, self.agent(device_id).rebooted())
        self.down.discard(device_id)
        self.back_at.pop(device_id, None)
        logger.info("device %s %s", device_id, how)


class DeviceCrashes:
    """`device_crash`: an emulated device's agent task is cancelled; it reboots (DeviceAgent.rebooted) at once, or
    when the event ends (`for`)."""

    def __init__(self, downtime: DeviceDowntime) -> None:
        self.downtime = downtime
        self.crashed: dict[int, list[str]] = {}  # event index → the devices it crashed, until they reboot

    def __call__(self, fired: FiredEvent) -> Action | None:
        downtime = self.downtime
        if fired.kind == "end":
            device_ids = self.crashed.pop(fired.index, [])
        else:
            device_ids = downtime.emulated_targets(fired, "only emulated devices crash (a serial board: board_reset)")
            if fired.event.duration_s is not None:
                self.crashed[fired.index] = device_ids
        if not device_ids:
            return None
        crash, reboot = fired.kind == "fire", fired.kind == "end" or fired.event.duration_s is None

        async def crash_and_or_reboot() -> None:
            for device_id in device_ids:
                if crash:
                    await downtime.stop(device_id, "crashed", None if reboot else fired.event.duration_s)
                if reboot:
                    downtime.start(device_id, "rebooted")
        return crash_and_or_reboot


class DeviceChurn:
    """`device_leave`: the agent says it is offline, disconnects and is gone; `device_join`: it starts again from
    what it kept (its deployed version) and asks for a catch-up to the deployed version."""

    def __init__(self, downtime: DeviceDowntime) -> None:
        self.downtime = downtime

    def __call__(self, fired: FiredEvent) -> Action | None:
        downtime = self.downtime
        if fired.kind == "end":
            return None
        device_ids = downtime.emulated_targets(fired, "only emulated devices leave and join (a serial board: "
                                                      "board_reset)")
        if not device_ids:
            return None
        if fired.action == "device_join":
            async def join() -> None:
                for device_id in device_ids:
                    downtime.away.discard(device_id)
                    downtime.start(device_id, "joined")
            return join

        async def leave() -> None:
            for device_id in device_ids:
                if device_id not in downtime.down:
                    await downtime.agent(device_id).say_goodbye()
                await downtime.stop(device_id, "left")
                downtime.away.add(device_id)
        return leave


class BoardResets:
    """`board_reset`: the serial board's bridge drops the line; it opens it again (after `for`, if given: a cable pulled
    out that long), and the board catches up."""

    def __init__(self, fleet: EmulatedFleet) -> None:
        self.fleet = fleet

    def __call__(self, fired: FiredEvent) -> Action | str | None:
        event = fired.event
        if fired.kind == "end" or not isinstance(event, BoardResetEvent) or event.device is None:
            return None
        bridge = self.fleet.member(event.device)
        if not isinstance(bridge, SerialBridge):  # the scenario check allows serial boards only
            return "only a serial board's line can be dropped"

        async def reset() -> None:
            bridge.drop_line(event.for_s or 0.0)
            logger.info("board %s: line dropped (board_reset%s)", bridge.device_id,
                        f", closed for {event.for_s:g} s" if event.for_s else "")
        return reset


class ChunkFaultArming:
    """`corrupt`, `duplicate`, `reorder`: armed when the event fires on each target's ChunkFaults (TapsChunks): an
    emulated agent's receive path (after the channel), or a serial board's bridge (before the serial line); bits
    flipped and orders drawn from the scenario seed, the event and the device. A target with neither (a board
    attached from another process, a device run by a fleet worker) is warned about."""

    def __init__(self, downtime: DeviceDowntime, seed: int) -> None:
        self.downtime = downtime
        self.seed = seed
        self.device_numbers = {device_id: number for number, device_id in enumerate(downtime.scenario.device_ids())}

    def __call__(self, fired: FiredEvent) -> Action | None:
        event = fired.event
        if fired.kind == "end":
            return None
        taps: dict[str, TapsChunks] = {}
        for device_id in target_device_ids(event, self.downtime.scenario):
            member = self.downtime.fleet.member(device_id)
            if isinstance(member, TapsChunks):  # kept across an agent's reboot: they are the link's
                taps[device_id] = member
            else:
                self.downtime.events.warn_not_emulated(fired, "chunks are tapped on emulated devices and serial "
                                                              "boards' bridges in this run only")
        if not taps:
            return None

        async def arm() -> None:
            for device_id, tap in taps.items():
                rng = generator(self.seed, Stream.CHUNK_FAULTS, fired.index, self.device_numbers[device_id])
                if isinstance(event, CorruptEvent):
                    tap.chunk_faults.corrupt(event.chunks, event.bits, rng)
                elif isinstance(event, DuplicateEvent):
                    tap.chunk_faults.duplicate(event.chunks)
                elif isinstance(event, ReorderEvent):
                    tap.chunk_faults.reorder(event.chunks, rng)
        return arm
