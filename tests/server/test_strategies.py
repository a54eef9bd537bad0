"""Selection metrics and top-k on hand-made tensors, plus the DPU invariant on a real round."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from server.data import load_dataset_arrival
from server.errors import ServerError
from testbed.core.plugins import STRATEGIES
from server.models import build_model, get_weights
from server.strategies import (
    DeepPartialUpdating,
    FullUpdating,
    RoundContext,
    changed_partial_weights,
    dpu_metric,
    global_contribution,
    make_strategy,
    partial_count_for_ratio,
    rewind,
    select_top_k,
)
from server.training import TrainingConfig, train_epochs
from testbed.core.scenario import DataSpec, ModelSpec, UpdateSpec


def test_global_contribution_is_squared_change_of_matrices_only() -> None:
    start = {"w": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), "b": np.array([0.0, 0.0], np.float32)}
    final = {"w": np.array([[1.5, 2.0], [1.0, 4.0]], np.float32), "b": np.array([5.0, 5.0], np.float32)}
    contribution = global_contribution(start, final)
    assert list(contribution) == ["w"]
    np.testing.assert_array_equal(contribution["w"], [[0.25, 0.0], [4.0, 0.0]])


def test_dpu_metric_equals_the_definition_computed_by_loops() -> None:
    rng = np.random.default_rng(3)
    global_c = {"a": rng.random((3, 4)), "b": rng.random((2, 5))}
    local_c = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=(2, 5)), "bias": rng.normal(size=5)}
    lam = 0.3
    metric = dpu_metric(global_c, local_c, lam)
    global_sum = sum(float(v) for name in global_c for v in global_c[name].ravel())
    local_sum = sum(float(v) for name in global_c for v in local_c[name].ravel())
    assert list(metric) == ["a", "b"]
    for name in global_c:
        for index in np.ndindex(global_c[name].shape):
            expected = lam * global_c[name][index] / global_sum + (1 - lam) * local_c[name][index] / local_sum
            assert metric[name][index] == pytest.approx(expected, rel=1e-12)


def test_dpu_metric_guards_a_zero_sum() -> None:
    global_c = {"a": np.zeros((2, 2))}
    local_c = {"a": np.array([[1.0, 3.0], [0.0, 0.0]])}
    metric = dpu_metric(global_c, local_c, 0.5)
    np.testing.assert_allclose(metric["a"], [[0.125, 0.375], [0.0, 0.0]])
    assert np.all(dpu_metric(global_c, {"a": np.zeros((2, 2))}, 0.5)["a"] == 0.0)


def test_lambda_one_ranks_by_squared_change_and_ignores_local() -> None:
    rng = np.random.default_rng(7)
    start = {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=(3, 3)).astype(np.float32)}
    final = {name: (value + rng.normal(size=value.shape)).astype(np.float32) for name, value in start.items()}
    metric = dpu_metric(global_contribution(start, final), None, 1.0)
    masks = select_top_k(metric, 7)
    squared = np.concatenate([((final[n].astype(np.float64) - start[n]) ** 2).ravel() for n in start])
    expected = np.zeros(squared.size, bool)
    expected[np.argsort(-squared, kind="stable")[:7]] = True
    np.testing.assert_array_equal(np.concatenate([masks[n].ravel() for n in start]), expected)


def test_top_k_is_global_across_tensors_not_per_layer() -> None:
    metric = {"first": np.array([[9.0, 8.0], [7.0, 6.0]]), "second": np.array([[1.0, 2.0], [3.0, 10.0]])}
    masks = select_top_k(metric, 3)
    np.testing.assert_array_equal(masks["first"], [[True, True], [False, False]])
    np.testing.assert_array_equal(masks["second"], [[False, False], [False, True]])
    assert masks["first"].dtype == bool


def test_ties_go_to_the_earlier_flat_position_across_tensors() -> None:
    metric = {"first": np.array([[1.0, 5.0], [5.0, 1.0]]), "second": np.array([[5.0, 5.0]])}
    masks = select_top_k(metric, 3)
    np.testing.assert_array_equal(masks["first"], [[False, True], [True, False]])
    np.testing.assert_array_equal(masks["second"], [[True, False]])
    assert all(np.array_equal(masks[n], select_top_k(metric, 3)[n]) for n in metric)


def test_k_zero_and_k_all() -> None:
    metric = {"a": np.arange(6.0).reshape(2, 3), "b": np.ones((1, 2))}
    assert sum(int(m.sum()) for m in select_top_k(metric, 0).values()) == 0
    assert all(m.all() for m in select_top_k(metric, 8).values())
    with pytest.raises(ServerError, match="k=9 of 8"):
        select_top_k(metric, 9)
    with pytest.raises(ServerError):
        select_top_k(metric, -1)


def test_partial_count_for_ratio_floors_robustly() -> None:
    assert partial_count_for_ratio(17024, 0.05) == 851
    assert partial_count_for_ratio(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in floats
    assert partial_count_for_ratio(10, 0.05) == 0
    assert partial_count_for_ratio(10, 1.0) == 10


tensors = st.lists(
    hnp.arrays(
        np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=5), elements=st.integers(-3, 3).map(float)
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=200, deadline=None)
@given(tensors, st.data())
def test_exactly_k_selected_and_selected_dominate_unselected(arrays: list[np.ndarray], data: st.DataObject) -> None:
    metric = {f"t{i}": array for i, array in enumerate(arrays)}
    total = sum(array.size for array in arrays)
    k = data.draw(st.integers(0, total))
    masks = select_top_k(metric, k)
    flat_metric = np.concatenate([a.ravel() for a in arrays])
    flat_mask = np.concatenate([masks[n].ravel() for n in metric])
    assert int(flat_mask.sum()) == k
    if 0 < k < total:
        assert flat_metric[flat_mask].min() >= flat_metric[~flat_mask].max()
        boundary = flat_metric[flat_mask].min()
        tied = np.flatnonzero(flat_metric == boundary)
        chosen_tied = flat_mask[tied]
        assert np.all(np.diff(chosen_tied.astype(int)) <= 0), "ties must go to earlier positions first"


def test_rewind_keeps_selected_and_one_dimensional_trained_values() -> None:
    start = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    trained = {"w": np.ones((2, 2), np.float32), "b": np.ones(2, np.float32)}
    result = rewind(start, trained, {"w": np.array([[True, False], [False, True]])})
    np.testing.assert_array_equal(result["w"], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(result["b"], [1, 1])


def test_registry_and_factory() -> None:
    assert set(STRATEGIES.names()) == {"full", "dpu", "gcpu", "lcpu", "rpu", "pruning", "magnitude", "no-update",
                                       "biases-only"}
    assert STRATEGIES.get("full") is FullUpdating and STRATEGIES.get("dpu") is DeepPartialUpdating
    for name, strategy in STRATEGIES.load_all().items():
        made = make_strategy(UpdateSpec(strategy=name))
        assert type(made) is strategy and made.name == name
    assert isinstance(make_strategy(UpdateSpec(strategy="gcpu")), DeepPartialUpdating)
    with pytest.raises(ServerError, match="unknown strategy"):
        make_strategy(UpdateSpec.model_construct(strategy="nope"))


class RecordingDPU(DeepPartialUpdating):
    """DPU that remembers the masks it fine-tuned with."""

    def sparse_fine_tune(self, context, base, masks, *args, **kwargs):  # type: ignore[no-untyped-def]
        self.masks = masks
        return super().sparse_fine_tune(context, base, masks, *args, **kwargs)


def test_dpu_round_changes_only_the_selected_weights() -> None:
    arrival = load_dataset_arrival(DataSpec(initial_samples=200, new_samples_per_round=100), seed=1)
    model = build_model(ModelSpec(hidden=[32]), arrival.num_features, arrival.num_classes, seed=1)
    spec = UpdateSpec(strategy="dpu", ratio=0.02, epochs=4)
    train_epochs(model, arrival.training_set(0), TrainingConfig(30, spec.lr, 32, seed=0))  # the deployed model
    start = get_weights(model)
    strategy = RecordingDPU(spec)
    context = RoundContext(1, model, start, arrival.training_set(1), arrival.validation, spec, seed=1)
    result = strategy.update(context)
    total = 64 * 32 + 32 * 10
    k = math.floor(0.02 * total)
    assert result.selected == k and result.partial_count == total
    assert sum(int(m.sum()) for m in strategy.masks.values()) == k
    for name, value in start.items():
        if value.ndim > 1:
            changed = result.weights[name] != value
            assert not np.any(changed & ~strategy.masks[name]), f"{name} changed outside the selection"
        else:
            assert not np.array_equal(result.weights[name], value), "biases are trained and always sent"
    assert 0 < changed_partial_weights(start, result.weights) <= k
    assert result.validation_accuracy > 0.85
