"""What the run does when a scenario event fires or ends: the actions it emulates, registered on RunEvents; the
broker and the links here, the devices in testbed.device_actions."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from channel.link import LinkParameters
from channel.proxy import LinkProxy
from channel.shared import SharedFlow, SharedLink
from channel.tun import TunLink

from devices.fleet import EmulatedFleet
from testbed.broker import LocalBroker
from testbed.core.event_checks import target_device_ids
from testbed.core.events import LinkEvent, OutageEvent, PartitionEvent, TargetedEvent
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
OwnLink = LinkProxy | TunLink
"""A device's own link that changes at run time: the proxy backend's, or the tun backend's packet emulator."""
_NOT_EMULATED = "not emulated yet on the {backend!r} link backend (the proxy and tun backends emulate it)"


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


@dataclass
class _CellLinks:
    """A cell's shared bottleneck (one SharedLink per direction) and the links of its members an event reaches."""

    shared_downlink: SharedLink
    shared_uplink: SharedLink
    proxies: list[LinkProxy] = field(default_factory=list)

    @property
    def downlink(self) -> LinkParameters:
        return self.shared_downlink.params

    @property
    def uplink(self) -> LinkParameters:
        return self.shared_uplink.params

    def reconfigure(self, downlink: LinkParameters | None, uplink: LinkParameters | None) -> None:
        """From now on, the directions given carry their new parameters (once for the cell, not per member)."""
        now = asyncio.get_running_loop().time()
        for shared, params in ((self.shared_downlink, downlink), (self.shared_uplink, uplink)):
            if params is not None:
                shared.reconfigure(params, now)
        if any(params.outages or params.random_outages is not None for params in (self.downlink, self.uplink)):
            for proxy in self.proxies:
                proxy.watch_outages()

    def add_outage(self, duration_s: float, downlink: bool, uplink: bool) -> None:
        """The shared link carries nothing for any member in the chosen directions for ``duration_s`` from now."""
        now = asyncio.get_running_loop().time()
        for shared, chosen in ((self.shared_downlink, downlink), (self.shared_uplink, uplink)):
            if chosen:
                shared.add_outage(now, now + duration_s)
        for proxy in self.proxies:
            proxy.watch_outages()


@dataclass
class _LinkTargets:
    """Whose links an event changes: links of their own (or, for a `device:` in a cell, that device's flow), and
    the cells it takes whole (a `cell:` target, or the cells' members under `all`)."""

    links: list[OwnLink]
    cells: list[_CellLinks]

    def __bool__(self) -> bool:
        return bool(self.links or self.cells)


def _link_targets(events: RunEvents, fired: FiredEvent, scenario: Scenario,
                  device_links: Mapping[str, Any]) -> _LinkTargets:
    """The links of the event's targets that can change at run time (the proxy and tun backends'); the others are
    warned about as not emulated yet. A `cell:` or `all` target reaches each cell's shared link once."""
    whole_cells = isinstance(fired.event, TargetedEvent) and fired.event.device is None
    links: list[OwnLink] = []
    cells: dict[int, _CellLinks] = {}
    for device_id in target_device_ids(fired.event, scenario):
        link = device_links.get(device_id)
        if isinstance(link, TunLink):
            links.append(link)
            continue
        if not isinstance(link, LinkProxy):
            events.warn_not_emulated(fired, _NOT_EMULATED.format(backend=scenario.channel.backend))
            continue
        downlink, uplink = link.downlink_model, link.uplink_model
        if whole_cells and isinstance(downlink, SharedFlow) and isinstance(uplink, SharedFlow):
            cell = cells.setdefault(id(downlink.shared), _CellLinks(downlink.shared, uplink.shared))
            cell.proxies.append(link)
        else:
            links.append(link)
    return _LinkTargets(links, list(cells.values()))


def _in_cell(link: OwnLink) -> bool:
    return isinstance(link, LinkProxy) and (isinstance(link.downlink_model, SharedFlow)
                                            or isinstance(link.uplink_model, SharedFlow))


