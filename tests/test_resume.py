"""`testbed run --resume DIR`: a run killed (SIGKILL) at any point continues from its last checkpoint into the same
results, one record per device and round, ending on the final weights of an uninterrupted run with the same seed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from server.checkpoint import load_checkpoint
from testbed.cli import main
from testbed.core.scenario import Scenario
from testbed.events import EventSchedule, EventsBefore, keep_events_before, read_events
from testbed.results import keep_records_before
from testbed.run_checkpoint import CHECKPOINT_NAME, ResumeError, read_resumable
from testbed.runner import ScenarioRun
from tests.faults.matrix import RUN_TIMEOUT_S, FaultRun, assert_survived, fault_scenario, run_faults

pytestmark = pytest.mark.timeout(600)

KILL_WAIT_S = 180.0  # the killed run reaches the point it is killed at within this
KILL_ATTEMPTS = 3  # runs started to catch one at the point it is killed at (see killed_run)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The summary of the run every resumed one must end like (same scenario and seed)."""
    faults = asyncio.run(run_faults(fault_scenario([]), tmp_path_factory.mktemp("clean") / "out"))
    assert_survived(faults)
    return {**faults.result.summary, "out": str(faults.out)}


def checkpoint_round(out: Path) -> int | None:
    """The next round of `out`'s checkpoint, or None before the first one."""
    if not (out / CHECKPOINT_NAME).exists():
        return None
    return int(load_checkpoint(out / CHECKPOINT_NAME)["server"]["next_round"])


def killed_run(tmp_path: Path, next_round: int, scenario: Scenario | None = None) -> Path:
    """`testbed run` of `scenario` (the fault matrix's, no events, unless given) in its own process, SIGKILLed as soon
    as its checkpoint says `next_round` is next; its results folder.

    The run is frozen (SIGSTOP) whenever its checkpoint changes, while the test reads it. The window to kill in
    lasts one round (less after the last). On a busy host this process may be starved through all of it: then the run
    is started again in a fresh folder, up to KILL_ATTEMPTS times, each saying what it saw.
    """
    scenario_file = tmp_path / "faults.yaml"
    scenario_file.write_text((scenario or fault_scenario([])).to_yaml())
    missed = []
    for attempt in range(1, KILL_ATTEMPTS + 1):
        out = tmp_path / ("out" if attempt == 1 else f"out-{attempt}")
        seen = _kill_at_checkpoint(scenario_file, out, next_round)
        if seen == next_round:
            return out
        missed.append(f"attempt {attempt}: {seen}")
    raise AssertionError(f"the run was never caught with round {next_round} next in its checkpoint: "
                         + "; ".join(missed))


def _kill_at_checkpoint(scenario_file: Path, out: Path, next_round: int) -> int | str:
    """One run, SIGKILLed when its checkpoint says `next_round` is next: that round, or what was seen instead."""
    process = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(scenario_file), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint, seen_version = out / CHECKPOINT_NAME, None
    try:
        deadline = time.monotonic() + KILL_WAIT_S
        while True:
            ended = process.poll() is not None
            try:
                stat = checkpoint.stat()
                version = (stat.st_ino, stat.st_mtime_ns)
            except FileNotFoundError:
                version = None
            if version is not None and version != seen_version:
                if not ended:
                    os.killpg(process.pid, signal.SIGSTOP)  # no round ends while the checkpoint is read
                seen_version, seen = version, checkpoint_round(out)
                if seen == next_round and not ended:
                    return next_round
                if seen is not None and seen > next_round:
                    return f"round {seen} next when first read"
                if not ended:
                    os.killpg(process.pid, signal.SIGCONT)
            if ended:
                return f"the run ended (exit {process.returncode}) with round {checkpoint_round(out)} next"
            assert time.monotonic() < deadline, f"the run did not reach round {next_round} in {KILL_WAIT_S:g} s"
            time.sleep(0.02)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


