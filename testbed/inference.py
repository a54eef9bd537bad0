"""Device-side inference backed by the server's model zoo (the emulated fleet's InferenceModel)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from server.data import Split, device_test_split, load_dataset_arrival
from server.models import build_model, evaluate_accuracy, get_weights, set_weights
from testbed.core.scenario import Scenario


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


def device_inference(scenario: Scenario, device_index: int) -> TorchInference:
    """What device number `device_index` of a run runs, built from the scenario alone (on a board).

    The same model (w⁰ from the seed) and local test split the run's server gives its emulated devices.
    """
    seed = int(scenario.seed)
    arrival = load_dataset_arrival(scenario.data, seed)
    model = build_model(scenario.model, arrival.num_features, arrival.num_classes, seed, input_shape=arrival.input_shape)
    return TorchInference(model, device_test_split(arrival.test, device_index, scenario.data.device_test_samples, seed))
