"""Checks of a scenario's events against the rest of it (rounds, devices, cells, boards), and whom an event targets."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from testbed.core.capacity import Problem
from testbed.core.events import (
    BoardResetEvent,
    CorruptEvent,
    DeviceCrashEvent,
    DeviceJoinEvent,
    DeviceLeaveEvent,
    DuplicateEvent,
    EventBase,
    LinkEvent,
    ReorderEvent,
    TargetedEvent,
)
from testbed.core.plugins import LINK_BACKENDS
from testbed.core.scenario import Scenario

SHOWN_DEVICE_IDS = 8
EMULATED_ONLY: dict[type[EventBase], str] = {
    DeviceCrashEvent: "device_crash stops an emulated device's agent, and this target has none (for a serial board "
                      "use board_reset)",
    DeviceLeaveEvent: "device_leave stops an emulated device's agent, and this target has none (for a serial board "
                      "use board_reset)",
    DeviceJoinEvent: "device_join starts an emulated device's agent again, and this target has none",
}
"""Actions performed on emulated devices only, and what a target without any is told."""
TAPPED_KINDS = ("emulated", "serial")
CHUNK_TAPPED: dict[type[EventBase], str] = {
    event_type: f"{action} taps the incoming chunks of an emulated device or of a serial board (on its bridge), and "
                "this target has neither (an attached or network board's chunks reach it in another process)"
    for event_type, action in ((CorruptEvent, "corrupt"), (DuplicateEvent, "duplicate"), (ReorderEvent, "reorder"))
}
"""Actions performed on the chunks to emulated devices and serial boards, and what a target with neither is told."""


def target_device_ids(event: EventBase, scenario: Scenario) -> list[str]:
    """The ids of the devices an event acts on, in scenario order (none for broker and server events)."""
    if not isinstance(event, TargetedEvent):
        return []
    if event.device is not None:
        return [event.device]
    if event.cell is not None:
        cells = {cell.name: cell.devices for cell in scenario.channel.cells}
        members = set(cells.get(event.cell, []))
        return [device_id for device_id in scenario.device_ids() if device_id in members]
    return scenario.device_ids()


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN_DEVICE_IDS])
    return shown + (f", … ({len(names)} in all)" if len(names) > SHOWN_DEVICE_IDS else "")


def _target_problems(index: int, event: TargetedEvent, scenario: Scenario) -> list[Problem]:
    here = ("events", str(index))
    known = scenario.device_ids()
    if event.device is not None and event.device not in known:
        return [Problem((*here, "device"), f"not a device of this scenario (its devices: {_listed(known)})",
                        event.device)]
    cells = [cell.name for cell in scenario.channel.cells]
    if event.cell is not None and event.cell not in cells:
        has = f"its cells: {', '.join(cells)}" if cells else "it has no channel.cells"
        return [Problem((*here, "cell"), f"not a cell of this scenario ({has})", event.cell)]
    where = (*here, "device") if event.device is not None else (*here, "cell") if event.cell is not None \
        else (*here, "all")
    said = event.device or event.cell or True
    kinds = {device_id: group.kind for device_id, group in scenario.device_entries().items()}
    targets = target_device_ids(event, scenario)
    if isinstance(event, BoardResetEvent) and kinds[event.device or ""] != "serial":
        boards = [device_id for device_id, kind in kinds.items() if kind == "serial"]
        has = f"its serial boards: {_listed(boards)}" if boards else "this scenario has none"
        return [Problem(where, f"board_reset drops the line of a serial board (a device with 'serial:'; {has}); "
                               f"{event.device!r} is {kinds[event.device or '']}", said)]
    if type(event) in EMULATED_ONLY and not any(kinds[device_id] == "emulated" for device_id in targets):
        return [Problem(where, EMULATED_ONLY[type(event)], said)]
    if type(event) in CHUNK_TAPPED and not any(kinds[device_id] in TAPPED_KINDS for device_id in targets):
        return [Problem(where, CHUNK_TAPPED[type(event)], said)]
    if isinstance(event, LinkEvent) and event.device is not None:
        cell_of = {device_id: cell.name for cell in scenario.channel.cells for device_id in cell.devices}
        if event.device in cell_of:
            return [Problem(where, f"this device shares the link of cell {cell_of[event.device]!r}; change that "
                                   f"with 'cell: {cell_of[event.device]}'", said)]
    return []


def _event_problems(index: int, event: EventBase, scenario: Scenario, leaving: set[str]) -> list[Problem]:
    here = ("events", str(index))
    problems = []
    if event.round is not None and event.round >= scenario.rounds:
        problems.append(Problem((*here, "round"), f"the scenario runs rounds 0 to {scenario.rounds - 1} "
                                                  f"(rounds: {scenario.rounds}; the first round is 0)", event.round))
    if not isinstance(event, TargetedEvent):
        return problems
    target_problems = _target_problems(index, event, scenario)
    if target_problems:
        return problems + target_problems
    if isinstance(event, DeviceJoinEvent):
        never_left = [device_id for device_id in target_device_ids(event, scenario) if device_id not in leaving]
        if never_left:
            field = "device" if event.device is not None else "cell" if event.cell is not None else "all"
            problems.append(Problem((*here, field), f"{_listed(never_left)} never leaves (no device_leave event "
                                                    "takes it away), so it cannot join", event.target()[field]))
    if isinstance(event, CorruptEvent) and event.bits > 8 * scenario.update.chunk_size:
        problems.append(Problem((*here, "bits"), f"a chunk holds {8 * scenario.update.chunk_size} bits "
                                                 f"(update.chunk_size {scenario.update.chunk_size} B)", event.bits))
    if isinstance(event, LinkEvent) and event.set.queue_bytes is not None:
        backends = {name: LINK_BACKENDS.attributes(name) for name in LINK_BACKENDS.names()}
        if not backends[scenario.channel.backend].get("packet_level"):
            packet_level = [name for name, attributes in backends.items() if attributes.get("packet_level")]
            problems.append(Problem((*here, "set", "queue"), "a bounded bottleneck queue works at the packet level, "
                                    f"with channel.backend {' or '.join(map(repr, packet_level))}, not "
                                    f"{scenario.channel.backend!r}", event.set.queue_bytes))
    return problems


def event_problems(scenario: Scenario) -> list[Problem]:
    """Every event that does not fit its scenario: a round it does not run, a device or cell it lacks, a wrong board."""
    leaving = {device_id for event in scenario.events if isinstance(event, DeviceLeaveEvent)
               for device_id in target_device_ids(event, scenario)}
    return [problem for index, event in enumerate(scenario.events)
            for problem in _event_problems(index, event, scenario, leaving)]


def check_events(scenario: Scenario) -> Scenario:
    """``Scenario``'s check of its events: one error per problem, each located at its field (``events.2.round``)."""
    problems = event_problems(scenario)
    if problems:
        raise ValidationError.from_exception_data(type(scenario).__name__, [
            InitErrorDetails(type=PydanticCustomError("event", "{problem}", {"problem": problem.message}),
                             loc=problem.location, input=problem.value) for problem in problems
        ])
    return scenario
