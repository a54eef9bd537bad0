"""Run records: a device's results.jsonl record per round, its standing, and summary.json, from typed reports."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from testbed.core.messages import DeviceReport
from testbed.core.scenario import parse_scenario
from testbed.run_summary import REPORT_FIELDS_IN_RECORDS, RoundRecord, RunRecords

SCENARIO = parse_scenario({"name": "records", "seed": 5, "rounds": 2,
                           "devices": [{"name": "dev-a", "profile": "rpi4"}, {"name": "dev-b", "profile": "rpi4"}]})
HASH = "ab" * 32


def outcome(version: int, sent: bool = True) -> Any:
    return SimpleNamespace(version=version, sent=sent)


def report(version: int, weights_hash: str = HASH) -> DeviceReport:
    phases = {"receive": 1.0, "transmit": 0.5, "compute": 0.25, "idle": 2.0}
    return DeviceReport(device="dev-a", profile="rpi4", round=version - 1, version=version, weights_hash=weights_hash,
                        accuracy=0.75, update_bytes=100, received_bytes=150, transmitted_bytes=40,
                        total_received_bytes=1000 * version, delivery_seconds=1.5, apply_seconds=0.01,
                        evaluate_seconds=0.02, energy_joules=3.75, energy_joules_by_phase=phases, phase_seconds=phases,
                        total_energy_joules=4.0 * version, rejected_updates=1)


def records() -> RunRecords:
    return RunRecords(SCENARIO, "run-1", SCENARIO.device_profiles())


def test_a_report_becomes_a_record_with_the_report_fields_in_order_and_the_hash_check() -> None:
    run = records()
    record = run.device_record(0, outcome(1), "dev-a", report(1), HASH)
    assert list(record) == ["run", "round", "device", "profile", "server_version", "update_sent", "delivered",
                            *REPORT_FIELDS_IN_RECORDS, "hash_matches_server"]
    assert record["delivered"] is True and record["hash_matches_server"] is True
    assert record["accuracy"] == 0.75 and record["energy_joules_by_phase"]["idle"] == 2.0
    assert run.device_record(1, outcome(2), "dev-a", report(2, "cd" * 32), HASH)["hash_matches_server"] is False


def test_the_standing_is_what_the_device_last_reported_whatever_its_version() -> None:
    run = records()
    run.note_report(report(4))
    assert run.held_version("dev-a") == 4 and run.held_version("dev-b") == 0
    run.note_report(report(1, "cd" * 32))  # a device that went back, or says so: the summary says what it said
    summary = run.summary(4, HASH, 10)["devices"]["dev-a"]
    assert (summary["final_version"], summary["weights_hash"], summary["hash_matches_server"]) == (1, "cd" * 32, False)


def test_a_missing_report_counts_as_missed_only_when_something_was_sent() -> None:
    run = records()
    assert run.device_record(0, outcome(1), "dev-b", None, HASH) == {
        "run": "run-1", "round": 0, "device": "dev-b", "profile": "rpi4", "server_version": 1, "update_sent": True,
        "delivered": False}
    run.device_record(1, outcome(1, sent=False), "dev-b", None, HASH)
    assert run.devices["dev-b"].rounds_missed == 1


def test_summary_keeps_its_fields_and_the_device_standings() -> None:
    run = records()
    run.note_report(report(1))
    run.device_record(0, outcome(1), "dev-a", report(1), HASH)
    run.rounds.append(RoundRecord(round=0, version=1, sent=True, base_version=None, reinitialised=False,
                                  server_accuracy=0.8, validation_accuracy=0.79, update_bytes=10, full_model_bytes=100,
                                  index_bits=0, selected_weights=None, partial_weights=50, training_samples=200,
                                  training_seconds=0.5))
    summary = run.summary(1, HASH, 10)
    assert list(summary) == ["scenario", "run_id", "seed", "strategy", "ratio", "rounds", "devices", "pushgateway",
                             "server", "interrupted", "rounds_planned"]
    assert (summary["interrupted"], summary["rounds_planned"]) == (False, 1)
    assert summary["devices"]["dev-a"] == {"profile": "rpi4", "final_version": 1, "final_accuracy": 0.75,
                                           "energy_joules": 4.0, "bytes_received": 1000, "weights_hash": HASH,
                                           "rounds_missed": 0, "rejected_updates": 1, "rejected_by_reason": {},
                                           "hash_matches_server": True}
    assert summary["devices"]["dev-b"]["hash_matches_server"] is False
    assert summary["pushgateway"] is None
    assert summary["server"] == {"final_version": 1, "final_accuracy": 0.8, "weights_hash": HASH, "published_bytes": 10}
    assert summary["rounds"][0]["round_seconds"] == 0.0
