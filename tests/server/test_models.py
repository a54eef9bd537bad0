"""Model building (seeded, no global RNG use), weight dict round trips and evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.data import Split
from server.errors import ServerError
from server.models import build_model, evaluate_accuracy, get_weights, set_weights
from testbed.scenario import ModelSpec


def test_build_model_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = get_weights(build_model(ModelSpec(hidden=[16, 8]), 64, 10, seed=7))
    assert torch.equal(torch.rand(1), expected_next)
    b = get_weights(build_model(ModelSpec(hidden=[16, 8]), 64, 10, seed=7))
    c = get_weights(build_model(ModelSpec(hidden=[16, 8]), 64, 10, seed=8))
    assert list(a) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [v.shape for v in a.values()] == [(16, 64), (16,), (8, 16), (8,), (10, 8), (10,)]
    assert all(np.array_equal(a[n], b[n]) and a[n].dtype == np.float32 for n in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])


def test_set_weights_round_trip_and_errors() -> None:
    model = build_model(ModelSpec(hidden=[4]), 3, 2, seed=0)
    weights = {name: np.full_like(value, 0.5) for name, value in get_weights(model).items()}
    set_weights(model, weights)
    assert all(np.array_equal(v, weights[n]) for n, v in get_weights(model).items())
    weights["0.weight"][0, 0] = 9.0
    assert get_weights(model)["0.weight"][0, 0] == 0.5  # get_weights copies
    with pytest.raises(ServerError, match="missing \\['2.bias'\\]"):
        set_weights(model, {n: v for n, v in weights.items() if n != "2.bias"})
    with pytest.raises(ServerError, match="unexpected \\['extra'\\]"):
        set_weights(model, {**weights, "extra": np.zeros(1, np.float32)})
    with pytest.raises(ServerError, match="shape \\(3, 4\\)"):
        set_weights(model, {**weights, "0.weight": np.zeros((3, 4), np.float32)})


def test_evaluate_accuracy_restores_training_mode() -> None:
    model = build_model(ModelSpec(hidden=[4]), 3, 2, seed=0)
    x = np.eye(3, dtype=np.float32)
    predictions = model(torch.from_numpy(x)).argmax(dim=1).numpy()
    model.train()
    assert evaluate_accuracy(model, Split(x, predictions.astype(np.int64))) == 1.0
    assert model.training
    assert evaluate_accuracy(model, Split(np.zeros((0, 3), np.float32), np.zeros(0, np.int64))) == 0.0
