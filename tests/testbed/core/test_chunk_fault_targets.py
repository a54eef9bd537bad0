"""Whom `corrupt`, `duplicate` and `reorder` may target: emulated devices and serial boards, not attached boards."""

from __future__ import annotations

from typing import Any

import pytest

from testbed.core.events import CorruptEvent, DuplicateEvent, ReorderEvent
from testbed.core.scenario import ScenarioError, parse_scenario

SERIAL = "bench-pi"
ATTACHED = "far-pi"
CHUNK_EVENTS = [("corrupt", 3, CorruptEvent), ("duplicate", 3, DuplicateEvent), ("reorder", 5, ReorderEvent)]


def raw(events: list[dict[str, Any]]) -> dict[str, Any]:
    """One emulated device, one serial board and one board attached by hand (`testbed attach`), with these events."""
    return {"name": "chunk-targets", "rounds": 3, "events": events,
            "devices": [{"profile": "rpi4", "count": 1},
                        {"name": SERIAL, "profile": "rpi4", "serial": "/dev/ttyACM0"},
                        {"name": ATTACHED, "profile": "rpi4", "external": True}]}


@pytest.mark.parametrize(("action", "chunks", "event_type"), CHUNK_EVENTS)
def test_chunk_faults_on_a_serial_board_are_accepted(action: str, chunks: int, event_type: type) -> None:
    scenario = parse_scenario(raw([{"round": 1, "action": action, "device": SERIAL, "chunks": chunks}]))
    event = scenario.events[0]
    assert isinstance(event, event_type) and event.device == SERIAL and event.chunks == chunks


@pytest.mark.parametrize(("action", "chunks", "event_type"), CHUNK_EVENTS)
def test_chunk_faults_on_an_attached_board_only_are_one_error(action: str, chunks: int, event_type: type) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(raw([{"round": 1, "action": action, "device": ATTACHED, "chunks": chunks}]), "x.yaml")
    lines = [line.strip() for line in str(caught.value).splitlines()[1:] if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("events.0.device:"), lines
    assert f"{action} taps the incoming chunks of an emulated device or of a serial board" in lines[0], lines
    assert "attached or network board" in lines[0], lines


def test_chunk_faults_on_all_devices_with_an_attached_board_among_them_are_accepted() -> None:
    scenario = parse_scenario(raw([{"round": 1, "action": "corrupt", "all": True, "chunks": 1}]))
    assert isinstance(scenario.events[0], CorruptEvent)
