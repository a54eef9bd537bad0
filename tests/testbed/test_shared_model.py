"""The emulated devices of a process share one torch model and one read-only w⁰, and still each evaluate their own
weights: the same accuracy and modelled work as with a model of their own."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from devices.update_receiver import UpdateReceiver, UpdateTrust
from server.data import device_test_split, load_dataset_arrival
from server.models import build_model
from testbed.core.scenario import load_scenario
from testbed.core.signing import SigningKey
from testbed.inference import SharedModel, TorchInference

ROOT = Path(__file__).resolve().parents[2]
SEED = 7


@pytest.fixture(scope="module")
def setting() -> tuple[object, object]:
    scenario = load_scenario(ROOT / "scenarios" / "lowband.yaml")
    arrival = load_dataset_arrival(scenario.data, SEED)
    model = build_model(scenario.model, arrival.num_features, arrival.num_classes, SEED,
                        input_shape=arrival.input_shape)
    return model, arrival


def _perturbed(weights: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: (array + rng.normal(0, 0.5, array.shape)).astype(np.float32) for name, array in weights.items()}


def test_devices_on_one_model_evaluate_their_own_weights_as_on_models_of_their_own(setting) -> None:
    model, arrival = setting
    shared = SharedModel(copy.deepcopy(model))
    splits = [device_test_split(arrival.test, index, 120, SEED) for index in range(3)]
    on_shared = [shared.for_device(split) for split in splits]
    on_own = [TorchInference(copy.deepcopy(model), split) for split in splits]
    held = [on_shared[0].initial_weights(), _perturbed(on_shared[0].initial_weights(), 1),
            _perturbed(on_shared[0].initial_weights(), 2)]
    for inference, weights in zip(on_shared + on_own, held + held):
        inference.load_weights(weights)
    accuracies = [[inference.accuracy() for inference in group] for group in (on_shared, on_own)]
    assert accuracies[0] == accuracies[1]
    assert len(set(accuracies[0])) > 1  # the devices' weights differ, and so do their accuracies
    assert [on_shared[index].accuracy() for index in (2, 0, 1)] == [accuracies[1][index] for index in (2, 0, 1)]
    assert [inference.evaluation_macs() for inference in on_shared] == [inference.evaluation_macs()
                                                                        for inference in on_own]


def test_the_shared_w0_is_read_only_and_handed_out_as_copies(setting) -> None:
    model, arrival = setting
    shared = SharedModel(copy.deepcopy(model))
    name = next(iter(shared.initial))
    with pytest.raises(ValueError, match="read-only"):
        shared.initial[name][...] = 0.0
    given = shared.for_device(device_test_split(arrival.test, 0, 10, SEED)).initial_weights()
    given[name][...] = 0.0  # a copy: the caller may change it
    assert np.any(shared.initial[name] != 0.0)


def test_receivers_of_one_process_hold_one_read_only_w0(setting) -> None:
    model, arrival = setting
    architecture = SharedModel(copy.deepcopy(model)).initial
    trust = UpdateTrust("run", SigningKey.generate().trusted_key)
    first, second = UpdateReceiver(architecture, SEED, trust), UpdateReceiver(architecture, SEED, trust)
    for name in first.initial_weights:
        assert first.initial_weights[name] is second.initial_weights[name]
        assert not first.initial_weights[name].flags.writeable
    assert first.initial_weights is not second.initial_weights  # each its own dict of the shared arrays
    other_seed = UpdateReceiver(architecture, SEED + 1, trust)
    first_tensor = next(iter(first.initial_weights))
    assert not np.array_equal(other_seed.initial_weights[first_tensor], first.initial_weights[first_tensor])
