"""What a run keeps: one record per device per round (results.jsonl), the rounds and devices of summary.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.update_server import RoundOutcome
from testbed.core.messages import DeviceReport
from testbed.core.scenario import Scenario
from testbed.errors import OrchestrationError

REPORT_FIELDS_IN_RECORDS = (
    "version", "accuracy", "energy_joules", "energy_joules_by_phase", "phase_seconds",
    "delivery_seconds", "received_bytes", "transmitted_bytes", "update_bytes",
    "apply_seconds", "evaluate_seconds", "weights_hash", "rejected_updates",
)
"""The fields of a device's report copied into its results.jsonl record, in this order."""


def host_facts(started_at: float, wall_seconds: float) -> dict[str, Any]:
    """Where and when the run ran, and with what: summary.json's `host` (every field host-dependent)."""
    import os
    import platform
    import socket
    import time
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_at)),
        "wall_seconds": round(wall_seconds, 3),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "edge_testbed": installed("edge-testbed"),
        "torch": installed("torch"),
        **event_loops(),
    }


def event_loops() -> dict[str, str]:
    """The run's event loop, and the one its fleet workers take (testbed.event_loop): host-dependent, like the rest."""
    from testbed.event_loop import chosen_loop, fleet_loop_default, running_loop_name

    return {"event_loop": running_loop_name(), "fleet_event_loop": chosen_loop(unset=fleet_loop_default())}


class RunError(OrchestrationError):
    """A run that could not complete (devices missing, a broker that went away, ...)."""


@dataclass
class RoundRecord:
    """The server's side of one round, as kept in summary.json."""

    round: int
    version: int
    sent: bool
    base_version: int | None
    reinitialised: bool
    server_accuracy: float
    validation_accuracy: float
    update_bytes: int
    full_model_bytes: int
    index_bits: int
    selected_weights: int | None
    partial_weights: int
    training_samples: int
    training_seconds: float
    round_seconds: float = 0.0
    devices_updated: int = 0
    timing: dict[str, Any] | None = None
    """How late the links released segments in the round (testbed.timing_report.TimingVerdict.to_dict)."""


@dataclass
class RunResult:
    """Where the results went and what they say."""

    out_dir: Path
    summary: dict[str, Any]
    metrics_url: str | None = None
    rounds: list[RoundRecord] = field(default_factory=list)


@dataclass
class DeviceTally:
    """A device's standing at the end of the rounds so far (its entry in summary.json, in this field order)."""

    profile: str
    final_version: int = 0
    final_accuracy: float | None = None
    energy_joules: float = 0.0
    bytes_received: int = 0
    weights_hash: str | None = None
    rounds_missed: int = 0
    rejected_updates: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)


@dataclass
class PushTally:
    """Pushes to the scenario's Pushgateway: how many went through and what the failed ones said."""

    pushes: int = 0
    errors: list[str] = field(default_factory=list)


class RunRecords:
    """The rounds and device standings of one run; builds the results.jsonl records and summary.json."""

    def __init__(self, scenario: Scenario, run_id: str, profiles: dict[str, str]) -> None:
        self.scenario = scenario
        self.run_id = run_id
        self.profiles = profiles
        self.rounds: list[RoundRecord] = []
        self.devices = {device_id: DeviceTally(profile) for device_id, profile in profiles.items()}
        self.pushgateway = PushTally()

    def to_saveable(self) -> dict[str, Any]:
        """The rounds so far, every device's standing and the pushes, as JSON-able data (a run's checkpoint)."""
        return {"rounds": [vars(record) for record in self.rounds],
                "devices": {device_id: vars(tally) for device_id, tally in self.devices.items()},
                "pushgateway": vars(self.pushgateway)}

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from what `to_saveable` kept (a resumed run's summary covers every round)."""
        self.rounds = [RoundRecord(**record) for record in saved["rounds"]]
        self.devices.update({device_id: DeviceTally(**tally) for device_id, tally in saved["devices"].items()
                             if device_id in self.devices})
        self.pushgateway = PushTally(**saved["pushgateway"])

    def held_version(self, device_id: str) -> int:
        """The version `device_id` last reported holding (0 before any report)."""
        return self.devices[device_id].final_version

    def note_report(self, report: DeviceReport) -> None:
        """What a device last said it holds (any version, any round) is its standing in the summary."""
        tally = self.devices.get(report.device)
        if tally is None:
            return
        tally.final_version, tally.final_accuracy = report.version, report.accuracy
        tally.energy_joules, tally.bytes_received = report.total_energy_joules, report.total_received_bytes
        tally.weights_hash = report.weights_hash
        tally.rejected_updates = report.rejected_updates
        tally.rejected_by_reason = dict(report.rejected_by_reason or {})

    def device_record(self, round_index: int, outcome: RoundOutcome, device_id: str,
                      report: DeviceReport | None, expected_hash: str) -> dict[str, Any]:
        """The results.jsonl record of `device_id` in this round; a report also updates its standing."""
        tally = self.devices[device_id]
        record: dict[str, Any] = {"run": self.run_id, "round": round_index, "device": device_id,
                                  "profile": self.profiles[device_id], "server_version": outcome.version,
                                  "update_sent": outcome.sent, "delivered": report is not None}
        if report is None:
            if outcome.sent:
                tally.rounds_missed += 1
            return record
        record.update({name: getattr(report, name) for name in REPORT_FIELDS_IN_RECORDS})
        record["hash_matches_server"] = report.weights_hash == expected_hash
        return record

    def summary(self, final_version: int, final_hash: str, published_bytes: int, interrupted: bool = False,
                rounds_planned: int | None = None) -> dict[str, Any]:
        """summary.json: the scenario, every round, every device's standing, pushes and the server's final model;
        `interrupted` when Ctrl-C ended the run after the rounds recorded (of `rounds_planned`)."""
        scenario = self.scenario
        return {
            "scenario": scenario.name,
            "run_id": self.run_id,
            "seed": scenario.seed,
            "strategy": scenario.update.strategy,
            "ratio": scenario.update.ratio,
            "rounds": [vars(record) for record in self.rounds],
            "devices": {
                device_id: {**vars(tally), "hash_matches_server": tally.weights_hash == final_hash}
                for device_id, tally in self.devices.items()
            },
            "pushgateway": None if scenario.metrics.pushgateway is None else {
                "url": scenario.metrics.pushgateway, "pushes": self.pushgateway.pushes,
                "errors": self.pushgateway.errors,
            },
            "server": {
                "final_version": final_version,
                "final_accuracy": self.rounds[-1].server_accuracy if self.rounds else None,
                "weights_hash": final_hash,
                "published_bytes": published_bytes,
            },
            "interrupted": interrupted,
            "rounds_planned": len(self.rounds) if rounds_planned is None else rounds_planned,
        }