async def resumed(out: Path) -> FaultRun:
    scenario, checkpoint = read_resumable(out)
    progress: list[tuple[str, dict[str, Any]]] = []
    run = ScenarioRun(scenario, out, lambda event, data: progress.append((event, data)), resume=checkpoint)
    result = await asyncio.wait_for(run.execute(), RUN_TIMEOUT_S)
    return FaultRun(run, result, progress)


def assert_ends_like(faults: FaultRun, uninterrupted: dict[str, Any]) -> None:
    summary = faults.result.summary
    assert_survived(faults)  # every device on the final hash, one record per device and round, no partial apply
    assert summary["server"]["weights_hash"] == uninterrupted["server"]["weights_hash"]
    assert summary["server"]["final_version"] == uninterrupted["server"]["final_version"]
    deterministic = ("round", "version", "sent", "base_version", "server_accuracy", "update_bytes", "selected_weights")
    assert [{key: record[key] for key in deterministic} for record in summary["rounds"]] == [
        {key: record[key] for key in deterministic} for record in uninterrupted["rounds"]]
    assert {record["run"] for record in faults.records()} == {summary["run_id"]}


def test_killed_after_round_0s_checkpoint_it_resumes_to_the_uninterrupted_final_weights(
        tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    out = killed_run(tmp_path, 1)
    run_id = read_resumable(out)[1].run_id
    faults = asyncio.run(resumed(out))
    assert_ends_like(faults, uninterrupted)
    assert faults.result.summary["run_id"] == run_id
    assert len(faults.said("catch-up")) >= 3  # every fresh device caught up to v1 first


def test_killed_mid_round_its_half_recorded_round_is_redone_once(tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    out = killed_run(tmp_path, 2)  # in round 2, after round 1's checkpoint
    records = (out / "results.jsonl").read_text().splitlines()
    assert sorted({json.loads(line)["round"] for line in records}) == [0, 1]
    # What a kill between two of round 2's appends leaves: one whole record of it and one cut short
    half_recorded = {**json.loads(records[-1]), "round": 2}
    with open(out / "results.jsonl", "a") as results:
        results.write(json.dumps(half_recorded) + "\n" + json.dumps(half_recorded)[:20])
    faults = asyncio.run(resumed(out))
    assert_ends_like(faults, uninterrupted)


def test_killed_after_the_last_round_it_writes_the_summary_with_devices_caught_up(
        tmp_path: Path, uninterrupted: dict[str, Any]) -> None:
    out = killed_run(tmp_path, 3)
    (out / "summary.json").unlink(missing_ok=True)  # as if killed before it was written
    faults = asyncio.run(resumed(out))
    assert_ends_like(faults, uninterrupted)
    assert [record["round"] for record in faults.result.summary["rounds"]] == [0, 1, 2]


# Rounds 0-3: rpi4-0's downlink slowed in round 1 for longer than the run (still in force when it is killed), and
# every device's next 2 chunks armed to be duplicated in round 3 (neither changes the weights)
EVENTS_ACROSS_THE_KILL = [
    {"round": 1, "action": "link", "device": "rpi4-0", "direction": "downlink", "set": {"delay": "60ms"},
     "for": "10min"},
    {"round": 3, "action": "duplicate", "all": True, "chunks": 2},
]


def test_events_fired_before_the_checkpoint_do_not_fire_again_after_the_resume(tmp_path: Path) -> None:
    scenario = fault_scenario(EVENTS_ACROSS_THE_KILL, overrides=["rounds=4"])
    clean = asyncio.run(run_faults(scenario, tmp_path / "clean"))
    assert_survived(clean)
    out = killed_run(tmp_path, 3, scenario)  # after round 2's checkpoint
    before = [(record["index"], record["kind"], record["round"]) for record in read_events(out)]
    assert before[0] == (0, "fire", 1) and (0, "end") not in [entry[:2] for entry in before]
    faults = asyncio.run(resumed(out))
    assert_ends_like(faults, clean.result.summary)
    fired_here = [data["record"] for data in faults.said("event")]
    assert [(record["index"], record["kind"]) for record in fired_here] == [(0, "end"), (1, "fire")]
    # one record per fire and end across the kill: the round-1 link change once, its end recorded at the resume
    # (the killed process took the slowed link with it), round 3's duplicate once, in the resumed run
    assert [(record["index"], record["kind"], record["round"]) for record in read_events(out)] == [
        (0, "fire", 1), (0, "end", 2), (1, "fire", 3)]
    resumed_warnings = [data["message"] for data in faults.said("warning") if data["message"].startswith("resumed")]
    assert resumed_warnings == ["resumed at round 3: 1 scenario event(s) that fired before it (events.jsonl) do not "
                                "fire again"]


def test_a_resume_keeps_the_events_of_rounds_before_it_and_counts_timed_ones_from_its_start(tmp_path: Path) -> None:
    scenario = fault_scenario([{"at": "1s", "action": "duplicate", "all": True, "chunks": 1},
                               {"round": 0, "action": "device_crash", "all": True, "for": "1min"},
                               {"at": "20s", "action": "duplicate", "all": True, "chunks": 1},
                               {"round": 2, "action": "duplicate", "all": True, "chunks": 1}], overrides=["rounds=4"])
    records = [{"index": 0, "kind": "fire", "round": None}, {"index": 1, "kind": "fire", "round": 0},
               {"index": 2, "kind": "fire", "round": 2}, {"index": 3, "kind": "fire", "round": 2}]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records) + '{"index": 1, "ki')
    before = keep_events_before(tmp_path, 2)
    assert before == EventsBefore(fired=frozenset({0, 1}), ended=frozenset())
    assert read_events(tmp_path) == records[:2]  # round 2's records go (it is redone), and the cut-short line
    schedule = EventSchedule(scenario.events)
    ends = schedule.resume(2, before, 0.0)
    assert [(end.index, end.kind, end.round, end.phase) for end in ends] == [(1, "end", 1, "report")]
    assert schedule.due(19.9) == [] and [fired.index for fired in schedule.due(20.0)] == [2]
    assert [fired.index for fired in schedule.phase_reached(2, "publish", 21.0)] == [3]
    assert schedule.finished


