"""The update server on digits: accuracy, sparsity of each DPU round, determinism, full updating, errors."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from server.errors import ServerError
from server.strategies import changed_partial_weights
from server.update_server import RoundOutcome, UpdateServer
from testbed.scenario import Scenario, parse_scenario


def scenario(**sections: Any) -> Scenario:
    raw: dict[str, Any] = {
        "name": "x",
        "rounds": 4,
        "devices": [{"profile": "rpi4", "count": 1}],
        "data": {"initial_samples": 300, "new_samples_per_round": 200},
        "update": {"strategy": "dpu", "ratio": 0.05, "epochs": 20},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    return parse_scenario(raw)


def run_all(server: UpdateServer) -> list[RoundOutcome]:
    return [server.run_round(index) for index in range(server.rounds)]


@pytest.fixture(scope="module")
def dpu_run() -> tuple[UpdateServer, list[RoundOutcome]]:
    server = UpdateServer(scenario())
    return server, run_all(server)


def test_dpu_reaches_ninety_percent_in_four_rounds(dpu_run: tuple[UpdateServer, list[RoundOutcome]]) -> None:
    server, outcomes = dpu_run
    assert server.rounds == 4
    assert [o.version for o in outcomes] == [1, 2, 3, 4]
    assert [o.training_samples for o in outcomes] == [300, 500, 700, 900]
    assert outcomes[-1].server_accuracy >= 0.9
    assert server.deployed_weights is outcomes[-1].weights


def test_each_dpu_round_changes_at_most_k_partial_weights(dpu_run: tuple[UpdateServer, list[RoundOutcome]]) -> None:
    _, outcomes = dpu_run
    first = outcomes[0]
    assert first.previous_weights is None and first.selected is None
    total = 64 * 128 + 128 * 64 + 64 * 10
    k = math.floor(0.05 * total)
    for outcome, before in zip(outcomes[1:], outcomes[:-1]):
        assert outcome.previous_weights is before.weights
        assert outcome.partial_count == total and outcome.selected == k
        assert 0 < changed_partial_weights(before.weights, outcome.weights) <= k
        assert all(value.dtype == np.float32 for value in outcome.weights.values())


def test_same_seed_gives_bit_identical_weights_and_other_seeds_differ() -> None:
    small = {"update": {"epochs": 3}, "rounds": 2}
    first, second = UpdateServer(scenario(**small)), UpdateServer(scenario(**small))
    for a, b in zip(run_all(first), run_all(second)):
        assert list(a.weights) == list(b.weights)
        for name in a.weights:
            assert a.weights[name].tobytes() == b.weights[name].tobytes()
    other = UpdateServer(scenario(seed=1, **small))
    assert not np.array_equal(run_all(other)[-1].weights["0.weight"], first.deployed_weights["0.weight"])


def test_full_strategy_sends_everything_and_learns() -> None:
    server = UpdateServer(scenario(update={"strategy": "full", "epochs": 10}, rounds=3))
    outcomes = run_all(server)
    assert all(o.selected is None for o in outcomes)
    assert outcomes[-1].server_accuracy >= 0.9
    assert changed_partial_weights(outcomes[1].weights, outcomes[2].weights) > 0.5 * outcomes[2].partial_count


def test_bad_data_sizes_raise_server_error_with_the_numbers() -> None:
    with pytest.raises(ServerError, match=r"1797 samples.*\(360\).*\(180\).*\(1500\) = 2040"):
        UpdateServer(scenario(data={"initial_samples": 1500}))


def test_rounds_are_limited_by_the_data_and_run_in_order() -> None:
    server = UpdateServer(scenario(rounds=100, data={"initial_samples": 1000}))
    assert server.rounds == server.arrival.max_rounds == 1 + math.ceil((1797 - 540 - 1000) / 200)
    with pytest.raises(ServerError, match="next round to run is 0"):
        server.run_round(1)


def test_device_test_splits_and_device_model() -> None:
    server = UpdateServer(scenario(data={"device_test_samples": 50}))
    first, second = server.device_test_split(0), server.device_test_split(1)
    assert len(first) == len(second) == 50
    assert not np.array_equal(first.x, second.x)
    np.testing.assert_array_equal(server.device_test_split(0).x, first.x)
    device_model = server.build_device_model()
    assert [n for n, _ in device_model.named_parameters()] == list(server.initial_weights)
