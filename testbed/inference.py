"""Device-side inference backed by the server's model zoo (the emulated fleet's InferenceModel)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from server.data import Split
from server.models import evaluate_accuracy, get_weights, set_weights


class TorchInference:
    """A torch model plus the device's local test split; loads weights and measures accuracy."""

    def __init__(self, model: torch.nn.Module, test_split: Split) -> None:
        self.model = model
        self.test_split = test_split
        self._initial = get_weights(model)

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {name: array.copy() for name, array in self._initial.items()}

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        set_weights(self.model, dict(weights))

    def accuracy(self) -> float:
        return evaluate_accuracy(self.model, self.test_split)
