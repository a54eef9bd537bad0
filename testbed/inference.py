"""Device-side inference backed by the server's model zoo (the emulated fleet's InferenceModel)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from server.data import Split, device_test_split, load_dataset_arrival
from server.models import build_model, evaluate_accuracy, get_weights, set_weights
from testbed.core.scenario import Scenario


class TorchInference:
    """A torch model plus the device's local test split; loads weights and measures accuracy.

    The model may be shared by the devices of a process (`SharedModel.for_device`): each device keeps only a
    reference to the weights it holds and puts them into the model just before it evaluates (evaluation does
    not await, so no other device comes in between), so a device costs its weights, not a model and two copies.
    """

    def __init__(self, model: torch.nn.Module, test_split: Split, shared: SharedModel | None = None) -> None:
        self.model = model
        self.test_split = test_split
        self._shared = shared
        self._initial = shared.initial if shared is not None else get_weights(model)
        """w⁰ of the model (the model's own weights when it was given): read, never written."""
        self._held: Mapping[str, np.ndarray] = self._initial
        self._evaluation_macs: int | None = None

    def initial_weights(self) -> dict[str, np.ndarray]:
        return {name: array.copy() for name, array in self._initial.items()}

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Hold `weights` (a reference: the caller replaces, never changes, the arrays it deployed)."""
        self._held = weights

    def accuracy(self) -> float:
        with warnings.catch_warnings():  # shared w⁰ is read-only; torch only reads it here (copies it into the model)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
            set_weights(self.model, dict(self._held))
        return evaluate_accuracy(self.model, self.test_split)

    def evaluation_macs(self) -> int:
        """Multiply-accumulates of one evaluation of the local test split (counted on one sample's forward
        pass through the linear and convolution layers; activations and pooling are not counted)."""
        if self._evaluation_macs is None:
            sample = self.test_split.x[:1]
            per_sample = (macs_per_sample(self.model, sample) if self._shared is None
                          else self._shared.macs_per_sample(sample))
            self._evaluation_macs = per_sample * len(self.test_split.y)
        return self._evaluation_macs


def macs_per_sample(model: torch.nn.Module, sample: np.ndarray) -> int:
    """Multiply-accumulates of `model`'s linear and convolution layers on one sample (`sample`: a batch of one)."""
    per_sample = 0

    def count(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal per_sample
        if isinstance(module, torch.nn.Linear):
            per_sample += module.in_features * module.out_features
        elif isinstance(module, torch.nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            per_sample += int(output[0].numel()) * kernel

    hooks = [module.register_forward_hook(count) for module in model.modules()
             if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))]
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            model(torch.as_tensor(sample))
            model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return per_sample


class SharedModel:
    """One torch model and its w⁰ for every emulated device of a process (each with its own test split)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.initial = get_weights(model)
        for array in self.initial.values():
            array.setflags(write=False)  # shared by every device: a write would change them all
        self._macs_per_sample: int | None = None

    def for_device(self, test_split: Split) -> TorchInference:
        """The inference of a device with local data `test_split`, on the shared model."""
        return TorchInference(self.model, test_split, self)

    def macs_per_sample(self, sample: np.ndarray) -> int:
        """`macs_per_sample` of the model, counted once (every device's samples have the same shape)."""
        if self._macs_per_sample is None:
            self._macs_per_sample = macs_per_sample(self.model, sample)
        return self._macs_per_sample


def device_inference(scenario: Scenario, device_index: int) -> TorchInference:
    """What device number `device_index` of a run runs, built from the scenario alone (on a board).

    The same model (w⁰ from the seed) and local test split the run's server gives its emulated devices.
    """
    seed = int(scenario.seed)
    arrival = load_dataset_arrival(scenario.data, seed)
    model = build_model(scenario.model, arrival.num_features, arrival.num_classes, seed, input_shape=arrival.input_shape)
    return TorchInference(model, device_test_split(arrival.test, device_index, scenario.data.device_test_samples, seed))
