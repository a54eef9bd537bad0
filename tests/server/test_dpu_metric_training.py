"""The DPU metric from its definition, with a hand-written training loop, against train_epochs + dpu_metric."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from server.data import load_dataset_arrival
from server.models import build_model, get_weights, set_weights
from server.strategies import dpu_metric, global_contribution, select_top_k
from server.training import TrainingConfig, train_epochs
from testbed.core.scenario import DataSpec, ModelSpec


def test_dpu_metric_matches_its_definition_on_a_real_training_run() -> None:
    arrival = load_dataset_arrival(DataSpec(initial_samples=120, new_samples_per_round=50), seed=4)
    split = arrival.training_set(0)
    model = build_model(ModelSpec(hidden=[12]), arrival.num_features, arrival.num_classes, seed=4)
    start = get_weights(model)
    epochs, lr, batch_size, seed, lam = 3, 0.01, 32, 11, 0.4

    run = train_epochs(model, split, TrainingConfig(epochs, lr, batch_size, seed), track_local_contribution=True)
    library_metric = dpu_metric(global_contribution(start, get_weights(model)), run.local_contribution, lam)

    # By hand: the same Adam + StepLR steps; l_i = Σ_t −g_{i,t}·Δw_{i,t} with Δw the optimizer's actual step.
    manual = build_model(ModelSpec(hidden=[12]), arrival.num_features, arrival.num_classes, seed=0)
    set_weights(manual, start)
    parameters = dict(manual.named_parameters())
    optimizer = torch.optim.Adam(manual.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    local = {name: np.zeros(tuple(p.shape), np.float64) for name, p in parameters.items()}
    x, y = torch.from_numpy(split.x), torch.from_numpy(split.y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(split), generator=generator)
        for begin in range(0, len(split), batch_size):
            batch = order[begin : begin + batch_size]
            optimizer.zero_grad(set_to_none=False)
            F.cross_entropy(manual(x[batch]), y[batch]).backward()
            gradient = {name: p.grad.detach().double().numpy().copy() for name, p in parameters.items()}
            before = {name: p.detach().double().numpy().copy() for name, p in parameters.items()}
            optimizer.step()
            for name, p in parameters.items():
                local[name] -= gradient[name] * (p.detach().double().numpy() - before[name])
        scheduler.step()
    final = get_weights(manual)

    partial = [name for name, value in start.items() if value.ndim > 1]
    global_c = {name: (final[name].astype(np.float64) - start[name].astype(np.float64)) ** 2 for name in partial}
    global_sum = sum(float(global_c[name].sum()) for name in partial)
    local_sum = sum(float(local[name].sum()) for name in partial)
    assert global_sum > 0 and local_sum > 0
    assert list(library_metric) == partial
    for name in partial:
        expected = lam * global_c[name] / global_sum + (1 - lam) * local[name] / local_sum
        np.testing.assert_allclose(library_metric[name], expected, rtol=1e-9, atol=1e-15)
    k = 40
    library_masks = select_top_k(library_metric, k)
    expected_masks = select_top_k(
        {name: lam * global_c[name] / global_sum + (1 - lam) * local[name] / local_sum for name in partial}, k
    )
    assert all(np.array_equal(library_masks[name], expected_masks[name]) for name in partial)
