"""The event schedule fires each event once however time and rounds are stepped; events.jsonl records each fire and end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.core.events import EVENT_PHASES
from testbed.core.scenario import Scenario, parse_scenario
from testbed.events import EVENTS_FILE, EventRecorder, EventSchedule, FiredEvent, read_events
from testbed.metrics import RunMetrics

ROUNDS = 5
MARKS = [(round_index, phase) for round_index in range(ROUNDS) for phase in EVENT_PHASES]


def scenario(events: list[dict[str, Any]]) -> Scenario:
    return parse_scenario({"name": "schedule", "rounds": ROUNDS, "devices": [{"profile": "rpi4", "count": 2}],
                           "events": events})


def test_timed_events_fire_at_their_time_in_scenario_order():
    schedule = EventSchedule(scenario([
        {"at": "10s", "action": "broker_restart", "for": "3s"},
        {"at": "2s", "action": "server_restart"},
        {"at": "10s", "action": "outage", "device": "rpi4-0", "for": "5s"},
    ]).events)
    assert schedule.next_due_s() == 2.0
    assert schedule.due(1.9) == []
    assert [(f.index, f.kind) for f in schedule.due(2.0)] == [(1, "fire")]
    assert schedule.due(5.0) == []
    fired = schedule.due(10.5)
    assert [(f.index, f.kind, f.due_s, f.t_s) for f in fired] == [(0, "fire", 10.0, 10.5), (2, "fire", 10.0, 10.5)]
    assert schedule.next_due_s() == 13.5  # `for:` counts from when the event really fired
    assert [(f.index, f.kind) for f in schedule.due(100.0)] == [(0, "end"), (2, "end")]
    assert schedule.finished and schedule.next_due_s() is None
    assert schedule.due(200.0) == []


def test_round_events_wait_for_their_phase_and_offset():
    schedule = EventSchedule(scenario([
        {"round": 1, "phase": "delivery", "after": "2s", "action": "outage", "all": True, "for": "4s"},
        {"round": 1, "action": "server_restart"},
        {"round": 3, "phase": "report", "action": "duplicate", "device": "rpi4-1", "chunks": 2},
    ]).events)
    assert schedule.next_due_s() is None  # nothing until a round is reached
    assert schedule.phase_reached(0, "publish", 1.0) == []
    assert [(f.index, f.round, f.phase) for f in schedule.phase_reached(1, "publish", 20.0)] == [(1, 1, "publish")]
    assert schedule.phase_reached(1, "delivery", 21.0) == []
    assert schedule.next_due_s() == 23.0
    outage = schedule.due(23.0)
    assert [(f.index, f.kind, f.round, f.phase) for f in outage] == [(0, "fire", 1, "delivery")]
    assert [(f.index, f.kind) for f in schedule.phase_reached(2, "publish", 27.5)] == [(0, "end")]
    # reaching a later round passes every earlier phase: round 3's report event fires on round 4's publish
    assert [(f.index, f.kind) for f in schedule.phase_reached(4, "publish", 40.0)] == [(2, "fire")]
    assert schedule.finished


def test_a_repeated_round_does_not_fire_again_and_an_end_comes_before_a_fire_at_one_time():
    schedule = EventSchedule(scenario([
        {"round": 2, "action": "link", "device": "rpi4-0", "set": {"rate": "1kbit"}, "for": "10s"},
        {"at": "15s", "action": "link", "device": "rpi4-0", "set": {"rate": "2kbit"}},
    ]).events)
    assert [f.index for f in schedule.phase_reached(2, "publish", 5.0)] == [0]
    assert schedule.phase_reached(1, "publish", 6.0) == []  # the server went back a round (a restart)
    assert schedule.phase_reached(2, "publish", 7.0) == []
    assert schedule.reached == (2, "publish")
    assert [(f.index, f.kind) for f in schedule.due(15.0)] == [(0, "end"), (1, "fire")]


def test_end_all_restores_what_is_still_in_force():
    schedule = EventSchedule(scenario([{"at": 0, "action": "partition", "all": True, "for": "1h"},
                                       {"at": "2h", "action": "server_restart"}]).events)
    assert [f.kind for f in schedule.due(1.0)] == ["fire"]
    ends = schedule.end_all(30.0)
    assert [(f.index, f.kind, f.due_s, f.t_s) for f in ends] == [(0, "end", 3601.0, 30.0)]
    assert schedule.end_all(31.0) == [] and schedule.next_due_s() == 7200.0  # never-fired events stay unfired


# ---------------------------------------------------------------- the property: any stepping


_time_events = st.fixed_dictionaries(
    {"at": st.integers(min_value=0, max_value=120_000).map(lambda ms: f"{ms}ms")},
    optional={"for": st.integers(min_value=1, max_value=60_000).map(lambda ms: f"{ms}ms")})
_round_events = st.fixed_dictionaries(
    {"round": st.integers(min_value=0, max_value=ROUNDS - 1)},
    optional={"phase": st.sampled_from(EVENT_PHASES), "after": st.integers(min_value=0, max_value=30),
              "for": st.integers(min_value=1, max_value=60)})
_events = st.lists(st.one_of(_time_events, _round_events).map(
    lambda timing: {**timing, "action": "outage" if "for" in timing else "server_restart",
                    **({"all": True} if "for" in timing else {})}), max_size=12)
# a step: advance the clock by some seconds, or reach a (round, phase) mark: the next, a later one, or an earlier one
_steps = st.lists(st.one_of(st.floats(min_value=0, max_value=40).map(lambda dt: ("time", dt)),
                            st.integers(min_value=-3, max_value=4).map(lambda jump: ("mark", jump))), max_size=40)


def _run(events: list[Any], steps: list[tuple[str, float]]) -> tuple[list[list[FiredEvent]], EventSchedule]:
    schedule = EventSchedule(events)
    now, mark, calls = 0.0, -1, []
    for kind, amount in steps:
        if kind == "time":
            now += amount
            calls.append(schedule.due(now))
        else:
            mark = max(0, min(len(MARKS) - 1, mark + int(amount)))
            calls.append(schedule.phase_reached(*MARKS[mark], now))
    calls.append(schedule.phase_reached(*MARKS[-1], now))  # the run reaches its last phase ...
    while schedule.next_due_s() is not None:  # ... and waits for whatever is still due
        now = max(now, schedule.next_due_s())
        calls.append(schedule.due(now))
    return calls, schedule


@settings(max_examples=300, deadline=None)
@given(_events, _steps)
def test_every_event_fires_once_and_ends_once_after_it_fired_however_time_and_rounds_step(events, steps):
    parsed = scenario(events).events
    calls, schedule = _run(parsed, steps)
    handed_out = [fired for call in calls for fired in call]
    fires = {f.index: f for f in handed_out if f.kind == "fire"}
    ends = {f.index: f for f in handed_out if f.kind == "end"}
    assert sorted(f.index for f in handed_out if f.kind == "fire") == list(range(len(parsed)))  # each once
    assert sorted(f.index for f in handed_out if f.kind == "end") == sorted(
        index for index, event in enumerate(parsed) if event.duration_s is not None)
    for index, end in ends.items():
        fire = fires[index]
        assert handed_out.index(end) > handed_out.index(fire)
        assert end.due_s == pytest.approx(fire.t_s + parsed[index].duration_s)
        assert end.t_s >= end.due_s
    for index, fire in fires.items():
        event = parsed[index]
        assert fire.t_s >= fire.due_s
        if event.at_s is not None:
            assert fire.due_s == event.at_s
        else:  # not before the run reached its round and phase
            assert (fire.round, EVENT_PHASES.index(fire.phase)) >= (event.round, EVENT_PHASES.index(event.round_phase))
    for call in calls:  # each answer in order: by time, ends before fires, then scenario order
        assert call == sorted(call, key=lambda f: (f.due_s, f.kind != "end", f.index))
    assert schedule.finished


@settings(max_examples=100, deadline=None)
@given(_events, _steps, _steps)
def test_two_steppings_hand_out_the_same_fires_and_ends(events, some_steps, other_steps):
    parsed = scenario(events).events
    first, _ = _run(parsed, some_steps)
    second, _ = _run(parsed, other_steps)
    assert sorted((f.index, f.kind) for call in first for f in call) == \
        sorted((f.index, f.kind) for call in second for f in call)


# ---------------------------------------------------------------- events.jsonl and the metric


def test_the_recorder_writes_one_json_line_per_fire_and_end_and_tells_its_listeners(tmp_path: Path):
    events = scenario([
        {"round": 0, "phase": "delivery", "action": "link", "device": "rpi4-0", "direction": "downlink",
         "set": {"rate": "10kbit", "delay": "300ms"}, "for": "20s"},
        {"at": "1s", "action": "broker_restart"},
        {"round": 1, "action": "corrupt", "all": True, "chunks": 3},
    ]).events
    schedule = EventSchedule(events)
    metrics = RunMetrics("run-7", "dpu")
    heard: list[FiredEvent] = []
    with EventRecorder(tmp_path / "out", listeners=[heard.append]) as recorder:
        recorder.add_listener(lambda fired: metrics.record_event(fired.action) if fired.kind == "fire" else None)
        recorder.record_all(schedule.due(1.25))
        recorder.record_all(schedule.phase_reached(0, "delivery", 2.5))
        recorder.record_all(schedule.phase_reached(1, "publish", 9.0))
        recorder.record_all(schedule.end_all(10.0))
    lines = (tmp_path / "out" / EVENTS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(heard) == 5
    assert records[0] == {"t": 1.25, "round": None, "phase": None, "action": "broker_restart", "target": None,
                          "parameters": {"for": 3.0}, "kind": "fire", "index": 1}
    assert records[1] == {"t": 2.5, "round": 0, "phase": "delivery", "action": "link", "target": {"device": "rpi4-0"},
                          "parameters": {"set": {"rate": 10_000.0, "delay": 0.3}, "direction": "downlink",
                                         "for": 20.0},
                          "kind": "fire", "index": 0}
    assert [(r["action"], r["kind"]) for r in records[2:]] == [
        ("broker_restart", "end"), ("corrupt", "fire"), ("link", "end")]
    assert records[3]["target"] == {"all": True} and records[3]["parameters"] == {"chunks": 3, "bits": 1}
    assert read_events(tmp_path / "out") == records
    value = metrics.registry.get_sample_value
    assert value("testbed_events_total", {"run": "run-7", "action": "link"}) == 1
    assert value("testbed_events_total", {"run": "run-7", "action": "broker_restart"}) == 1
    assert value("testbed_events_total", {"run": "run-7", "action": "corrupt"}) == 1
    assert "broker_restart" in heard[0].describe() and heard[2].describe().endswith("ends")


def test_the_recorder_appends_and_a_cut_last_line_is_not_a_record(tmp_path: Path):
    fired = EventSchedule(scenario([{"at": 0, "action": "server_restart"}]).events).due(0.0)
    for _ in range(2):
        with EventRecorder(tmp_path) as recorder:
            recorder.record_all(fired)
    assert len(read_events(tmp_path)) == 2
    with open(tmp_path / EVENTS_FILE, "a") as file:
        file.write('{"t": 3.0, "act')  # killed in the middle of a line
    assert len(read_events(tmp_path)) == 2
    assert read_events(tmp_path / "nowhere") == []


def test_recording_outside_the_with_block_is_refused(tmp_path: Path):
    fired = EventSchedule(scenario([{"at": 0, "action": "server_restart"}]).events).due(0.0)
    with pytest.raises(RuntimeError):
        EventRecorder(tmp_path).record(fired[0])
