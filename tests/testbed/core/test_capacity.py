"""testbed.core.capacity agrees with the server (data set sizes, rounds, refusals, model sizes as torch builds them),
and the scenario refuses what does not fit, one line per field."""

from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from server.data import DATASET_LOADERS, load_dataset_arrival
from server.datasets import dataset_directory
from server.errors import ServerError
from server.models import MODEL_BUILDERS, predict
from testbed.core import capacity
from testbed.core.capacity import (
    DATASETS,
    DEFAULT_MEMORY_BUDGET_BYTES,
    data_problems,
    max_rounds,
    memory_estimate,
    model_footprint,
    model_problems,
    training_samples,
)
from testbed.core.scenario import DataSpec, ModelSpec, ScenarioError, load_scenario, parse_scenario
from tests.server.test_datasets import make_cifar, make_mnist

TINY_MNIST = (120, 40)


def plan(data: DataSpec, rounds: int = 1, model: ModelSpec | None = None) -> SimpleNamespace:
    """What data_problems and model_problems read of a scenario, without the scenario's own validation."""
    return SimpleNamespace(data=data, rounds=rounds, model=model or ModelSpec())


# ---------------------------------------------------------------- data sets


def test_digits_facts_are_what_the_server_loads() -> None:
    source = DATASET_LOADERS["digits"](DataSpec())
    facts = DATASETS["digits"]
    assert (len(source.pool_y), source.official_test, source.num_classes) == (facts.pool_samples, None, 10)
    assert source.pool_x.shape[1:] == facts.input_shape
    assert source.pool_x.dtype.itemsize == facts.stored_bytes_per_value


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_image_data_set_facts_are_what_the_server_loads(name: str, tmp_path: Path) -> None:
    """Sample shape, classes and storage, from small generated files."""
    make_mnist(tmp_path) if name == "mnist" else make_cifar(tmp_path)
    facts = DATASETS[name]
    source = DATASET_LOADERS[name](DataSpec(dataset=name, root=tmp_path, download=False))  # type: ignore[arg-type]
    assert source.pool_x.shape[1:] == facts.input_shape and source.num_classes == facts.num_classes
    assert source.pool_x.dtype.itemsize == facts.stored_bytes_per_value


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_official_counts_are_those_of_the_real_files(name: str) -> None:
    cached = dataset_directory(name, None)
    if not cached.is_dir():
        pytest.skip(f"the official {name} files are not in {cached} (tests download nothing)")
    facts = DATASETS[name]
    official = DATASET_LOADERS[name](DataSpec(dataset=name, download=False))  # type: ignore[arg-type]
    assert official.official_test is not None
    assert (len(official.pool_y), len(official.official_test[1])) == (facts.pool_samples, facts.test_set_samples)


_data_specs = st.builds(
    lambda initial, per_round, validation, test, device: DataSpec(
        initial_samples=initial, new_samples_per_round=per_round, validation_samples=validation,
        test_samples=test, device_test_samples=min(device, test)),
    st.integers(10, 1500), st.integers(1, 1300), st.integers(10, 700), st.integers(10, 700), st.integers(10, 400),
)


def _agrees_with_the_arrival(spec: DataSpec, facts: capacity.DatasetFacts) -> None:
    problems = data_problems(plan(spec), facts)  # type: ignore[arg-type]
    try:
        arrival = load_dataset_arrival(spec, seed=0)
    except ServerError:
        assert problems, f"the server refuses {spec}, capacity does not"
        return
    assert not problems, f"capacity refuses {spec} ({problems}), the server does not"
    assert max_rounds(facts, spec) == arrival.max_rounds
    for rounds in {1, 2, arrival.max_rounds}:
        if rounds <= arrival.max_rounds:
            assert training_samples(facts, spec, rounds) == len(arrival.training_set(rounds - 1))
    too_many = plan(spec, rounds=arrival.max_rounds + 1)
    assert [problem.location for problem in data_problems(too_many, facts)] == [("rounds",)]  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(_data_specs)
