"""The floors of a comparison on real digits rounds: no update after round 0, and biases only."""

from __future__ import annotations

import numpy as np
import pytest

from server.strategies import BiasesOnlyUpdating, NoUpdateAfterRoundZero, make_strategy
from server.update_server import RoundOutcome, UpdateServer
from testbed.core.plugins import STRATEGIES
from testbed.core.scenario import parse_scenario
from testbed.core.wire import apply_update, decode_update


def run(strategy: str) -> list[RoundOutcome]:
    scenario = parse_scenario({
        "name": "floors", "seed": 4, "rounds": 3, "devices": [{"profile": "rpi4", "count": 1}],
        "data": {"initial_samples": 200, "new_samples_per_round": 200},
        "model": {"hidden": [16]}, "update": {"strategy": strategy, "ratio": 0.05, "epochs": 3},
    })
    return UpdateServer(scenario).run_all()


@pytest.fixture(scope="module")
def no_update() -> list[RoundOutcome]:
    return run("no-update")


@pytest.fixture(scope="module")
def biases_only() -> list[RoundOutcome]:
    return run("biases-only")


def same_weights(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[name].tobytes() == b[name].tobytes() for name in a)


def test_floors_are_registered_by_name_and_take_no_ratio() -> None:
    assert {"no-update", "biases-only"} <= set(STRATEGIES.names())
    for name, cls in (("no-update", NoUpdateAfterRoundZero), ("biases-only", BiasesOnlyUpdating)):
        assert STRATEGIES.attributes(name)["uses_ratio"] is False
        assert type(make_strategy(parse_scenario({"name": "s", "rounds": 1, "update": {"strategy": name},
                                                  "devices": [{"profile": "rpi4", "count": 1}]}).update)) is cls


def test_no_update_keeps_the_round_zero_deployment_and_sends_nothing(no_update: list[RoundOutcome]) -> None:
    first, *later = no_update
    assert first.sent and first.version == 1 and decode_update(first.payload).header.is_full_snapshot
    for outcome in later:
        assert not outcome.sent and outcome.payload == b"" and outcome.version == 1
        assert same_weights(outcome.weights, first.weights)
        assert outcome.server_accuracy == first.server_accuracy


def test_biases_only_changes_biases_and_no_weight_matrix_entry(biases_only: list[RoundOutcome]) -> None:
    first, *later = biases_only
    held, version = first.weights, first.version
    for outcome in later:
        assert outcome.sent
        header = decode_update(outcome.payload).header
        assert header.k == 0 and header.base_version == version  # no position of a weight matrix is sent
        after = apply_update(held, version, decode_update(outcome.payload))
        assert same_weights(after, outcome.weights)
        assert all(after[name].tobytes() == held[name].tobytes() for name in held if held[name].ndim > 1)
        assert any(after[name].tobytes() != held[name].tobytes() for name in held if held[name].ndim == 1)
        held, version = after, outcome.version


def test_floors_start_from_the_full_round_zero_deployment(no_update: list[RoundOutcome],
                                                                 biases_only: list[RoundOutcome]) -> None:
    assert same_weights(no_update[0].weights, biases_only[0].weights)
    assert same_weights(no_update[0].weights, run("full")[0].weights)  # the full initial deployment
