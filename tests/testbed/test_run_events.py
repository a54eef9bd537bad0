"""A run with scenario events fires each at its time or round phase, records it in events.jsonl, counts it, and says
which actions it does not emulate yet."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from testbed.core.scenario import parse_scenario
from testbed.events import read_events
from testbed.runner import ScenarioRun

pytestmark = pytest.mark.timeout(240)

ROUNDS = 2


async def test_a_run_fires_records_and_counts_its_events_in_order(tmp_path: Path) -> None:
    scenario = parse_scenario({
        "name": "events", "seed": 3, "rounds": ROUNDS, "round_timeout": "90s",
        "data": {"initial_samples": 200, "new_samples_per_round": 60},
        "update": {"epochs": 2, "ratio": 0.1}, "model": {"hidden": [16]},
        "devices": [{"profile": "rpi4", "count": 2}],
        "metrics": {"enabled": False},
        "events": [
            {"at": "0s", "action": "corrupt", "device": "rpi4-1", "chunks": 1},
            {"round": 0, "action": "partition", "device": "rpi4-0", "direction": "uplink", "for": "500ms"},
            # a link change in force to the end of the run: its end comes when the run ends
            {"round": 1, "phase": "report", "action": "link", "all": True, "set": {"delay": "1ms"}, "for": "10min"},
            # a server restart in round 1's report phase: the round is repeated on the restored server
            {"round": 1, "phase": "report", "action": "server_restart"},
        ],
    })
    progress: list[tuple[str, dict[str, Any]]] = []
    run = ScenarioRun(scenario, tmp_path / "out", lambda event, data: progress.append((event, data)))
    result = await asyncio.wait_for(run.execute(), 200)

    records = read_events(tmp_path / "out")
    fires_and_ends = [(record["index"], record["kind"]) for record in records]
    assert sorted(fires_and_ends) == [(0, "fire"), (1, "end"), (1, "fire"), (2, "end"), (2, "fire"), (3, "fire")]
    assert fires_and_ends[0] == (0, "fire")  # due at 0 s, before round 0 publishes
    assert fires_and_ends.index((1, "fire")) < fires_and_ends.index((1, "end"))
    assert fires_and_ends[-1] == (2, "end")  # the link change lasts to the end of the run
    first_partition = records[fires_and_ends.index((1, "fire"))]
    assert (first_partition["round"], first_partition["phase"], first_partition["target"]) == (
        0, "publish", {"device": "rpi4-0"})
    link_change = records[fires_and_ends.index((2, "fire"))]
    assert (link_change["round"], link_change["phase"], link_change["target"]) == (1, "report", {"all": True})
    assert [record["t"] for record in records] == sorted(record["t"] for record in records)

    lines = [data["description"] for event, data in progress if event == "event"]
    assert len(lines) == len(records) and lines[-1].endswith("ends")
    for action, fires in (("corrupt", 1), ("partition", 1), ("link", 1), ("server_restart", 1)):
        assert run.metrics.registry.get_sample_value(
            "testbed_events_total", {"run": run.run_id, "action": action}) == fires
    warnings = [data["message"] for event, data in progress if event == "warning" and "not emulated" in
                data["message"]]
    assert warnings == []

    summary = result.summary
    for device_id, state in summary["devices"].items():
        assert (state["final_version"], state["hash_matches_server"]) == (summary["server"]["final_version"], True), \
            device_id
    assert summary["devices"]["rpi4-1"]["rejected_by_reason"] == {"bad_chunk": 1}  # its first chunk, repaired


async def test_a_run_without_events_writes_an_empty_record(tmp_path: Path) -> None:
    scenario = parse_scenario({
        "name": "no-events", "seed": 3, "rounds": 1, "data": {"initial_samples": 200, "new_samples_per_round": 60},
        "update": {"epochs": 1}, "model": {"hidden": [16]}, "devices": [{"profile": "rpi4", "count": 1}],
        "metrics": {"enabled": False},
    })
    await asyncio.wait_for(ScenarioRun(scenario, tmp_path / "out").execute(), 200)
    assert read_events(tmp_path / "out") == []
