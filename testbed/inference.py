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
        self._evaluation_macs: int | None = None

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {name: array.copy() for name, array in self._initial.items()}

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        set_weights(self.model, dict(weights))

    def accuracy(self) -> float:
        return evaluate_accuracy(self.model, self.test_split)

    def evaluation_macs(self) -> int:
        """Multiply-accumulates of one evaluation of the local test split (counted on one sample's forward
        pass through the linear and convolution layers; activations and pooling are not counted)."""
        if self._evaluation_macs is None:
            per_sample = 0

            def count(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                nonlocal per_sample
                if isinstance(module, torch.nn.Linear):
                    per_sample += module.in_features * module.out_features
                elif isinstance(module, torch.nn.Conv2d):
                    kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
                    per_sample += int(output[0].numel()) * kernel

            hooks = [module.register_forward_hook(count) for module in self.model.modules()
                     if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
            try:
                with torch.no_grad():
                    was_training = self.model.training
                    self.model.eval()
                    self.model(torch.as_tensor(self.test_split.x[:1]))
                    self.model.train(was_training)
            finally:
                for hook in hooks:
                    hook.remove()
            self._evaluation_macs = per_sample * len(self.test_split.y)
        return self._evaluation_macs


def device_inference(scenario: Scenario, device_index: int) -> TorchInference:
    """What device number `device_index` of a run runs, built from the scenario alone (on a board).

    The same model (w⁰ from the seed) and local test split the run's server gives its emulated devices.
    """
    seed = int(scenario.seed)
    arrival = load_dataset_arrival(scenario.data, seed)
    model = build_model(scenario.model, arrival.num_features, arrival.num_classes, seed, input_shape=arrival.input_shape)
    return TorchInference(model, device_test_split(arrival.test, device_index, scenario.data.device_test_samples, seed))
