"""What the run does when a scenario event fires or ends: the actions it emulates, registered on RunEvents."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from channel.link import LinkModel
from channel.proxy import LinkProxy

from devices.agent import DeviceAgent
from devices.fleet import EmulatedFleet
from testbed.broker import LocalBroker
from testbed.core.event_checks import target_device_ids
from testbed.core.events import LinkEvent, OutageEvent, PartitionEvent
from testbed.core.plugins import LINK_PROFILES
from testbed.links import link_parameters
from testbed.core.scenario import Scenario
from testbed.events import FiredEvent
from testbed.run_events import RunEvents

logger = logging.getLogger("testbed.events")

EMULATED_ACTIONS = ("broker_restart", "device_crash", "outage", "link", "partition")
"""The actions `testbed run` performs; every other one is recorded and warned about, not emulated yet."""

Action = Callable[[], Awaitable[None]]


def register_actions(events: RunEvents, scenario: Scenario, broker: LocalBroker | None,
                     fleet: EmulatedFleet, device_links: Mapping[str, Any]) -> None:
    """Perform broker restarts on `broker` (None: an external broker), device crashes in `fleet` and outages on
    `device_links` (each device's open link)."""
    events.on("broker_restart", BrokerRestarts(broker, scenario.broker.url))
    events.on("device_crash", DeviceCrashes(events, scenario, fleet))
    events.on("outage", Outages(events, scenario, device_links))
    events.on("link", LinkChanges(events, scenario, device_links))
    events.on("partition", Partitions(events, scenario, device_links))


class BrokerRestarts:
    """`broker_restart`: the broker the run started (embedded, or a local Mosquitto) stops when the event fires and
    starts again (same port) when it ends."""

    def __init__(self, broker: LocalBroker | None, url: str | None) -> None:
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


def _proxies(events: RunEvents, fired: FiredEvent, scenario: Scenario,
             device_links: Mapping[str, Any]) -> list[LinkProxy]:
    """The links of the event's targets that can change at run time (a device's own link on the proxy backend);
    the others are warned about as not emulated yet."""
    proxies: list[LinkProxy] = []
    for device_id in target_device_ids(fired.event, scenario):
        link = device_links.get(device_id)
        if isinstance(link, LinkProxy) and all(isinstance(model, LinkModel)
                                               for model in (link.downlink_model, link.uplink_model)):
            proxies.append(link)
        elif isinstance(link, LinkProxy):
            events.warn_not_emulated(fired, "not emulated yet on a cell's shared link")
        else:
            events.warn_not_emulated(fired, f"not emulated yet on the {scenario.channel.backend!r} link backend "
                                            "(the proxy backend emulates it)")
    return proxies


class LinkChanges:
    """`link` on the proxy backend: the written fields of the chosen directions change when the event fires (over
    `profile`'s link if it names one) and the link's previous parameters come back when it ends."""

    def __init__(self, events: RunEvents, scenario: Scenario, device_links: Mapping[str, Any]) -> None:
        self.events = events
        self.scenario = scenario
        self.device_links = device_links
        self.saved: dict[int, list[tuple[LinkProxy, Any, Any]]] = {}  # event index → (link, downlink, uplink) before

    def __call__(self, fired: FiredEvent) -> Action | None:
        event = fired.event
        if not isinstance(event, LinkEvent):
            return None
        if fired.kind == "end":
            async def restore() -> None:  # performed after the change (actions run in order), so it finds it saved
                for proxy, downlink, uplink in self.saved.pop(fired.index, []):
                    proxy.reconfigure(downlink, uplink)
            return restore
        proxies = _proxies(self.events, fired, self.scenario, self.device_links)
        if not proxies:
            return None
        profile = LINK_PROFILES.get(event.set.profile) if event.set.profile is not None else None
        chosen = {"downlink": event.direction in ("both", "downlink"), "uplink": event.direction in ("both", "uplink")}

        async def change() -> None:
            saved = []
            for proxy in proxies:
                new = {direction: link_parameters(event.set, getattr(profile, direction) if profile is not None
                                                  else getattr(proxy, direction))
                       for direction, on in chosen.items() if on}
                saved.append((proxy, proxy.downlink if chosen["downlink"] else None,
                              proxy.uplink if chosen["uplink"] else None))
                proxy.reconfigure(new.get("downlink"), new.get("uplink"))
            if event.duration_s is not None:
                self.saved[fired.index] = saved
        return change


class Outages:
    """`outage` on the proxy backend: each target's link is down from when the event fires for `for` (its end is
    the outage ending by itself); longer than `channel.reset_after`, the link resets its connections."""

    def __init__(self, events: RunEvents, scenario: Scenario, device_links: Mapping[str, Any]) -> None:
        self.events = events
        self.scenario = scenario
        self.device_links = device_links

    def __call__(self, fired: FiredEvent) -> Action | None:
        event = fired.event
        if fired.kind == "end" or not isinstance(event, OutageEvent):
            return None
        proxies = _proxies(self.events, fired, self.scenario, self.device_links)
        if not proxies:
            return None
        downlink, uplink = event.direction in ("both", "downlink"), event.direction in ("both", "uplink")

        async def take_down() -> None:
            for proxy in proxies:
                proxy.add_outage(event.for_s, downlink=downlink, uplink=uplink)
        return take_down


class Partitions:
    """`partition` (both directions) on the proxy backend: the target's connections are reset when the event fires
    and new ones refused for `for` (its end is the partition ending by itself); one direction: not emulated yet."""

    def __init__(self, events: RunEvents, scenario: Scenario, device_links: Mapping[str, Any]) -> None:
        self.events = events
        self.scenario = scenario
        self.device_links = device_links

    def __call__(self, fired: FiredEvent) -> Action | str | None:
        event = fired.event
        if fired.kind == "end" or not isinstance(event, PartitionEvent):
            return None
        if event.direction != "both":
            return "a partition of one direction is not emulated yet (direction: both is)"
        proxies = [link for device_id in target_device_ids(event, self.scenario)
                   if isinstance(link := self.device_links.get(device_id), LinkProxy)]
        if not proxies:
            return (f"not emulated yet on the {self.scenario.channel.backend!r} link backend "
                    "(the proxy backend emulates it)")

        async def cut_off() -> None:
            for proxy in proxies:
                await proxy.partition(event.for_s)
        return cut_off
