"""Training loops: Adam + StepLR with seeded shuffling, optional masks, local contribution and best-checkpoint.

The reference code (zqu1992/DPU) is cited as file:line; its Adam (myoptimizer.py:8-87) masks the step
rather than the gradient, which for the entries that train gives the same steps as masking the gradient here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from server.data import Split
from server.errors import ServerError
from server.models import evaluate_accuracy

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]
"""Builds the optimizer from the parameters and the learning rate."""


def adam(parameters: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam with torch defaults, as in the DPU reference for MLP/VGG."""
    return torch.optim.Adam(parameters, lr=lr)


@dataclass
class TrainingResult:
    """What a call to `train_epochs` measured besides the weights it left in the model."""

    epochs_run: int
    local_contribution: dict[str, np.ndarray] | None = None
    """Per parameter, Σ over optimizer steps of −g·Δw (float64), when tracking was asked for."""
    best_validation_accuracy: float | None = None
    best_epoch: int | None = None
    """1-based epoch of the best validation accuracy; 0 when the starting weights were a candidate and no epoch
    validated strictly better."""
    optimizer: torch.optim.Optimizer | None = None
    """The optimizer the call trained with, for a later call to continue with (its Adam moments and step count)."""


def _checked_masks(
    parameters: dict[str, nn.Parameter], trainable_masks: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    if not trainable_masks:
        return {}
    masks: dict[str, torch.Tensor] = {}
    for name, mask in trainable_masks.items():
        if name not in parameters:
            raise ServerError(f"trainable mask for {name!r}, but the model has no such parameter")
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(parameters[name].shape):
            raise ServerError(
                f"trainable mask for {name!r} has shape {tuple(mask.shape)}, "
                f"the parameter {tuple(parameters[name].shape)}"
            )
        masks[name] = mask.to(dtype=torch.bool, device=parameters[name].device)
    return masks


@dataclass(frozen=True)
class TrainingConfig:
    """How one call to `train_epochs` trains: epochs, Adam's learning rate, batch size and the batch-order seed."""

    epochs: int
    lr: float
    batch_size: int
    seed: int
    """Seeds the batch order (a torch Generator), e.g. ``round_seed(seed, round, RoundStep.FULL_TRAINING)``."""
    make_optimizer: OptimizerFactory = adam


def train_epochs(
    model: nn.Module,
    split: Split,
    config: TrainingConfig,
    *,
    trainable_masks: dict[str, torch.Tensor] | None = None,
    track_local_contribution: bool = False,
    validation: Split | None = None,
    keep_best: bool = False,
    start_is_candidate: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
) -> TrainingResult:
    """Train `model` in place with Adam(lr) (or `config.make_optimizer`) and StepLR(epochs // 3, 0.1), seeded batches.

    With `trainable_masks`, only the True entries of those tensors change (gradient masked and the
    other entries restored after every step); parameters without a mask train freely. With
    `validation`, accuracy is measured after every epoch; `keep_best` loads the best epoch back, the
    earliest of equals (an epoch replaces the best only when strictly better, multiround_dpu.py:326).
    `start_is_candidate` lets the weights before the first epoch compete as epoch 0 (the reference's
    rewound point, multiround_dpu.py:308-313).

    `optimizer` continues an earlier call's optimizer over the same parameters, its moments and step
    count carried over, as the reference's two DPU steps share one Adam (multiround_dpu.py:177, 245,
    323); its learning rate starts again at `config.lr` under a new StepLR, as the reference's
    ``scheduler.step(epoch=epoch)`` restarts at epoch 0 in each step (multiround_dpu.py:243, 321).
    """
    epochs, lr, batch_size = config.epochs, config.lr, config.batch_size
    if epochs < 0 or batch_size < 1 or lr <= 0:
        raise ServerError(f"need epochs >= 0, batch_size >= 1 and lr > 0, got {epochs}, {batch_size}, {lr}")
    keep_best = keep_best or start_is_candidate
    if keep_best and validation is None:
        raise ServerError("keep_best needs a validation split to choose the best epoch")
    parameters = dict(model.named_parameters())
    masks = _checked_masks(parameters, trainable_masks)
    start_values = {name: parameters[name].detach().clone() for name in masks}
    local = (
        {name: torch.zeros_like(parameter, dtype=torch.float64) for name, parameter in parameters.items()}
        if track_local_contribution
        else None
    )
    x = torch.from_numpy(np.ascontiguousarray(split.x, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(split.y, dtype=np.int64))
    generator = torch.Generator().manual_seed(int(config.seed))
    if optimizer is None:
        optimizer = config.make_optimizer(list(model.parameters()), lr)
    else:
        _restart_learning_rate(optimizer, list(model.parameters()), lr)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, epochs // 3), gamma=0.1)
    best_accuracy: float | None = None
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    if start_is_candidate and validation is not None:
        best_accuracy, best_epoch = evaluate_accuracy(model, validation), 0
        best_state = _state_copy(model)
    was_training = model.training
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(split), generator=generator)
        for start in range(0, len(split), batch_size):
            batch = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=False)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            with torch.no_grad():
                for name, mask in masks.items():
                    if parameters[name].grad is not None:
                        parameters[name].grad.masked_fill_(~mask, 0.0)
                if local is not None:
                    before = {name: parameter.detach().clone() for name, parameter in parameters.items()}
                    gradients = {
                        name: (parameter.grad.detach().clone() if parameter.grad is not None else None)
                        for name, parameter in parameters.items()
                    }
            optimizer.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    parameters[name].copy_(torch.where(mask, parameters[name], start_values[name]))
                if local is not None:
                    for name, parameter in parameters.items():
                        gradient = gradients[name]
                        if gradient is not None:
                            local[name] -= gradient.double() * (parameter.detach().double() - before[name].double())
        scheduler.step()
        if validation is not None:
            accuracy = evaluate_accuracy(model, validation)
            if best_accuracy is None or accuracy > best_accuracy:
                best_accuracy, best_epoch = accuracy, epoch + 1
                if keep_best:
                    best_state = _state_copy(model)
    if keep_best and best_state is not None:
        model.load_state_dict(best_state)
    model.train(was_training)
    return TrainingResult(
        epochs_run=epochs,
        local_contribution=None if local is None else {name: value.numpy() for name, value in local.items()},
        best_validation_accuracy=best_accuracy,
        best_epoch=best_epoch,
        optimizer=optimizer,
    )


def _state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    # The whole state, so BatchNorm running statistics come back with the best epoch too.
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _restart_learning_rate(optimizer: torch.optim.Optimizer, parameters: list[nn.Parameter], lr: float) -> None:
    """Set every group's learning rate (and the schedulers' base) back to `lr`; the optimizer must own `parameters`."""
    owned = {id(parameter) for group in optimizer.param_groups for parameter in group["params"]}
    if any(id(parameter) not in owned for parameter in parameters):
        raise ServerError("the optimizer to continue with does not hold this model's parameters")
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["initial_lr"] = lr
