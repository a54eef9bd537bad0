"""Selection rules of GCPU, LCPU, RPU, pruning and magnitude on hand-made tensors, and each on a tiny real round."""

from __future__ import annotations

import math

import numpy as np
import pytest

from server.data import DataArrival, load_dataset_arrival
from server.errors import ServerError
from server.models import build_model, get_weights
from server.strategies import (
    FullUpdating,
    GlobalContributionPartialUpdating,
    LocalContributionPartialUpdating,
    MagnitudeUpdating,
    PruningUpdating,
    RandomPartialUpdating,
    RoundContext,
    absolute_change,
    absolute_value,
    changed_partial_weights,
    random_layer_masks,
    rewind,
    select_top_k,
    should_reinitialise,
    should_send,
    zero_unselected,
)
from server.strategies.selection import per_layer_count
from server.training import TrainingConfig, train_epochs
from testbed.core.scenario import DataSpec, ModelSpec, UpdateSpec


def flat(masks: dict[str, np.ndarray]) -> list[bool]:
    return [bool(v) for name in masks for v in masks[name].ravel()]


# Hand-made round: 8 partial weights (two 2×2 tensors) and a bias; ratio 0.25 → k = 2.
START = {
    "a": np.array([[0.0, 0.0], [0.0, 0.0]], np.float32),
    "a_bias": np.array([0.0, 0.0], np.float32),
    "b": np.array([[1.0, 1.0], [1.0, 1.0]], np.float32),
}
FINAL = {
    "a": np.array([[0.5, -3.0], [0.1, 0.0]], np.float32),  # Δ = 0.5, -3, 0.1, 0
    "a_bias": np.array([7.0, 7.0], np.float32),
    "b": np.array([[1.0, 3.0], [0.0, 1.2]], np.float32),  # Δ = 0, 2, -1, 0.2
}
LOCAL = {  # ranks differently from Δ²: largest at a[1,1] and b[0,0]
    "a": np.array([[0.1, 0.2], [0.0, 5.0]]),
    "a_bias": np.array([100.0, 100.0]),
    "b": np.array([[4.0, 0.3], [0.2, 0.1]]),
}
SPEC = UpdateSpec(ratio=0.25)


def test_gcpu_ranks_by_squared_change_and_ignores_local() -> None:
    masks = GlobalContributionPartialUpdating(SPEC).select(START, FINAL, LOCAL)
    # Δ² = 0.25, 9, 0.01, 0 | 0, 4, 1, 0.04 → the two largest are a[0,1] and b[0,1].
    assert flat(masks) == [False, True, False, False, False, True, False, False]
    assert flat(GlobalContributionPartialUpdating(SPEC).select(START, FINAL, None)) == flat(masks)


def test_lcpu_ranks_by_local_contribution_only() -> None:
    masks = LocalContributionPartialUpdating(SPEC).select(START, FINAL, LOCAL)
    assert flat(masks) == [False, False, False, True, True, False, False, False]
    with pytest.raises(ServerError, match="local contribution"):
        LocalContributionPartialUpdating(SPEC).select(START, FINAL, None)


def test_magnitude_picks_the_largest_absolute_change_and_keeps_final_values() -> None:
    masks = select_top_k(absolute_change(START, FINAL), 3)
    # |Δ| = 0.5, 3, 0.1, 0 | 0, 2, 1, 0.2 → 3, 2, 1 (the negative changes count by magnitude).
    assert flat(masks) == [False, True, False, False, False, True, True, False]
    sent = rewind(START, FINAL, masks)
    np.testing.assert_array_equal(sent["a"], [[0.0, -3.0], [0.0, 0.0]])
    np.testing.assert_array_equal(sent["b"], [[1.0, 3.0], [0.0, 1.0]])
    np.testing.assert_array_equal(sent["a_bias"], FINAL["a_bias"])


def test_pruning_keeps_the_largest_absolute_values_and_zeroes_the_rest() -> None:
    weights = {
        "w": np.array([[0.3, -2.0, 0.1], [1.5, -0.2, 0.0]], np.float32),
        "bias": np.array([0.7, -0.7], np.float32),
        "v": np.array([[-1.0, 0.05]], np.float32),
    }
    masks = select_top_k(absolute_value(weights), 3)
    assert set(masks) == {"w", "v"}
    pruned = zero_unselected(weights, masks)
    np.testing.assert_array_equal(pruned["w"], [[0.0, -2.0, 0.0], [1.5, 0.0, 0.0]])
    np.testing.assert_array_equal(pruned["v"], [[-1.0, 0.0]])
    np.testing.assert_array_equal(pruned["bias"], weights["bias"])
    assert all(value.dtype == np.float32 for value in pruned.values())


