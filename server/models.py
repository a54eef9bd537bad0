"""The model zoo (a seeded MLP) and conversion between torch modules and ordered weight dicts."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from server.errors import ServerError

if TYPE_CHECKING:
    from server.data import Split
    from testbed.scenario import ModelSpec

WeightDict = dict[str, np.ndarray]
"""Float32 arrays by parameter name, in `model.named_parameters()` order."""


def build_model(spec: ModelSpec, num_features: int, num_classes: int, seed: int) -> nn.Module:
    """An MLP (Linear+ReLU per hidden width, then a Linear) initialised only from `seed`."""
    if spec.kind != "mlp":
        raise ServerError(f"unknown model kind {spec.kind!r}; only 'mlp' is available")
    widths = [num_features, *spec.hidden]
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out, device="meta"), nn.ReLU()]
    layers.append(nn.Linear(widths[-1], num_classes, device="meta"))
    # Built on the meta device, so the global torch RNG is not touched; filled from a local generator.
    model = nn.Sequential(*layers).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.in_features)  # torch's default Linear init range
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
    return model


def get_weights(model: nn.Module) -> WeightDict:
    """Detached float32 numpy copies of every parameter, in `named_parameters()` order."""
    return {
        name: parameter.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, parameter in model.named_parameters()
    }


def set_weights(model: nn.Module, weights: WeightDict) -> None:
    """Copy `weights` into `model`; the names and shapes must match exactly."""
    parameters = dict(model.named_parameters())
    missing = [name for name in parameters if name not in weights]
    extra = [name for name in weights if name not in parameters]
    if missing or extra:
        raise ServerError(f"weights do not fit the model: missing {missing or 'none'}, unexpected {extra or 'none'}")
    for name, parameter in parameters.items():
        value = np.asarray(weights[name])
        if tuple(value.shape) != tuple(parameter.shape):
            raise ServerError(
                f"weight {name!r} has shape {tuple(value.shape)}, the model expects {tuple(parameter.shape)}"
            )
    with torch.no_grad():
        for name, parameter in parameters.items():
            parameter.copy_(torch.from_numpy(np.ascontiguousarray(weights[name], dtype=np.float32)))


def partial_names(weights: WeightDict | dict[str, torch.Tensor]) -> list[str]:
    """Names of the partially updated tensors (ndim > 1: linear/conv weights), in order."""
    return [name for name, value in weights.items() if value.ndim > 1]


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Predicted class per row of `x` (eval mode, no gradients; the module's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        outputs = [
            model(torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))).argmax(dim=1)
            for start in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    if not outputs:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(outputs).numpy().astype(np.int64)


def evaluate_accuracy(model: nn.Module, split: Split) -> float:
    """Fraction of `split` classified correctly (0.0 for an empty split)."""
    if len(split) == 0:
        return 0.0
    return float(np.mean(predict(model, split.x) == split.y))
