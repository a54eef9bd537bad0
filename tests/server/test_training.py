"""Training loop: local contribution against a manual SGD loop, masks, best-checkpoint restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.data import Split
from server.errors import ServerError
from server.models import evaluate_accuracy, get_weights, set_weights
from server.training import TrainingConfig, train_epochs


def toy_problem(samples: int = 40, features: int = 3, classes: int = 3) -> tuple[nn.Module, Split]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(samples, features)).astype(np.float32)
    y = (x @ rng.normal(size=(features, classes))).argmax(axis=1).astype(np.int64)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, classes)), Split(x, y)


def plain_sgd(parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(parameters, lr=lr)


def test_local_contribution_matches_a_manual_sgd_loop() -> None:
    model, split = toy_problem()
    start = get_weights(model)
    epochs, lr, batch_size, seed = 6, 0.3, 8, 11
    result = train_epochs(model, split, TrainingConfig(epochs, lr, batch_size, seed, make_optimizer=plain_sgd),
                          track_local_contribution=True)
    assert result.local_contribution is not None

    # Independent loop: same batches, w ← w − lr_epoch·g, l += −g·Δw, in float64.
    weights = {name: torch.tensor(value, dtype=torch.float64) for name, value in start.items()}
    local = {name: torch.zeros_like(value) for name, value in weights.items()}
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.from_numpy(split.x).double(), torch.from_numpy(split.y)
    step_size = max(1, epochs // 3)
    for epoch in range(epochs):
        epoch_lr = lr * 0.1 ** (epoch // step_size)
        order = torch.randperm(len(split), generator=generator)
        for start_index in range(0, len(split), batch_size):
            batch = order[start_index : start_index + batch_size]
            w = weights["0.weight"].clone().requires_grad_(True)
            b = weights["0.bias"].clone().requires_grad_(True)
            F.cross_entropy(x[batch] @ w.T + b, y[batch]).backward()
            for name, parameter in (("0.weight", w), ("0.bias", b)):
                delta = -epoch_lr * parameter.grad
                local[name] += -parameter.grad * delta
                weights[name] = weights[name] + delta
    for name in start:
        np.testing.assert_allclose(result.local_contribution[name], local[name].numpy(), rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(get_weights(model)[name], weights[name].numpy(), rtol=1e-4, atol=1e-6)
    assert all(value.min() >= 0 for value in result.local_contribution.values())  # SGD: l = lr·g² ≥ 0


def test_local_contribution_with_adam_uses_the_actual_step() -> None:
    model, split = toy_problem()
    result = train_epochs(model, split, TrainingConfig(3, 0.05, 8, 2), track_local_contribution=True)
    assert result.local_contribution is not None
    assert sum(float(v.sum()) for v in result.local_contribution.values()) > 0


def test_masked_training_leaves_unmasked_entries_bit_identical() -> None:
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 5)).astype(np.float32)
    split = Split(x, (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0))
    start = get_weights(model)
    masks = {name: torch.from_numpy(rng.random(value.shape) < 0.2) for name, value in start.items() if value.ndim > 1}
    result = train_epochs(model, split, TrainingConfig(5, 0.05, 16, 3), trainable_masks=masks, track_local_contribution=True)
    after = get_weights(model)
    for name, value in start.items():
        if name in masks:
            mask = masks[name].numpy()
            np.testing.assert_array_equal(after[name][~mask], value[~mask])
            assert np.count_nonzero(after[name][mask] != value[mask]) > 0
            assert np.all(result.local_contribution[name][~mask] == 0.0)
        else:
            assert not np.array_equal(after[name], value), f"{name} (no mask) should train freely"


def test_bad_mask_shape_is_a_server_error() -> None:
    model, split = toy_problem()
    with pytest.raises(ServerError, match="shape"):
        train_epochs(model, split, TrainingConfig(1, 0.1, 8, 0), trainable_masks={"0.weight": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ServerError, match="validation"):
        train_epochs(model, split, TrainingConfig(1, 0.1, 8, 0), keep_best=True)


def test_keep_best_restores_the_best_epoch() -> None:
    model, split = toy_problem(samples=120)
    # Validation labels disagree with training labels, so validation accuracy falls as training proceeds.
    validation = Split(split.x, (split.y + 1) % 3)
    start = get_weights(model)
    result = train_epochs(model, split, TrainingConfig(9, 0.1, 16, 5), validation=validation, keep_best=True)
    assert result.best_epoch == 1
    assert evaluate_accuracy(model, validation) == result.best_validation_accuracy
    # The first epoch of a 9-epoch run equals a 1-epoch run (same batches, same learning rate).
    reference, _ = toy_problem(samples=120)
    set_weights(reference, start)
    train_epochs(reference, split, TrainingConfig(1, 0.1, 16, 5))
    for name, value in get_weights(reference).items():
        np.testing.assert_array_equal(get_weights(model)[name], value)
    # Without keep_best the last epoch stays, and it validates worse.
    set_weights(reference, start)
    plain = train_epochs(reference, split, TrainingConfig(9, 0.1, 16, 5), validation=validation)
    assert plain.best_validation_accuracy == result.best_validation_accuracy
    assert evaluate_accuracy(reference, validation) < result.best_validation_accuracy


def test_same_seed_same_weights() -> None:
    runs = []
    for _ in range(2):
        model, split = toy_problem()
        train_epochs(model, split, TrainingConfig(3, 0.05, 8, 9))
        runs.append(get_weights(model))
    for name in runs[0]:
        np.testing.assert_array_equal(runs[0][name], runs[1][name])