def test_random_masks_have_per_layer_counts_and_depend_only_on_the_seed() -> None:
    weights = {"w1": np.zeros((10, 20), np.float32), "b1": np.zeros(20, np.float32), "w2": np.zeros((7, 3), np.float32),
               "w3": np.zeros((5, 3), np.float32), "w4": np.zeros((2, 9), np.float32)}
    masks = random_layer_masks(weights, 0.1, np.random.default_rng(5))
    assert set(masks) == {"w1", "w2", "w3", "w4"}
    # round(k·I_l) as multiround_rpu.py:243: 0.1·200 = 20, 0.1·21 → 2, 0.1·15 = 1.5… → 2, 0.1·18 = 1.8 → 2
    assert [int(masks[name].sum()) for name in ("w1", "w2", "w3", "w4")] == [20, 2, 2, 2]
    floored = random_layer_masks(weights, 0.1, np.random.default_rng(5), rounding="floor")
    assert [int(floored[name].sum()) for name in ("w1", "w2", "w3", "w4")] == [20, 2, 1, 1]
    again = random_layer_masks(weights, 0.1, np.random.default_rng(5))
    other = random_layer_masks(weights, 0.1, np.random.default_rng(6))
    assert all(np.array_equal(masks[name], again[name]) for name in masks)
    assert not np.array_equal(masks["w1"], other["w1"])


def test_reinitialisation_trigger_is_more_than_twice_the_size_or_at_twice_by_the_old_rule() -> None:
    assert not should_reinitialise(600, 300) and should_reinitialise(601, 300)  # multiround_dpu.py:221
    assert should_reinitialise(1000, 300)
    assert not should_reinitialise(300, 300)
    assert not should_reinitialise(599, 300, strictly=False) and should_reinitialise(600, 300, strictly=False)
    with pytest.raises(ServerError):
        should_reinitialise(10, 0)


def test_send_nothing_when_worse_than_the_threshold_and_ties_as_asked() -> None:
    assert should_send(0.9, None) and should_send(0.1, None, ties_send=False)
    assert should_send(0.9, 0.9)
    assert not should_send(0.89, 0.9)
    assert not should_send(0.9, 0.9, ties_send=False) and should_send(0.91, 0.9, ties_send=False)


def test_per_layer_count_rounds_like_python_or_floors() -> None:
    assert [per_layer_count(size, 0.5, "round") for size in (1, 3, 5, 7)] == [0, 2, 2, 4]  # halves to even
    assert [per_layer_count(size, 0.5, "floor") for size in (1, 3, 5, 7)] == [0, 1, 2, 3]
    assert per_layer_count(1024, 0.03, "round") == 31 and per_layer_count(1024, 0.03, "floor") == 30
    assert per_layer_count(4, 1.0, "round") == 4 and per_layer_count(0, 0.3, "round") == 0


# ---------------------------------------------------------------- each strategy on a tiny real round


