"""The update server on digits: accuracy, sparsity, payloads, versions, re-init, send-nothing, determinism."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from server.errors import ServerError
from server.models import get_weights
from server.strategies import (
    RoundContext,
    Strategy,
    StrategyResult,
    StrategySettings,
    changed_partial_weights,
    should_send,
)
from server.update_server import RoundOutcome, UpdateServer
from testbed.core.initial_weights import initial_weights, layout_of
from testbed.core.scenario import Scenario, ScenarioError, parse_scenario
from testbed.core.wire import apply_update, decode_update


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
    assert [o.version for o in outcomes] == [1 + sum(o.sent for o in outcomes[1 : i + 1]) for i in range(4)]
    assert [o.training_samples for o in outcomes] == [300, 500, 700, 900]
    assert [o.reinitialised for o in outcomes][:3] == [False, False, True]
    assert outcomes[-1].server_accuracy >= 0.9
    assert server.deployed_weights is outcomes[-1].weights


def test_each_dpu_round_changes_at_most_k_partial_weights_of_its_base(
    dpu_run: tuple[UpdateServer, list[RoundOutcome]],
) -> None:
    server, outcomes = dpu_run
    first = outcomes[0]
    total = 64 * 128 + 128 * 64 + 64 * 10
    k = math.floor(0.05 * total)
    assert first.previous_weights is None and first.selected == k and first.base_version == 0
    assert 0 < changed_partial_weights(server.initial_weights, first.weights) <= k
    version = 1
    for outcome, before in zip(outcomes[1:], outcomes[:-1]):
        assert outcome.previous_weights is before.weights
        assert outcome.partial_count == total and outcome.selected == k
        base = server.initial_weights if outcome.reinitialised else before.weights
        assert outcome.base_version == (0 if outcome.reinitialised else before.version)
        if outcome.sent:
            version += 1
            assert 0 < changed_partial_weights(base, outcome.weights) <= k
        else:
            assert outcome.weights is before.weights and outcome.payload == b""
        assert outcome.version == version
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


def unchecked(valid: Scenario, **fields: Any) -> Scenario:
    """`valid` with fields replaced past validation (which refuses them): what the server meets with odd data files."""
    return valid.model_copy(update=fields)


def test_bad_data_sizes_raise_server_error_with_the_numbers() -> None:
    with pytest.raises(ScenarioError, match=r"data.initial_samples: .* holds 1,257 samples"):
        scenario(data={"initial_samples": 1500})
    too_many = unchecked(scenario(), data=scenario().data.model_copy(update={"initial_samples": 1500}))
    with pytest.raises(ServerError, match=r"1797 samples.*\(360\).*\(180\).*\(1500\) = 2040"):
        UpdateServer(too_many)


def test_the_server_runs_exactly_the_scenarios_rounds_in_order() -> None:
    allowed = 1 + math.ceil((1797 - 540 - 1000) / 200)
    server = UpdateServer(scenario(rounds=allowed, data={"initial_samples": 1000}))
    assert server.rounds == server.arrival.max_rounds == allowed
    with pytest.raises(ServerError, match="next round to run is 0"):
        server.run_round(1)
    with pytest.raises(ScenarioError, match=f"rounds: the data allow at most {allowed} rounds"):
        scenario(rounds=100, data={"initial_samples": 1000})
    with pytest.raises(ServerError, match=f"rounds: 100, but the data allow {allowed} .* write rounds: {allowed}"):
        UpdateServer(unchecked(server.scenario, rounds=100))


def test_device_test_splits_and_device_model() -> None:
    server = UpdateServer(scenario(data={"device_test_samples": 50}))
    first, second = server.device_test_split(0), server.device_test_split(1)
    assert len(first) == len(second) == 50
    assert not np.array_equal(first.x, second.x)
    np.testing.assert_array_equal(server.device_test_split(0).x, first.x)
    device_model = server.build_device_model()
    assert [n for n, _ in device_model.named_parameters()] == list(server.initial_weights)


# ---------------------------------------------------------------- payloads, versions, re-init, send-nothing


def device_apply(held: dict[str, np.ndarray], held_version: int, initial: dict[str, np.ndarray],
                 payload: bytes) -> dict[str, np.ndarray]:
    """What a device does: decode, pick its base (w⁰ for a base-0 update), apply and verify."""
    decoded = decode_update(payload)
    base_version = decoded.header.base_version
    if decoded.header.is_snapshot:
        return apply_update(held, held_version, decoded)
    return apply_update(initial if base_version == 0 else held, base_version, decoded)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("strategy", ["dpu", "gcpu", "rpu"])
def test_round_zero_is_a_k_sparse_update_from_the_regenerable_initial_weights(strategy: str) -> None:
    server = UpdateServer(scenario(rounds=1, update={"strategy": strategy, "epochs": 2}))
    regenerated = initial_weights(layout_of(server.initial_weights), server.seed)
    assert_same(server.initial_weights, regenerated)
    assert_same(get_weights(server.build_device_model()), regenerated)
    (outcome,) = server.run_all()
    assert outcome.version == 1 and outcome.sent and outcome.base_version == 0 and not outcome.reinitialised
    header = decode_update(outcome.payload).header
    assert not header.is_snapshot and (header.base_version, header.target_version) == (0, 1)
    # The reference's round 0: k positions of w⁰ (multiround_dpu.py:209); RPU's k is Σ round(0.05·I_l).
    k = math.floor(0.05 * 17024) if strategy != "rpu" else round(0.05 * 64 * 128) * 2 + round(0.05 * 64 * 10)
    assert outcome.selected == k and 0 < header.k <= k
    assert 0 < changed_partial_weights(regenerated, outcome.weights) <= k
    assert_same(device_apply(regenerated, 0, regenerated, outcome.payload), outcome.weights)


def test_round0_full_deploys_the_whole_model_as_before() -> None:
    server = UpdateServer(scenario(rounds=1, update={"epochs": 2, "round0": "full"}))
    (outcome,) = server.run_all()
    assert outcome.sent and outcome.base_version is None and outcome.selected is None
    header = decode_update(outcome.payload).header
    assert header.is_full_snapshot and header.target_version == 1
    assert changed_partial_weights(server.initial_weights, outcome.weights) > 0.5 * outcome.partial_count


def test_reinitialisation_rounds_are_relative_to_initial_weights_and_devices_follow() -> None:
    # 300, 500, 700, 900 samples: 700 > 2·300 re-initialises at round 2; 900 < 2·700 does not.
    # (The size is reset when a re-init round runs, sent or not, so a rejected one is not retried each round.)
    server = UpdateServer(scenario(update={"epochs": 3, "skip_if_worse": False}))
    seen: list[RoundOutcome] = []
    outcomes = server.run_all(seen.append)
    assert seen == outcomes
    assert [o.reinitialised for o in outcomes] == [False, False, True, False]
    assert [o.base_version for o in outcomes] == [0, 1, 0, 3]
    assert [o.version for o in outcomes] == [1, 2, 3, 4] and all(o.sent for o in outcomes)
    k = math.floor(0.05 * outcomes[0].partial_count)
    assert changed_partial_weights(server.initial_weights, outcomes[2].weights) <= k
    held, version = server.initial_weights, 0
    for outcome in outcomes:
        assert decode_update(outcome.payload).header.target_version == outcome.version
        held, version = device_apply(held, version, server.initial_weights, outcome.payload), outcome.version
        assert_same(held, outcome.weights)
    assert server.run_all() == []


def test_without_reinit_every_update_is_relative_to_the_last_version() -> None:
    server = UpdateServer(scenario(update={"epochs": 2, "reinit": False, "skip_if_worse": False}))
    outcomes = server.run_all()
    assert [o.reinitialised for o in outcomes] == [False] * 4
    assert [o.base_version for o in outcomes] == [0, 1, 2, 3]


class SabotagingStrategy(Strategy):
    """Always-sent biases pushed so the last layer predicts class 0 for everything: validates worse."""

    name = "sabotage"

    class Settings(StrategySettings):
        skip_if_worse: bool = True

    def should_send(self, candidate_accuracy: float, deployed_accuracy: float | None) -> bool:
        return not self.settings.skip_if_worse or should_send(candidate_accuracy, deployed_accuracy)

    def update(self, context: RoundContext) -> StrategyResult:
        weights = {name: value.copy() for name, value in context.start_weights.items()}
        last_bias = [name for name, value in weights.items() if value.ndim == 1][-1]
        weights[last_bias][0] = np.float32(1e6)
        return StrategyResult(weights, 0, 0, 0.0)


def test_a_round_that_validates_worse_sends_nothing_and_keeps_the_version() -> None:
    server = UpdateServer(scenario(rounds=3, update={"epochs": 2}))
    first = server.run_round(0)
    server.strategy = SabotagingStrategy(server.scenario.update)
    second = server.run_round(1)
    assert not second.sent and second.payload == b"" and second.version == 1
    assert second.weights is first.weights and server.deployed_weights is first.weights
    assert second.server_accuracy == first.server_accuracy
    assert second.validation_accuracy < 0.2
    # The strategy owns the rule: the same sabotage with skip_if_worse off is sent.
    server.strategy = SabotagingStrategy(scenario(rounds=3, update={"epochs": 2, "skip_if_worse": False}).update)
    third = server.run_round(2)
    assert third.sent and third.version == 2 and third.base_version == 1


def test_same_scenario_gives_identical_payload_bytes() -> None:
    small = {"update": {"epochs": 2, "ratio": 0.02}, "rounds": 3}
    first = UpdateServer(scenario(**small)).run_all()
    second = UpdateServer(scenario(**small)).run_all()
    assert [o.payload for o in first] == [o.payload for o in second]
    assert all(o.payload for o in first if o.sent)
    other = UpdateServer(scenario(seed=5, **small)).run_all()
    assert first[1].payload != other[1].payload


@pytest.mark.parametrize("strategy", ["gcpu", "lcpu", "rpu", "magnitude"])
def test_partial_baselines_send_sparse_updates_relative_to_the_last_version(strategy: str) -> None:
    server = UpdateServer(scenario(rounds=2, update={"strategy": strategy, "epochs": 2}))
    zero, one = server.run_all()
    k = math.floor(0.05 * one.partial_count)
    assert one.sent and one.base_version == 1 and one.version == 2
    header = decode_update(one.payload).header
    assert not header.is_snapshot and 0 < header.k <= k
    assert_same(device_apply(zero.weights, 1, server.initial_weights, one.payload), one.weights)


def test_pruning_sends_sparse_snapshots_with_zeros_elsewhere() -> None:
    server = UpdateServer(scenario(rounds=2, update={"strategy": "pruning", "epochs": 3}))
    zero, one = server.run_all()
    k = math.floor(0.05 * one.partial_count)
    assert one.sent and one.base_version is None and one.version == 2
    header = decode_update(one.payload).header
    assert header.is_sparse_snapshot and header.k <= k
    nonzero = sum(int(np.count_nonzero(v)) for v in one.weights.values() if v.ndim > 1)
    assert 0 < nonzero <= k
    assert_same(device_apply(zero.weights, 1, server.initial_weights, one.payload), one.weights)


def test_full_updating_sends_full_snapshots() -> None:
    server = UpdateServer(scenario(rounds=2, update={"strategy": "full", "epochs": 2, "full_variant": "same_init"}))
    outcomes = server.run_all()
    assert [o.base_version for o in outcomes] == [None, None] and [o.version for o in outcomes] == [1, 2]
    assert all(decode_update(o.payload).header.is_full_snapshot for o in outcomes)


@pytest.mark.parametrize(("index_codec", "value_codec"), [("golomb-rice", "fp16"), ("raw", "int8"), ("bitmap", "fp32")])
def test_codecs_are_used_and_the_server_deploys_what_devices_hold(index_codec: str, value_codec: str) -> None:
    update = {"epochs": 2, "index_codec": index_codec, "value_codec": value_codec, "skip_if_worse": False}
    server = UpdateServer(scenario(rounds=3, update=update))
    outcomes = server.run_all()
    held, version = server.initial_weights, 0
    for outcome in outcomes:
        header = decode_update(outcome.payload).header
        assert header.value_codec == value_codec
        if outcome.round_index > 0:
            assert header.index_codec == index_codec
        held, version = device_apply(held, version, server.initial_weights, outcome.payload), outcome.version
        assert_same(held, outcome.weights)
    assert server.deployed_weights is outcomes[-1].weights