class LinkChanges:
    """`link` on the proxy and tun backends: the written fields of the chosen directions change when the event
    fires (over `profile`'s link if it names one) on each target's own link, or once on a cell's shared link; the
    previous parameters come back when it ends. (`device:` in a cell is refused by the scenario's check: one
    device cannot change its cell's link.)"""

    def __init__(self, events: RunEvents, scenario: Scenario, device_links: Mapping[str, Any]) -> None:
        self.events = events
        self.scenario = scenario
        self.device_links = device_links
        self.saved: dict[int, list[Callable[[], None]]] = {}  # event index → what puts each link back as it was

    def __call__(self, fired: FiredEvent) -> Action | None:
        event = fired.event
        if not isinstance(event, LinkEvent):
            return None
        if fired.kind == "end":
            async def restore() -> None:  # performed after the change (actions run in order), so it finds it saved
                for put_back in self.saved.pop(fired.index, []):
                    put_back()
            return restore
        targets = _link_targets(self.events, fired, self.scenario, self.device_links)
        if any(_in_cell(proxy) for proxy in targets.links):  # the scenario's check refuses it; never half-done
            self.events.warn_not_emulated(fired, "a device in a cell shares its cell's link: target the cell")
            return None
        if not targets:
            return None
        profile = LINK_PROFILES.get(event.set.profile) if event.set.profile is not None else None
        chosen = {"downlink": event.direction in ("both", "downlink"), "uplink": event.direction in ("both", "uplink")}

        def changed(current: LinkParameters, direction: str) -> LinkParameters | None:
            if not chosen[direction]:
                return None
            return link_parameters(event.set, getattr(profile, direction) if profile is not None else current)

        async def change() -> None:
            saved: list[Callable[[], None]] = []
            for link in (*targets.links, *targets.cells):
                before = (link.downlink if chosen["downlink"] else None, link.uplink if chosen["uplink"] else None)
                link.reconfigure(changed(link.downlink, "downlink"), changed(link.uplink, "uplink"))
                saved.append(functools.partial(link.reconfigure, *before))
            if event.duration_s is not None:
                self.saved[fired.index] = saved
        return change


def _take_down(targets: _LinkTargets, duration_s: float, direction: str) -> Action:
    """Each link (a cell's shared link once) carries nothing in `direction` (or both) for `duration_s` from when
    the action is performed."""
    downlink, uplink = direction in ("both", "downlink"), direction in ("both", "uplink")

    async def take_down() -> None:
        for link in (*targets.links, *targets.cells):
            link.add_outage(duration_s, downlink=downlink, uplink=uplink)
    return take_down


class Outages:
    """`outage` on the proxy and tun backends: each target's link is down from when the event fires for `for` (its
    end is the outage ending by itself); longer than `channel.reset_after`, a proxy link resets its connections (on
    tun the kernel's TCP meets the outage itself). A `cell:`
    (or `all`) target takes the cell's shared link down once, for every member; a `device:` in a cell cuts that
    device's flow only, the others going on."""

    def __init__(self, events: RunEvents, scenario: Scenario, device_links: Mapping[str, Any]) -> None:
        self.events = events
        self.scenario = scenario
        self.device_links = device_links

    def __call__(self, fired: FiredEvent) -> Action | None:
        event = fired.event
        if fired.kind == "end" or not isinstance(event, OutageEvent):
            return None
        targets = _link_targets(self.events, fired, self.scenario, self.device_links)
        return _take_down(targets, event.for_s, event.direction) if targets else None


class Partitions:
    """`partition` on the proxy and tun backends. Both directions: a proxy link's connections are reset when the
    event fires and new ones refused for `for` (a cell: each of its devices); a tun link drops every packet both ways
    for `for`. One direction: that direction carries nothing for
    `for` while the other still does — what a TCP connection sees of a one-way cut (what it sent meanwhile is sent
    again once the cut heals; past `channel.reset_after` the connection is reset and new ones refused until it
    ends); as for `outage`, a cell's shared link once, or one device's flow of a cell. Its end is the partition
    ending by itself."""

    def __init__(self, events: RunEvents, scenario: Scenario, device_links: Mapping[str, Any]) -> None:
        self.events = events
        self.scenario = scenario
        self.device_links = device_links

    def __call__(self, fired: FiredEvent) -> Action | str | None:
        event = fired.event
        if fired.kind == "end" or not isinstance(event, PartitionEvent):
            return None
        if event.direction != "both":
            targets = _link_targets(self.events, fired, self.scenario, self.device_links)
            return _take_down(targets, event.for_s, event.direction) if targets else None
        links = [link for device_id in target_device_ids(event, self.scenario)
                 if isinstance(link := self.device_links.get(device_id), (LinkProxy, TunLink))]
        if not links:
            return _NOT_EMULATED.format(backend=self.scenario.channel.backend)

        async def cut_off() -> None:
            for link in links:
                await link.partition(event.for_s)
        return cut_off