def test_digits_rounds_and_refusals_agree_with_the_data_arrival(spec: DataSpec) -> None:
    _agrees_with_the_arrival(spec, DATASETS["digits"])


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mnist")
    make_mnist(root, *TINY_MNIST)
    return root


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.builds(
    lambda initial, per_round, validation, test: DataSpec(
        dataset="mnist", download=False, initial_samples=initial, new_samples_per_round=per_round,
        validation_samples=validation, test_samples=test, device_test_samples=10),
    st.integers(10, 150), st.integers(1, 150), st.integers(10, 40), st.integers(10, 40)))
def test_official_test_set_rounds_and_refusals_agree_with_the_data_arrival(tiny_mnist: Path, spec: DataSpec) -> None:
    spec = spec.model_copy(update={"root": tiny_mnist})
    facts = replace(DATASETS["mnist"], pool_samples=TINY_MNIST[0], test_set_samples=TINY_MNIST[1])
    _agrees_with_the_arrival(spec, facts)


# ---------------------------------------------------------------- models


COUNTED_LAYERS = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)


def _measured(spec: ModelSpec, facts: capacity.DatasetFacts) -> capacity.ModelFootprint:
    """The footprint of the model torch builds (on the meta device: no memory, any size)."""
    with torch.device("meta"):
        model = MODEL_BUILDERS[spec.kind](spec, facts.input_shape, facts.num_classes)
        outputs: list[int] = []
        for module in model.modules():
            if isinstance(module, COUNTED_LAYERS):
                module.register_forward_hook(lambda _m, _i, output: outputs.append(output[0].numel()))
        model.eval()(torch.empty((1, *facts.input_shape)))  # eval: BatchNorm takes one sample of 1×1
    state = [tensor for tensor in model.state_dict().values() if tensor.is_floating_point()]
    return capacity.ModelFootprint(
        weights=sum(tensor.numel() for tensor in state),
        parameters=sum(parameter.numel() for parameter in model.parameters()),
        activations=sum(outputs), largest_activation=max(outputs),
    )


_model_specs = st.one_of(
    st.builds(lambda hidden: ModelSpec(kind="mlp", hidden=hidden), st.lists(st.integers(1, 300), max_size=3)),
    st.builds(lambda channels: ModelSpec(kind="vgg", channels=channels),
              st.lists(st.integers(1, 24), min_size=1, max_size=6)),
    st.builds(lambda channels, blocks: ModelSpec(kind="resnet", channels=channels, blocks_per_stage=blocks),
              st.lists(st.integers(1, 24), min_size=1, max_size=4), st.integers(1, 3)),
)


@settings(max_examples=60, deadline=None)
@given(_model_specs, st.sampled_from(sorted(DATASETS)))
def test_model_footprints_and_refusals_agree_with_torch(spec: ModelSpec, dataset: str) -> None:
    facts = DATASETS[dataset]
    problems = model_problems(plan(DataSpec(dataset=dataset), model=spec))  # type: ignore[arg-type]
    try:
        measured = _measured(spec, facts)
    except ServerError:
        assert [problem.location for problem in problems] == [("model", "channels")]
        return
    assert not problems
    assert model_footprint(spec, facts) == measured


def test_every_model_kind_and_data_set_is_counted() -> None:
    assert set(capacity.MODEL_FOOTPRINTS) == set(MODEL_BUILDERS)
    assert set(DATASETS) == set(DATASET_LOADERS)
    assert capacity.EVALUATION_BATCH == inspect.signature(predict).parameters["batch_size"].default


def test_the_reported_model_is_17_gigabytes() -> None:
    """The issue's `hidden: [65536, 65536]` on digits: 4.3 billion weights, 17.2 GB as float32."""
    footprint = model_footprint(ModelSpec(hidden=[65536, 65536]), DATASETS["digits"])
    assert footprint.weights == 64 * 65536 + 65536 + 65536 * 65536 + 65536 + 65536 * 10 + 10
    assert round(footprint.weights * 4 / 1e9, 1) == 17.2


