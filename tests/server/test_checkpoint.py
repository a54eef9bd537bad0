"""A server restored from a checkpoint after any round produces exactly the rounds an uninterrupted server does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.checkpoint import STATE_FORMAT, ServerState, load_checkpoint, save_checkpoint
from server.errors import ServerError
from server.update_server import RoundOutcome, UpdateServer
from testbed.core.scenario import Scenario, parse_scenario
from testbed.core.wire import weights_hash

ROUNDS = 5


def scenario(strategy: str, **update: Any) -> Scenario:
    # Re-initialisation (dpu) needs the training set to double: 100 initial samples, 40 new per round.
    return parse_scenario({
        "name": "checkpoint", "seed": 4, "rounds": ROUNDS, "devices": [{"profile": "rpi4", "count": 1}],
        "data": {"initial_samples": 100, "new_samples_per_round": 40}, "model": {"hidden": [16]},
        "update": {"strategy": strategy, "epochs": 2, "ratio": 0.1, **update},
    })


def fingerprint(outcome: RoundOutcome) -> tuple[Any, ...]:
    """Everything deterministic a round produced (not its wall-clock seconds)."""
    return (outcome.round_index, outcome.version, outcome.sent, outcome.base_version, outcome.reinitialised,
            outcome.selected, outcome.training_samples, outcome.server_accuracy, outcome.validation_accuracy,
            outcome.best_deployed_accuracy, weights_hash(outcome.weights).hex(), outcome.payload)


@pytest.mark.parametrize("strategy", ["dpu", "rpu", "full"])
def test_a_server_restored_after_any_round_continues_exactly_as_the_uninterrupted_one(
        strategy: str, tmp_path: Path) -> None:
    run = scenario(strategy)
    uninterrupted = UpdateServer(run)
    expected = [fingerprint(outcome) for outcome in uninterrupted.run_all()]
    assert any(outcome[4] for outcome in expected) or strategy != "dpu"  # a re-init round is among them
    for stop_after in range(ROUNDS + 1):
        first = UpdateServer(run)
        for round_index in range(stop_after):
            first.run_round(round_index)
        path = tmp_path / f"after-{stop_after}.pt"
        save_checkpoint(path, {"server": first.checkpoint_state().to_saveable()})
        resumed = UpdateServer(run)
        resumed.restore(ServerState.from_saveable(load_checkpoint(path)["server"]))
        assert resumed.next_round == stop_after
        assert [fingerprint(outcome) for outcome in resumed.run_all()] == expected[stop_after:], stop_after


def test_the_state_survives_torch_load_with_weights_only(tmp_path: Path) -> None:
    server = UpdateServer(scenario("dpu"))
    server.run_round(0)
    save_checkpoint(tmp_path / "c.pt", {"server": server.checkpoint_state().to_saveable()})
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["server"]
    assert saved["format"] == STATE_FORMAT and saved["next_round"] == 1
    state = ServerState.from_saveable(saved)
    assert state.deployed_weights is not None and server.deployed_weights is not None
    assert weights_hash(state.deployed_weights) == weights_hash(server.deployed_weights)
    assert not (tmp_path / "c.pt.tmp").exists()


def test_a_state_of_another_format_or_model_is_refused_in_one_line(tmp_path: Path) -> None:
    server = UpdateServer(scenario("dpu"))
    server.run_round(0)
    saved = server.checkpoint_state().to_saveable()
    with pytest.raises(ServerError, match="format 99.*reads format 1"):
        ServerState.from_saveable({**saved, "format": 99})
    other = UpdateServer(parse_scenario({**scenario("dpu").model_dump(mode="json", exclude_none=True),
                                         "model": {"hidden": [8]}}))
    with pytest.raises(ServerError, match="do not fit the scenario's model"):
        other.restore(ServerState.from_saveable(saved))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ServerError, match="junk.pt is not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