def test_results_are_cut_back_to_the_checkpoint_and_a_cut_short_line_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    lines = [json.dumps({"round": round_index, "device": device}) for round_index in range(3) for device in "ab"]
    path.write_text("\n".join(lines) + '\n{"round": 2, "dev')
    assert keep_records_before(path, 2) == 4
    assert path.read_text().splitlines() == lines[:4]
    assert keep_records_before(tmp_path / "none.jsonl", 1) == 0


def resume_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    output = capsys.readouterr().out.strip()
    assert "\n" not in output, output
    return output


def test_resume_refuses_what_it_cannot_continue_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], uninterrupted: dict[str, Any]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no checkpoint.pt in it" in resume_error(["run", "--resume", str(empty)], capsys)
    assert "no such folder" in resume_error(["run", "--resume", str(tmp_path / "missing")], capsys)
    assert "give no scenario file" in resume_error(["run", "x.yaml", "--resume", str(empty)], capsys)
    assert "needs a scenario file, or --resume DIR" in resume_error(["run"], capsys)
    finished = Path(uninterrupted["out"])
    assert "finished all 3 rounds; nothing to resume" in resume_error(["run", "--resume", str(finished)], capsys)
    other = tmp_path / "other"
    other.mkdir()
    (other / CHECKPOINT_NAME).write_bytes((finished / CHECKPOINT_NAME).read_bytes())
    edited = yaml.safe_load((finished / "scenario.yaml").read_text())
    edited["seed"] += 1
    (other / "scenario.yaml").write_text(yaml.safe_dump(edited))
    assert "belongs to another scenario" in resume_error(["run", "--resume", str(other)], capsys)
    saved = torch.load(finished / CHECKPOINT_NAME, weights_only=True)
    torch.save({**saved, "format": 99}, other / CHECKPOINT_NAME)
    (other / "scenario.yaml").write_text((finished / "scenario.yaml").read_text())
    assert "is of format 99, this testbed resumes format 1" in resume_error(["run", "--resume", str(other)], capsys)
    with pytest.raises(ResumeError, match="nothing to resume"):
        read_resumable(finished)