# ---------------------------------------------------------------- memory


def _scenario(**sections: object):  # type: ignore[no-untyped-def]
    raw = {"name": "m", "rounds": 8, "devices": [{"profile": "rpi4", "count": 5}], **sections}
    return parse_scenario(raw)


def test_memory_estimate_counts_each_part() -> None:
    estimate = memory_estimate(_scenario(devices=[{"profile": "rpi4", "count": 5}, {"name": "b", "profile": "rpi4",
                                                                                    "serial": "/dev/null"}]))
    weights = (64 * 128 + 128) + (128 * 64 + 64) + (64 * 10 + 10)
    assert estimate.footprint.weights == weights
    assert (estimate.versions_kept, estimate.emulated_devices) == (9, 5)  # the board holds its weights itself
    copies = capacity.SERVER_WEIGHT_COPIES + 9 + 5 * capacity.DEVICE_WEIGHT_COPIES
    assert estimate.weight_bytes == 4 * weights * copies
    assert estimate.batch == 64
    largest_training_set = 300 + 7 * 100
    prepared = largest_training_set + 180 + 360 + 5 * 200
    assert estimate.data_bytes == 64 * (1797 * 4 + prepared * 4)
    assert estimate.total_bytes < 10 * 2**20  # lowband's model is small


def test_the_batch_is_at_most_the_training_set() -> None:
    estimate = memory_estimate(_scenario(update={"batch_size": 100_000}))
    assert estimate.batch == 300 + 7 * 100


def test_the_default_budget_admits_a_sizeable_cifar_vgg() -> None:
    scenario = _scenario(rounds=50, data={"dataset": "cifar10"}, model={"kind": "vgg", "channels": [64, 128, 256, 512]},
                         devices=[{"profile": "rpi4", "count": 10}])
    assert memory_estimate(scenario).total_bytes < DEFAULT_MEMORY_BUDGET_BYTES
    assert scenario.memory_budget == 8 * 2**30



# ---------------------------------------------------------------- the scenario refuses, one line per field

LOWBAND = Path(__file__).resolve().parents[3] / "scenarios" / "lowband.yaml"


def error_lines(*overrides: str) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        load_scenario(LOWBAND, list(overrides))
    first, *lines = str(caught.value).splitlines()
    assert first == f"{LOWBAND}: invalid scenario"
    # each line caused by an override names it; the texts below are compared without that suffix
    suffixes = tuple(f" (set by --set {override})" for override in overrides)
    return [next((line[:-len(suffix)] for suffix in suffixes if line.endswith(suffix)), line) for line in lines]


def test_more_initial_samples_than_the_data_set_holds() -> None:
    assert error_lines("data.initial_samples=1000000000") == [
        "  data.initial_samples: digits' training pool (after the held-out splits) holds 1,257 samples; write "
        "data.initial_samples: 1257 or less (got 1000000000)"]
    assert error_lines("data.dataset=mnist", "data.initial_samples=60001") == [
        "  data.initial_samples: mnist's train set holds 60,000 samples; write data.initial_samples: 60000 or less "
        "(got 60001)"]


def test_held_out_splits_larger_than_their_source() -> None:
    assert error_lines("data.test_samples=1700") == [
        "  data.test_samples: validation_samples + test_samples = 1,880, but digits has 1,797 samples and "
        "data.initial_samples needs at least 10 of them; lower them to a sum of at most 1,787 (got 1700)"]
    assert error_lines("data.dataset=cifar10", "data.validation_samples=9000", "data.test_samples=2000") == [
        "  data.validation_samples: validation_samples + test_samples = 11,000, but cifar10's test set holds 10,000; "
        "lower them to a sum of at most 10,000 (got 9000)"]


