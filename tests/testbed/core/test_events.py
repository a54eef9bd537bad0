"""The `events:` section: every action parses and round-trips, every bad event is one error naming its field path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.core.events import (
    EVENT_ACTIONS,
    BoardResetEvent,
    BrokerRestartEvent,
    LinkEvent,
    OutageEvent,
)
from testbed.core.event_checks import target_device_ids
from testbed.core.scenario import ScenarioError, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[3]
ROUNDS = 4
EMULATED = ["rpi4-0", "rpi4-1", "rpi4-2"]
BOARD = "bench-pi"
IN_CELL = "rpi4-2"


def raw(events: list[Any], **fields: Any) -> dict[str, Any]:
    """Three emulated devices (rpi4-2 in cell `tower`) and one serial board, with these events."""
    return {
        "name": "events", "rounds": ROUNDS,
        "channel": {"downlink": {"rate": "50kbit"}, "cells": [{"name": "tower", "devices": [IN_CELL]}]},
        "devices": [{"profile": "rpi4", "count": 3}, {"name": BOARD, "profile": "rpi4", "serial": "/dev/ttyACM0"}],
        "events": events, **fields,
    }


def error_lines(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(data, "x.yaml")
    message = str(caught.value)
    assert message.startswith("x.yaml: invalid scenario"), message
    return [line.strip() for line in message.splitlines()[1:] if line.strip()]


def test_a_scenario_without_events_has_none():
    assert load_scenario(ROOT / "scenarios" / "lowband.yaml").events == []


def test_every_action_parses_with_units_in_seconds():
    scenario = parse_scenario(raw([
        {"at": "1500ms", "action": "link", "device": "rpi4-0", "set": {"rate": "10kbit", "loss": "5%"}, "for": "20s"},
        {"round": 1, "phase": "delivery", "after": "2s", "action": "outage", "all": True, "direction": "downlink",
         "for": "15s"},
        {"round": 2, "action": "partition", "cell": "tower", "for": "1min"},
        {"round": 2, "phase": "report", "action": "device_crash", "device": "rpi4-1", "for": "5s"},
        {"at": 3, "action": "device_leave", "device": "rpi4-0"},
        {"round": 3, "action": "device_join", "device": "rpi4-0"},
        {"round": 1, "action": "board_reset", "device": BOARD},
        {"at": "10s", "action": "broker_restart"},
        {"round": 3, "action": "server_restart"},
        {"round": 0, "phase": "delivery", "action": "corrupt", "device": "rpi4-1", "chunks": 3, "bits": 4},
        {"round": 0, "action": "duplicate", "all": True, "chunks": 2},
        {"round": 0, "action": "reorder", "cell": "tower", "chunks": 5},
    ]))
    assert [event.action for event in scenario.events] == list(EVENT_ACTIONS)
    link, outage = scenario.events[0], scenario.events[1]
    assert isinstance(link, LinkEvent) and isinstance(outage, OutageEvent)
    assert (link.at_s, link.duration_s, link.direction, link.round_phase) == (1.5, 20.0, "both", "publish")
    assert link.set.changed_fields() == {"rate_bps": 10_000.0, "loss": 0.05}
    assert link.parameters() == {"set": {"rate": 10_000.0, "loss": 0.05}, "direction": "both", "for": 20.0}
    assert (outage.round, outage.round_phase, outage.offset_s, outage.target()) == (1, "delivery", 2.0, {"all": True})
    assert scenario.events[4].offset_s == 0.0 and scenario.events[4].duration_s is None
    broker = scenario.events[7]
    assert isinstance(broker, BrokerRestartEvent) and broker.duration_s == 3.0 and broker.target() is None
    assert isinstance(scenario.events[6], BoardResetEvent)
    assert scenario.events[9].parameters() == {"chunks": 3, "bits": 4}
    assert target_device_ids(scenario.events[1], scenario) == [*EMULATED, BOARD]
    assert target_device_ids(scenario.events[2], scenario) == [IN_CELL]
    assert target_device_ids(broker, scenario) == []


def test_a_link_change_can_name_a_profile_and_a_gilbert_elliott_loss():
    scenario = parse_scenario(raw([{"at": 0, "action": "link", "cell": "tower", "direction": "uplink",
                                    "set": {"profile": "nb-iot", "gilbert_elliott": {"p": "1%", "r": "20%"}}}]))
    change = scenario.events[0].set
    assert change.profile == "nb-iot" and change.gilbert_elliott.p == pytest.approx(0.01)
    assert set(change.changed_fields()) == {"profile", "gilbert_elliott"}


def test_the_dump_writes_only_what_the_event_says():
    scenario = parse_scenario(raw([{"at": "1s", "action": "link", "device": "rpi4-0", "set": {"delay": "300ms"}},
                                   {"round": 1, "action": "duplicate", "device": "rpi4-1", "chunks": 2}]))
    events = yaml.safe_load(scenario.to_yaml())["events"]
    assert events[0] == {"action": "link", "at": 1.0, "device": "rpi4-0", "set": {"delay": 0.3}, "direction": "both"}
    assert events[1] == {"action": "duplicate", "round": 1, "device": "rpi4-1", "chunks": 2}


@pytest.mark.parametrize(("event", "field", "shown"), [
    ({"at": "1s"}, "events.0.action", "say what the event does"),
    ({"at": "1s", "action": "explode"}, "events.0.action", "'explode'"),
    ("link", "events.0", "a mapping"),
    ({"action": "server_restart"}, "events.0", "say when"),
    ({"action": "server_restart", "at": "1s", "round": 1}, "events.0", "not both"),
    ({"action": "server_restart", "at": "1s", "phase": "report"}, "events.0.phase", "'report'"),
    ({"action": "server_restart", "at": "1s", "after": "2s"}, "events.0.after", "'2s'"),
    ({"action": "server_restart", "at": -5}, "events.0.at", "-5"),
    ({"action": "server_restart", "at": "-5s"}, "events.0.at", "-5s"),
    ({"action": "server_restart", "round": -1}, "events.0.round", "-1"),
    ({"action": "server_restart", "round": ROUNDS}, "events.0.round", f"got {ROUNDS}"),
    ({"action": "server_restart", "round": True}, "events.0.round", "True"),
    ({"action": "server_restart", "round": 1, "phase": "lunch"}, "events.0.phase", "'lunch'"),
    ({"action": "server_restart", "round": 1, "after": "soon"}, "events.0.after", "'soon'"),
    ({"action": "server_restart", "round": 1, "for": "3s"}, "events.0.for", "'3s'"),
    ({"action": "server_restart", "round": 1, "device": "rpi4-0"}, "events.0.device", "unknown field"),
    ({"action": "broker_restart", "round": 1, "for": 0}, "events.0.for", "positive"),
    ({"action": "outage", "round": 1, "device": "rpi4-0"}, "events.0.for", "Field required"),
    ({"action": "outage", "round": 1, "device": "rpi4-0", "for": "-2s"}, "events.0.for", "'-2s'"),
    ({"action": "outage", "round": 1, "device": "rpi4-0", "for": "2s", "direction": "up"}, "events.0.direction",
     "'up'"),
    ({"action": "partition", "round": 1, "for": "2s"}, "events.0", "exactly one target"),
    ({"action": "partition", "round": 1, "for": "2s", "device": "rpi4-0", "cell": "tower"}, "events.0",
     "'device' and 'cell'"),
    ({"action": "partition", "round": 1, "for": "2s", "all": False}, "events.0", "exactly one target"),
    ({"action": "partition", "round": 1, "for": "2s", "device": "rpi9"}, "events.0.device", "'rpi9'"),
    ({"action": "partition", "round": 1, "for": "2s", "cell": "moon"}, "events.0.cell", "'moon'"),
    ({"action": "link", "round": 1, "device": "rpi4-0"}, "events.0.set", "Field required"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {}}, "events.0.set", "at least one link field"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {"rate": "fast"}}, "events.0.set.rate", "'fast'"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {"loss": "100%"}}, "events.0.set.loss", "'100%'"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {"rate": None}}, "events.0.set.rate", "None"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {"bandwidth": 1}}, "events.0.set.bandwidth",
     "unknown field"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {"profile": "pigeon"}}, "events.0.set.profile",
     "'pigeon'"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {"loss": "1%", "gilbert_elliott": {"p": "1%"}}},
     "events.0.set", "not both"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {"queue": "10KiB"}}, "events.0.set.queue",
     "packet level"),
    ({"action": "link", "round": 1, "device": IN_CELL, "set": {"rate": "1kbit"}}, "events.0.device", "cell: tower"),
    ({"action": "link", "round": 1, "device": "rpi4-0", "set": {"rate": "1kbit"}, "for": "0ms"}, "events.0.for",
     "positive"),
    ({"action": "device_crash", "round": 1, "device": BOARD}, "events.0.device", "board_reset"),
    ({"action": "device_join", "round": 1, "device": "rpi4-0"}, "events.0.device", "never leaves"),
    ({"action": "device_leave", "round": 1, "device": "rpi4-0", "for": "3s"}, "events.0.for", "device_join"),
    ({"action": "board_reset", "round": 1, "device": "rpi4-0"}, "events.0.device", "its serial boards: bench-pi"),
    ({"action": "device_leave", "round": 1, "device": BOARD}, "events.0.device", "board_reset"),
    ({"action": "board_reset", "round": 1, "all": True}, "events.0", "give 'device: NAME'"),
    ({"action": "corrupt", "round": 1, "device": "rpi4-0", "chunks": 0}, "events.0.chunks", "0"),
    ({"action": "corrupt", "round": 1, "device": "rpi4-0", "chunks": 1, "bits": 0}, "events.0.bits", "0"),
    ({"action": "corrupt", "round": 1, "device": "rpi4-0", "chunks": 1, "bits": 8193}, "events.0.bits", "8192 bits"),
    ({"action": "corrupt", "round": 1, "device": "rpi4-0", "chunks": 1, "for": "1s"}, "events.0.for", "chunks"),
    ({"action": "duplicate", "round": 1, "device": "rpi4-0"}, "events.0.chunks", "Field required"),
    ({"action": "reorder", "round": 1, "device": "rpi4-0", "chunks": 1}, "events.0.chunks", "1"),
])
def test_a_bad_event_is_one_error_naming_its_field(event: Any, field: str, shown: str):
    lines = error_lines(raw([event]))
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{field}:"), lines
    assert shown in lines[0], lines


def test_a_board_reset_in_a_scenario_without_serial_boards_says_it_has_none(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]):
    from testbed.cli import EXIT_BAD_SCENARIO, main

    data = raw([{"action": "board_reset", "round": 1, "device": "rpi4-0"}])
    data["devices"] = data["devices"][:1]
    lines = error_lines(data)
    assert len(lines) == 1 and lines[0].startswith("events.0.device: board_reset drops the line of a serial board"), lines
    assert "this scenario has none" in lines[0] and "'rpi4-0' is emulated" in lines[0], lines
    path = tmp_path / "no-boards.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["validate", str(path)]) == EXIT_BAD_SCENARIO
    captured = capsys.readouterr()
    output = " ".join((captured.out + captured.err).split())  # undo the console's line wrapping
    assert "events.0.device: board_reset drops the line of a serial board" in output, output


def test_events_that_is_not_a_list():
    lines = error_lines(raw({"at": "1s"}))  # type: ignore[arg-type]
    assert len(lines) == 1 and lines[0].startswith("events:"), lines


def test_each_bad_event_is_its_own_error_at_its_index():
    lines = error_lines(raw([
        {"action": "server_restart", "round": 0},
        {"action": "server_restart", "round": 9},
        {"action": "outage", "at": "1s", "device": "nobody", "for": "1s"},
    ]))
    assert [line.split(":")[0] for line in lines] == ["events.1.round", "events.2.device"], lines


def test_an_override_reaches_an_event():
    data = raw([{"action": "outage", "round": 1, "all": True, "for": "2s"}])
    assert parse_scenario(data, overrides=["events.0.for=30s"]).events[0].duration_s == 30.0
    with pytest.raises(ScenarioError, match="events.0.round"):
        parse_scenario(data, "x.yaml", ["events.0.round=12"])


# ---------------------------------------------------------------- properties

_durations = st.one_of(
    st.integers(min_value=0, max_value=3600),
    st.floats(min_value=0, max_value=3600, allow_nan=False),
    st.integers(min_value=0, max_value=10**6).map(lambda ms: f"{ms}ms"),
    st.integers(min_value=0, max_value=600).map(lambda s: f"{s}s"),
)
_positive_durations = st.integers(min_value=1, max_value=10**5).map(lambda ms: f"{ms}ms")


@st.composite
def _timing(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.booleans()):
        return {"at": draw(_durations)}
    timing: dict[str, Any] = {"round": draw(st.integers(min_value=0, max_value=ROUNDS - 1))}
    if draw(st.booleans()):
        timing["phase"] = draw(st.sampled_from(["publish", "delivery", "report"]))
    if draw(st.booleans()):
        timing["after"] = draw(_durations)
    return timing


def _target(devices: list[str], cell: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    choices = [st.sampled_from(devices).map(lambda device: {"device": device}), st.just({"all": True})]
    return st.one_of(*choices, *([st.just({"cell": "tower"})] if cell else []))


_link_changes = st.fixed_dictionaries({}, optional={
    "rate": st.integers(min_value=1, max_value=10**6).map(lambda kbit: f"{kbit}kbit"),
    "delay": _durations, "jitter": _durations,
    "loss": st.integers(min_value=0, max_value=99).map(lambda percent: f"{percent}%"),
    "duplicate": st.floats(min_value=0, max_value=1), "delay_distribution": st.sampled_from(["uniform", "pareto"]),
    "profile": st.sampled_from(["nb-iot", "lora-sf7", "wifi-weak"]),
}).filter(bool)
_direction = st.fixed_dictionaries({}, optional={"direction": st.sampled_from(["both", "downlink", "uplink"])})
_maybe_for = st.fixed_dictionaries({}, optional={"for": _positive_durations})


def _action(draw: st.DrawFn) -> dict[str, Any]:
    action = draw(st.sampled_from([name for name in EVENT_ACTIONS if name != "device_join"]))
    fields: dict[str, Any] = {"action": action}
    if action == "link":
        fields |= {**draw(_target(["rpi4-0", "rpi4-1", BOARD])), "set": draw(_link_changes), **draw(_direction),
                   **draw(_maybe_for)}
    elif action in ("outage", "partition"):
        fields |= {**draw(_target([*EMULATED, BOARD])), **draw(_direction), "for": draw(_positive_durations)}
    elif action == "device_crash":
        fields |= {**draw(_target(EMULATED)), **draw(_maybe_for)}
    elif action == "device_leave":
        fields |= draw(_target(EMULATED))
    elif action == "board_reset":
        fields |= {"device": BOARD, **draw(_maybe_for)}
    elif action == "broker_restart":
        fields |= draw(_maybe_for)
    elif action in ("corrupt", "duplicate", "reorder"):
        fields |= {**draw(_target([*EMULATED, BOARD])), "chunks": draw(st.integers(min_value=2, max_value=100))}
        if action == "corrupt" and draw(st.booleans()):
            fields["bits"] = draw(st.integers(min_value=1, max_value=8192))
    return fields


@st.composite
def _events(draw: st.DrawFn) -> list[dict[str, Any]]:
    events = [{**draw(_timing()), **_action(draw)} for _ in range(draw(st.integers(min_value=0, max_value=6)))]
    if draw(st.booleans()):  # churn: everyone leaves, then a device (or everyone) joins
        events += [{"at": "1s", "action": "device_leave", "all": True},
                   {**draw(_timing()), "action": "device_join", **draw(_target(EMULATED))}]
    return events


@settings(max_examples=150, deadline=None)
@given(_events())
def test_valid_events_round_trip_through_the_dump(events: list[dict[str, Any]]):
    scenario = parse_scenario(raw(events))
    again = parse_scenario(yaml.safe_load(scenario.to_yaml()))
    assert again == scenario
    for before, after in zip(scenario.events, again.events):
        assert type(before) is type(after)
        assert (before.target(), before.parameters()) == (after.target(), after.parameters())
        if isinstance(before, LinkEvent):
            assert before.set.changed_fields() == after.set.changed_fields()


_BREAKAGES = {  # name -> (change to an event, the field the one error names)
    "round beyond the run": (lambda event: {**{k: v for k, v in event.items() if k != "at"}, "round": ROUNDS + 3},
                             "round"),
    "negative time": (lambda event: {**{k: v for k, v in event.items() if k not in ("round", "phase", "after")},
                                     "at": -1}, "at"),
    "unknown key": (lambda event: {**event, "colour": "red"}, "colour"),
    "no action": (lambda event: {k: v for k, v in event.items() if k != "action"}, "action"),
}


@settings(max_examples=150, deadline=None)
@given(_events().filter(bool), st.data(), st.sampled_from(sorted(_BREAKAGES)))
def test_one_broken_event_is_one_error_naming_its_path(events: list[dict[str, Any]], data: st.DataObject,
                                                       breakage: str):
    index = data.draw(st.integers(min_value=0, max_value=len(events) - 1))
    if events[index]["action"] == "device_leave" and breakage == "no action":
        events = [event for event in events if event["action"] != "device_join"]  # a join needs its leave
        index = min(index, len(events) - 1)
    change, field = _BREAKAGES[breakage]
    events[index] = change(copy.deepcopy(events[index]))
    lines = error_lines(raw(events))
    assert len(lines) == 1, (events[index], lines)
    assert lines[0].startswith(f"events.{index}.{field}:"), (events[index], lines)


_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                       lambda children: st.lists(children, max_size=3)
                       | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=6)
_keys = st.sampled_from(["action", "at", "round", "phase", "after", "for", "device", "cell", "all", "set",
                         "direction", "chunks", "bits", "extra"])


@settings(max_examples=300, deadline=None)
@given(_events(), st.lists(st.tuples(st.integers(min_value=0, max_value=7), _keys, _values), max_size=4))
def test_any_mutation_of_events_is_a_scenario_or_one_scenario_error(events: list[dict[str, Any]], changes: Any):
    for index, key, value in changes:
        if index < len(events):
            events[index][key] = value
    try:
        parse_scenario(raw(events), "x.yaml")
    except ScenarioError:
        pass


# ---------------------------------------------------------------- the command and the layers


def test_testbed_validate_reads_events_and_refuses_a_bad_one_with_exit_2(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(raw([{"round": 1, "action": "outage", "all": True, "for": "5s"}])))
    done = subprocess.run([sys.executable, "-m", "testbed.cli", "validate", str(good)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "action: outage" in done.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw([{"round": 9, "action": "outage", "all": True, "for": "5s"}])))
    done = subprocess.run([sys.executable, "-m", "testbed.cli", "validate", str(bad)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "events.0.round" in done.stdout + done.stderr


@pytest.mark.parametrize("first", ["testbed.core.events", "testbed.core.scenario", "testbed.core.event_checks"])
def test_any_of_the_modules_can_be_imported_first(first: str):
    code = (f"import {first}; from testbed.core.scenario import parse_scenario; "
            "print(parse_scenario({'name': 'x', 'rounds': 1, 'devices': [{'profile': 'rpi4', 'count': 1}], "
            "'events': [{'at': 1, 'action': 'server_restart'}]}).events[0].action)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "server_restart", done.stderr