@pytest.fixture(scope="module")
def tiny() -> tuple[DataArrival, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Digits, a 64-16-10 MLP: (arrival, w⁰, deployed weights after a short initial training)."""
    arrival = load_dataset_arrival(DataSpec(initial_samples=200, new_samples_per_round=100), seed=2)
    model = build_model(ModelSpec(hidden=[16]), arrival.num_features, arrival.num_classes, seed=2)
    initial = get_weights(model)
    train_epochs(model, arrival.training_set(0), TrainingConfig(10, 0.005, 32, seed=0))
    return arrival, initial, get_weights(model)


def context_for(tiny, spec: UpdateSpec, start=None, seed: int = 3) -> RoundContext:  # type: ignore[no-untyped-def]
    arrival, initial, deployed = tiny
    model = build_model(ModelSpec(hidden=[16]), arrival.num_features, arrival.num_classes, seed=99)
    return RoundContext(
        1, model, deployed if start is None else start, arrival.training_set(1), arrival.validation, spec,
        seed, initial_weights=initial,
    )


TOTAL = 64 * 16 + 16 * 10
SMALL = {"ratio": 0.05, "epochs": 2, "batch_size": 32}


def test_rpu_round_changes_only_random_per_layer_positions(tiny) -> None:  # type: ignore[no-untyped-def]
    spec = UpdateSpec(strategy="rpu", **{**SMALL, "ratio": 0.03})
    _, _, deployed = tiny
    result = RandomPartialUpdating(spec).update(context_for(tiny, spec))
    # round(k·I_l) per layer (multiround_rpu.py:243): 0.03·1024 = 30.72 → 31, 0.03·160 = 4.8 → 5
    assert result.selected == round(0.03 * 64 * 16) + round(0.03 * 16 * 10) == 36
    assert result.snapshot is None
    for name, limit in (("0.weight", 31), ("2.weight", 5)):
        assert 0 < int(np.count_nonzero(result.weights[name] != deployed[name])) <= limit
    floored = UpdateSpec(strategy="rpu", layer_count="floor", **{**SMALL, "ratio": 0.03})
    assert RandomPartialUpdating(floored).update(context_for(tiny, floored)).selected == 30 + 4
    repeat = RandomPartialUpdating(spec).update(context_for(tiny, spec))
    # The reference's bar: the deployed (start) model's validation accuracy, strictly beaten (multiround_rpu.py:268).
    assert result.send_threshold is not None and not result.ties_send
    assert all(np.array_equal(result.weights[n], repeat.weights[n]) for n in result.weights)
    other_seed = RandomPartialUpdating(spec).update(context_for(tiny, spec, seed=4))
    changed = result.weights["0.weight"] != deployed["0.weight"]
    assert not np.array_equal(changed, other_seed.weights["0.weight"] != deployed["0.weight"])


def test_magnitude_round_sends_at_most_k_final_values(tiny) -> None:  # type: ignore[no-untyped-def]
    spec = UpdateSpec(strategy="magnitude", **SMALL)
    _, _, deployed = tiny
    result = MagnitudeUpdating(spec).update(context_for(tiny, spec))
    k = math.floor(0.05 * TOTAL)
    assert result.selected == k and result.partial_count == TOTAL and result.snapshot is None
    assert 0 < changed_partial_weights(deployed, result.weights) <= k
    assert not np.array_equal(result.weights["0.bias"], deployed["0.bias"])


def test_pruning_round_is_a_sparse_snapshot_trained_from_initial_weights(tiny) -> None:  # type: ignore[no-untyped-def]
    spec = UpdateSpec(strategy="pruning", **SMALL)
    arrival, initial, deployed = tiny
    result = PruningUpdating(spec).update(context_for(tiny, spec))
    k = math.floor(0.05 * TOTAL)
    assert result.snapshot == "sparse" and result.selected == k
    # The reference's bar: w⁰'s validation accuracy; a tie sends only the pruned point (multiround_pruning.py:271).
    assert result.send_threshold is not None and result.ties_send == (result.checkpoint_epoch == 0)
    nonzero = sum(int(np.count_nonzero(v)) for v in result.weights.values() if v.ndim > 1)
    assert 0 < nonzero <= k
    # The start point is w⁰, not the deployed weights: another deployed model gives the same result.
    shifted = {name: value + np.float32(0.5) for name, value in deployed.items()}
    again = PruningUpdating(spec).update(context_for(tiny, spec, start=shifted))
    assert all(np.array_equal(result.weights[n], again.weights[n]) for n in result.weights)
    with pytest.raises(ServerError, match="w⁰"):
        PruningUpdating(spec).update(
            RoundContext(1, build_model(ModelSpec(hidden=[16]), 64, 10, 0), deployed, arrival.training_set(1),
                         arrival.validation, spec, 1)
        )


def test_full_same_init_ignores_the_deployed_weights_last_round_does_not(tiny) -> None:  # type: ignore[no-untyped-def]
    _, _, deployed = tiny
    shifted = {name: value + np.float32(0.5) for name, value in deployed.items()}
    same = UpdateSpec(strategy="full", full_variant="same_init", **SMALL)
    a = FullUpdating(same).update(context_for(tiny, same))
    b = FullUpdating(same).update(context_for(tiny, same, start=shifted))
    assert a.snapshot == "full" and a.selected is None
    assert all(np.array_equal(a.weights[n], b.weights[n]) for n in a.weights)
    last = UpdateSpec(strategy="full", full_variant="last_round", **SMALL)
    c = FullUpdating(last).update(context_for(tiny, last))
    d = FullUpdating(last).update(context_for(tiny, last, start=shifted))
    assert not np.array_equal(c.weights["0.weight"], d.weights["0.weight"])
