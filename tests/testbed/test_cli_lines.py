"""The console's round lines: what was sent, and a re-initialisation round says it was one."""

from __future__ import annotations

from testbed.cli import _round_line
from testbed.run_summary import RoundRecord


def record(sent: bool, reinitialised: bool) -> RoundRecord:
    return RoundRecord(round=3, version=3, sent=sent, base_version=0 if sent else None, reinitialised=reinitialised,
                       server_accuracy=0.919, validation_accuracy=0.928, update_bytes=4966 if sent else 0,
                       full_model_bytes=69028, index_bits=0, selected_weights=None, partial_weights=100,
                       training_samples=600, training_seconds=1.0, round_seconds=0.9, devices_updated=5 if sent else 0)


def test_a_withheld_reinitialisation_round_says_both() -> None:
    line = _round_line(record(sent=False, reinitialised=True), 5)
    assert line.startswith("round 3: server acc 0.919, nothing sent (the candidate validated 0.928, not enough to replace the deployed v3)")
    assert "re-initialisation round: the training set doubled, so it was trained from w⁰" in line


def test_an_ordinary_round_does_not_claim_to_be_one() -> None:
    line = _round_line(record(sent=True, reinitialised=False), 5)
    assert line == "round 3: server acc 0.919, update 4966 B (7.2% of full), 5/5 devices in 0.9 s"