def test_device_test_splits_larger_than_the_test_split() -> None:
    assert error_lines("data.device_test_samples=361") == [
        "  data.device_test_samples: each device's local test split is drawn from the test split "
        "(data.test_samples: 360); write data.device_test_samples: 360 or less (got 361)"]


def test_more_rounds_than_the_data_allow_names_the_maximum() -> None:
    assert error_lines("rounds=10000") == [
        "  rounds: the data allow at most 11 rounds (round 0 on data.initial_samples: 300, then "
        "data.new_samples_per_round: 100 of the 957 samples left in digits' training pool); write rounds: 11, or "
        "lower data.new_samples_per_round (got 10000)"]
    assert load_scenario(LOWBAND, ["rounds=11"]).rounds == 11


def test_a_model_above_the_memory_budget_names_its_size_field() -> None:
    [line] = error_lines("model.hidden=[65536, 65536]")
    assert line.startswith("  model.hidden: this run needs about 801.1 GiB, above memory_budget (8.0 GiB): 50 copies "
                           "of the model's 4,299,948,042 weights (16.0 GiB each: 16 to train, 9 versions the publisher "
                           "keeps, 5 on each of 5 emulated devices), ")
    assert "; use a smaller model (about " in line
    assert line.endswith("weights fit) or fewer rounds or emulated devices, or raise memory_budget "
                         "(got [65536, 65536])")
    [line] = error_lines("data.dataset=cifar10", "model.kind=resnet", "model.channels=[4096, 4096, 4096]")
    assert line.startswith("  model.channels: this run needs about ") and "(got [4096, 4096, 4096])" in line


def test_the_memory_budget_is_a_scenario_field() -> None:
    wide = ["model.hidden=[4096, 4096]"]
    assert error_lines(*wide, "memory_budget=1GiB")[0].startswith("  model.hidden: this run needs about 3.2 GiB, "
                                                                   "above memory_budget (1.0 GiB)")
    assert load_scenario(LOWBAND, wide).memory_budget == DEFAULT_MEMORY_BUDGET_BYTES
    assert load_scenario(LOWBAND, [*wide, "memory_budget=4GiB"]).memory_budget == 4 * 2**30


def test_activations_above_the_budget_say_which_batch_fits() -> None:
    [line] = error_lines("data.dataset=cifar10", "model.kind=vgg", "model.channels=[512, 512]",
                         "update.batch_size=4096")
    assert line.startswith("  update.batch_size: this run needs about 47.3 GiB, above memory_budget (8.0 GiB): ")
    assert line.endswith("; write update.batch_size: 141 or less (got 4096)")
    assert load_scenario(LOWBAND, ["data.dataset=cifar10", "model.kind=vgg", "model.channels=[512, 512]",
                                   "update.batch_size=141"]).update.batch_size == 141


def test_too_many_vgg_stages_for_the_input() -> None:
    assert error_lines("model.kind=vgg", "model.channels=[8, 8, 8, 8]") == [
        "  model.channels: each vgg stage halves the input: digits' 8×8 samples allow at most 3 stages; give "
        "model.channels at most 3 widths (got [8, 8, 8, 8])"]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(10, 1500), st.integers(1, 1200), st.integers(10, 800), st.integers(10, 800))
def test_a_valid_scenario_runs_every_round_it_announces(rounds: int, initial: int, per_round: int, validation: int,
                                                        test: int) -> None:
    """Whatever the schema accepts, the data arrival provides: every announced round, every sample."""
    overrides = [f"rounds={rounds}", f"data.initial_samples={initial}", f"data.new_samples_per_round={per_round}",
                 f"data.validation_samples={validation}", f"data.test_samples={test}", "data.device_test_samples=10"]
    try:
        scenario = load_scenario(LOWBAND, overrides)
    except ScenarioError as error:
        assert len(str(error).splitlines()) == 2  # one field at a time: the data first, then the rounds
        return
    assert load_dataset_arrival(scenario.data, seed=scenario.seed).max_rounds >= scenario.rounds
