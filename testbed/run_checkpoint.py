"""A run's checkpoint, `<out>/checkpoint.pt`, written after each round, and what `testbed run --resume DIR` reads.

It holds the server's state (server.checkpoint.ServerState), the publisher's (the latest version, its weights and
the bytes published), the run's records (rounds and devices' standing, testbed.run_summary.RunRecords), the run id,
and what it belongs to: a digest of the resolved scenario and the checkpoint format.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.checkpoint import ServerState, load_checkpoint, save_checkpoint
from server.errors import ServerError
from testbed.core.scenario import Scenario, ScenarioError, load_scenario
from testbed.publisher import PublisherState
from testbed.run_summary import RunError

CHECKPOINT_NAME = "checkpoint.pt"
RUN_CHECKPOINT_FORMAT = 1
"""Bumped whenever what the checkpoint holds changes meaning; a checkpoint of another format is refused."""


class ResumeError(RunError, ScenarioError):
    """A folder `--resume` cannot continue: no checkpoint, another scenario or format, or a finished run."""


def scenario_digest(scenario: Scenario) -> str:
    """SHA-256 of the resolved scenario (as scenario.yaml holds it)."""
    return hashlib.sha256(scenario.to_yaml().encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RunCheckpoint:
    """Everything a run needs to continue after its last finished round."""

    run_id: str
    scenario_digest: str
    server: ServerState
    publisher: PublisherState
    records: dict[str, Any]
    """RunRecords.to_saveable()."""

    def save(self, out_dir: Path) -> None:
        """Write `<out_dir>/checkpoint.pt` atomically (a kill leaves the previous checkpoint or this one)."""
        save_checkpoint(Path(out_dir) / CHECKPOINT_NAME, {
            "format": RUN_CHECKPOINT_FORMAT, "run_id": self.run_id, "scenario_digest": self.scenario_digest,
            "server": self.server.to_saveable(), "publisher": self.publisher.to_saveable(),
            "records": json.dumps(self.records),
        })


def read_server_state(out_dir: Path) -> ServerState | None:
    """The server's state in `out_dir`'s checkpoint (a server restart in the same run), None before the first one."""
    path = Path(out_dir) / CHECKPOINT_NAME
    if not path.is_file():
        return None
    return ServerState.from_saveable(load_checkpoint(path)["server"])


def read_resumable(out_dir: Path) -> tuple[Scenario, RunCheckpoint]:
    """The scenario (`out_dir`/scenario.yaml) and checkpoint of a run to resume; ResumeError (one line) if the folder
    has no checkpoint, the checkpoint belongs to another scenario or format, or the run already finished."""
    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_NAME
    if not out_dir.is_dir():
        raise ResumeError(f"--resume {out_dir}: no such folder")
    if not path.is_file():
        raise ResumeError(f"--resume {out_dir}: no {CHECKPOINT_NAME} in it (a run writes one after its first round)")
    try:
        scenario = load_scenario(out_dir / "scenario.yaml", [])
    except ScenarioError as error:
        raise ResumeError(f"--resume {out_dir}: its scenario.yaml: {error}") from None
    try:
        saved = load_checkpoint(path)
    except ServerError as error:
        raise ResumeError(f"--resume {out_dir}: {error}") from None
    if saved.get("format") != RUN_CHECKPOINT_FORMAT:
        raise ResumeError(f"--resume {out_dir}: {CHECKPOINT_NAME} is of format {saved.get('format')!r}, this testbed "
                          f"resumes format {RUN_CHECKPOINT_FORMAT}; run the scenario again instead")
    if saved.get("scenario_digest") != scenario_digest(scenario):
        raise ResumeError(f"--resume {out_dir}: {CHECKPOINT_NAME} belongs to another scenario than its scenario.yaml "
                          "(edited since?); put the run's scenario.yaml back or run it again")
    try:
        checkpoint = RunCheckpoint(run_id=str(saved["run_id"]), scenario_digest=str(saved["scenario_digest"]),
                                   server=ServerState.from_saveable(saved["server"]),
                                   publisher=PublisherState.from_saveable(saved["publisher"]),
                                   records=json.loads(saved["records"]))
    except (KeyError, TypeError, ValueError, ServerError) as error:
        raise ResumeError(f"--resume {out_dir}: {CHECKPOINT_NAME} is damaged ({error!r}); run the scenario again") \
            from None
    if checkpoint.server.next_round >= scenario.rounds and (out_dir / "summary.json").is_file():
        raise ResumeError(f"--resume {out_dir}: the run finished all {scenario.rounds} rounds; nothing to resume")
    return scenario, checkpoint
