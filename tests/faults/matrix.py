"""The fault matrix's small run and what every case asserts: each device ends on the server's final version and hash,
no update is ever partly applied, and every report reaches results.jsonl exactly once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.agent import DeviceAgent
from testbed.core.scenario import Scenario, parse_scenario
from testbed.core.wire import weights_hash
from testbed.device_actions import DeviceDowntime
from testbed.run_summary import RunResult
from testbed.runner import ScenarioRun

DEVICES = 3
ROUNDS = 3
RUN_TIMEOUT_S = 240.0
FAST_LINK = {"rate": "200kbit", "delay": "20ms"}
"""Each direction of every device's link unless a case says otherwise: an update (about 800 B) takes ~60 ms."""


def fault_scenario(events: list[dict[str, Any]], overrides: Sequence[str] = (),
                   channel: dict[str, Any] | None = None) -> Scenario:
    """A tiny model (digits, one hidden layer of 16) on 3 rpi4 devices for 3 rounds over fast links, 256 B chunks
    (an update is 4 chunks), with `events`; `channel` replaces the channel section, `overrides` are `--set`s."""
    return parse_scenario({
        "name": "faults", "seed": 6, "rounds": ROUNDS, "round_timeout": "60s",
        "data": {"initial_samples": 200, "new_samples_per_round": 60},
        "update": {"epochs": 2, "ratio": 0.1, "chunk_size": "256B"}, "model": {"hidden": [16]},
        "devices": [{"profile": "rpi4", "count": DEVICES}],
        "channel": channel or {"downlink": FAST_LINK, "uplink": FAST_LINK, "reset_after": "3s"},
        "metrics": {"enabled": False}, "events": events,
    }, overrides=list(overrides))


@dataclass
class FaultRun:
    """A finished run and what it said while it ran."""

    run: ScenarioRun
    result: RunResult
    progress: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.run.out_dir

    def said(self, kind: str) -> list[dict[str, Any]]:
        return [data for event, data in self.progress if event == kind]

    def event_warnings(self) -> list[str]:
        """Warnings about scenario events (not performed, or failed); other warnings (the host's load) are not."""
        return [data["message"] for data in self.said("warning") if data["message"].startswith("event ")]

    @property
    def downtime(self) -> DeviceDowntime:
        assert self.run.events is not None
        return self.run.events.handlers["device_crash"].downtime  # type: ignore[attr-defined]

    def agents(self) -> dict[str, DeviceAgent]:
        """The emulated devices as the run left them (a crashed or rejoined device: its latest agent)."""
        return {agent.device_id: agent for agent in self.downtime.fleet.agents if isinstance(agent, DeviceAgent)}

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (self.out / "results.jsonl").read_text().splitlines()]


async def run_faults(scenario: Scenario, out: Path) -> FaultRun:
    progress: list[tuple[str, dict[str, Any]]] = []
    run = ScenarioRun(scenario, out, lambda event, data: progress.append((event, data)))
    result = await asyncio.wait_for(run.execute(), RUN_TIMEOUT_S)
    return FaultRun(run, result, progress)


def assert_survived(faults: FaultRun, away: Collection[tuple[int, str]] = ()) -> None:
    """What every case of the matrix asserts; `away`: the (round, device) a device was gone for (no report)."""
    summary = faults.result.summary
    rounds = len(summary["rounds"])
    assert rounds == faults.run.scenario.rounds
    final_version, final_hash = summary["server"]["final_version"], summary["server"]["weights_hash"]
    for device_id, state in summary["devices"].items():  # what each device last reported
        assert (state["final_version"], state["hash_matches_server"]) == (final_version, True), (device_id, state)
    for device_id, agent in faults.agents().items():  # and what it holds
        assert (agent.state.version, weights_hash(agent.state.weights).hex()) == (final_version, final_hash), device_id
    records = faults.records()
    assert sorted((record["round"], record["device"]) for record in records) == sorted(
        (round_index, device_id) for round_index in range(rounds) for device_id in summary["devices"])
    sent = {record["round"]: record["sent"] for record in summary["rounds"]}
    for record in records:
        expected = sent[record["round"]] and (record["round"], record["device"]) not in away
        assert record["delivered"] == expected, record
        if record["delivered"]:  # never a partial apply: what a device reported holding is the server's version
            assert record["version"] == record["server_version"] and record["hash_matches_server"], record
