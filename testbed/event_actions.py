"""What the run does when a scenario event fires or ends: the actions it emulates, registered on RunEvents; the
broker and the links here, the devices in testbed.device_actions."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from channel.link import LinkModel
from channel.proxy import LinkProxy

from devices.fleet import EmulatedFleet
from testbed.broker import LocalBroker
from testbed.core.event_checks import target_device_ids
from testbed.core.events import LinkEvent, OutageEvent, PartitionEvent
from testbed.core.plugins import LINK_PROFILES
from testbed.device_actions import BoardResets, ChunkFaultArming, DeviceChurn, DeviceCrashes, DeviceDowntime
from testbed.links import link_parameters
from testbed.core.scenario import Scenario
from testbed.events import FiredEvent
from testbed.run_events import ActionHandler, RunEvents

EMULATED_ACTIONS = ("broker_restart", "server_restart", "device_crash", "device_leave", "device_join", "board_reset",
                    "outage", "link", "partition", "corrupt", "duplicate", "reorder")
"""The actions `testbed run` performs; every other one is recorded and warned about, not emulated yet."""

Action = Callable[[], Awaitable[None]]


def register_actions(events: RunEvents, scenario: Scenario, broker: LocalBroker | None,
                     fleet: EmulatedFleet, device_links: Mapping[str, Any],
                     server_restarts: ActionHandler) -> DeviceDowntime:
    """Perform broker restarts on `broker` (None: an external broker), server restarts with `server_restarts`
    (testbed.server_restart), what happens to devices in `fleet` (testbed.device_actions) and what happens to links
    on `device_links` (each device's open link); the fleet's downtime (who is in the run, for the report collector)."""
    downtime = DeviceDowntime(events, scenario, fleet)
    chunk_faults = ChunkFaultArming(downtime, scenario.seed)
    churn = DeviceChurn(downtime)
    handlers: dict[str, ActionHandler] = {
        "broker_restart": BrokerRestarts(broker, scenario.broker.url), "server_restart": server_restarts,
        "device_crash": DeviceCrashes(downtime),
        "device_leave": churn, "device_join": churn, "board_reset": BoardResets(fleet),
        "outage": Outages(events, scenario, device_links), "link": LinkChanges(events, scenario, device_links),
        "partition": Partitions(events, scenario, device_links),
        "corrupt": chunk_faults, "duplicate": chunk_faults, "reorder": chunk_faults,
    }
    assert set(handlers) == set(EMULATED_ACTIONS)
    for action, handler in handlers.items():
        events.on(action, handler)
    return downtime


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


def _take_down(proxies: list[LinkProxy], duration_s: float, direction: str) -> Action:
    """Each link carries nothing in `direction` (or both) for `duration_s` from when the action is performed."""
    downlink, uplink = direction in ("both", "downlink"), direction in ("both", "uplink")

    async def take_down() -> None:
        for proxy in proxies:
            proxy.add_outage(duration_s, downlink=downlink, uplink=uplink)
    return take_down


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
        return _take_down(proxies, event.for_s, event.direction) if proxies else None


class Partitions:
    """`partition` on the proxy backend. Both directions: the target's connections are reset when the event fires
    and new ones refused for `for`. One direction: that direction carries nothing for `for` while the other still
    does — what a TCP connection sees of a one-way cut (what it sent meanwhile is sent again once the cut heals;
    past `channel.reset_after` the connection is reset and new ones refused until it ends). Its end is the
    partition ending by itself."""

    def __init__(self, events: RunEvents, scenario: Scenario, device_links: Mapping[str, Any]) -> None:
        self.events = events
        self.scenario = scenario
        self.device_links = device_links

    def __call__(self, fired: FiredEvent) -> Action | str | None:
        event = fired.event
        if fired.kind == "end" or not isinstance(event, PartitionEvent):
            return None
        if event.direction != "both":
            proxies = _proxies(self.events, fired, self.scenario, self.device_links)
            return _take_down(proxies, event.for_s, event.direction) if proxies else None
        proxies = [link for device_id in target_device_ids(event, self.scenario)
                   if isinstance(link := self.device_links.get(device_id), LinkProxy)]
        if not proxies:
            return (f"not emulated yet on the {self.scenario.channel.backend!r} link backend "
                    "(the proxy backend emulates it)")

        async def cut_off() -> None:
            for proxy in proxies:
                await proxy.partition(event.for_s)
        return cut_off
