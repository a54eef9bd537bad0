"""What a scenario asks of its data set and of memory, known without loading either (no server, no torch).

The facts here mirror the server (tests/testbed/core/test_capacity.py checks them against it): the
sizes of each data set as ``server.data`` cuts it into held-out splits and rounds, and how
``server.models`` builds each model kind (its weights, trainable parameters and the activations one
sample produces). ``testbed.core.scenario`` uses them to refuse, at validate time, a scenario that
asks for more samples or rounds than its data set holds or more memory than ``memory_budget``;
``testbed.preflight`` repeats the data checks with the sizes of the files on disk and the memory
check against the host's memory.

The memory estimate is deliberately simple, in float32 values (4 bytes each):

* weights × (SERVER_WEIGHT_COPIES + versions the publisher keeps (rounds + 1, w⁰ included)
  + DEVICE_WEIGHT_COPIES × emulated devices);
* activations: the larger of training (ACTIVATION_COPIES × batch × the outputs of every layer for one
  sample) and evaluation (2 × EVALUATION_BATCH × the largest layer output);
* data: the data set as the server stores it, plus float32 copies of the largest training set, the
  validation and test splits and each emulated device's local test split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.core.scenario import DataSpec, ModelSpec, Scenario

BYTES_PER_VALUE = 4
"""Weights, gradients, activations and prepared samples are float32."""
DEFAULT_MEMORY_BUDGET_BYTES = 8 * 1024**3
"""`memory_budget` unless the scenario sets it: fixed (not a share of this host's memory), so a scenario
validates the same everywhere; `testbed run` and `validate --resolve` also check the host's memory."""
SERVER_WEIGHT_COPIES = 16
"""Training: weights, gradients, Adam's two moments, DPU's float64 local contribution (two), its per-step
copies of weights and gradients, the best epoch, the start values (10); the update server's NumPy copies
across a round: w⁰, deployed, start, trained, rewound, candidate (6)."""
DEVICE_WEIGHT_COPIES = 5
"""An emulated device: its inference model, that model's w⁰, the receiver's w⁰ and held weights, the
candidate while an update is verified."""
ACTIVATION_COPIES = 3
"""Training keeps each layer's output for the backward pass and its gradient, plus the functional steps
between layers (a residual block's sum and ReLUs)."""
EVALUATION_BATCH = 1024
"""Samples per forward pass when evaluating (server.models.predict's batch_size)."""


@dataclass(frozen=True)
class DatasetFacts:
    """A data set as the server loads it (server.data, server.datasets): sizes, sample shape, classes."""

    name: str
    pool_samples: int
    """The training pool: the official train set, or the whole data set when it has no official test set."""
    test_set_samples: int | None
    """The official test set (validation and test are drawn from it); None: both are held out of the pool."""
    input_shape: tuple[int, ...]
    num_classes: int
    stored_bytes_per_value: int
    """How the server holds the data set in memory: float32 digits (4), uint8 pixels (1)."""

    @property
    def possessive(self) -> str:
        """`digits'`, `mnist's`: for messages."""
        return f"{self.name}'" if self.name.endswith("s") else f"{self.name}'s"

    @property
    def num_features(self) -> int:
        return math.prod(self.input_shape)

    @property
    def stored_samples(self) -> int:
        return self.pool_samples + (self.test_set_samples or 0)


DATASETS: dict[str, DatasetFacts] = {
    "digits": DatasetFacts("digits", 1797, None, (64,), 10, 4),
    "mnist": DatasetFacts("mnist", 60_000, 10_000, (1, 28, 28), 10, 1),
    "cifar10": DatasetFacts("cifar10", 50_000, 10_000, (3, 32, 32), 10, 1),
}


@dataclass(frozen=True)
class Problem:
    """One field of a scenario that asks for more than the data set or the memory holds."""

    location: tuple[str, ...]
    message: str
    value: Any

    def describe(self) -> str:
        return f"{'.'.join(self.location)}: {self.message} (got {self.value!r})"


# ---------------------------------------------------------------- data: samples and rounds


def training_pool(facts: DatasetFacts, data: DataSpec) -> int:
    """Samples that arrive for training over the run, round 0's initial samples included."""
    if facts.test_set_samples is None:
        return facts.pool_samples - data.validation_samples - data.test_samples
    return facts.pool_samples


def max_rounds(facts: DatasetFacts, data: DataSpec) -> int:
    """Round 0 on the initial samples, then one per `new_samples_per_round` of the rest (as DataArrival.max_rounds)."""
    remaining = max(0, training_pool(facts, data) - data.initial_samples)
    return 1 + math.ceil(remaining / data.new_samples_per_round)


def training_samples(facts: DatasetFacts, data: DataSpec, rounds: int) -> int:
    """The size of the training set in the last of `rounds` rounds."""
    return min(training_pool(facts, data), data.initial_samples + (rounds - 1) * data.new_samples_per_round)


def _least(model: Any, field: str) -> int:
    """The smallest value a field of a section model accepts (its `ge` bound), else 1."""
    return next((int(rule.ge) for rule in type(model).model_fields[field].metadata if hasattr(rule, "ge")), 1)


def data_problems(scenario: Scenario, facts: DatasetFacts | None = None) -> list[Problem]:
    """Sample counts and `rounds` the data set (`facts`, default: its official sizes) cannot provide."""
    data = scenario.data
    facts = facts or DATASETS[data.dataset]
    held_out = data.validation_samples + data.test_samples
    larger = "test_samples" if data.test_samples >= data.validation_samples else "validation_samples"
    if facts.test_set_samples is not None:
        held_out_limit, source = facts.test_set_samples, f"{facts.possessive} test set holds {facts.test_set_samples:,}"
    else:
        least_initial = _least(data, "initial_samples")
        held_out_limit = facts.pool_samples - least_initial
        source = (f"{facts.name} has {facts.pool_samples:,} samples and data.initial_samples needs at least "
                  f"{least_initial} of them")
    if held_out > held_out_limit:
        return [Problem(("data", larger), (
            f"validation_samples + test_samples = {held_out:,}, but {source}; lower them to a sum of at most "
            f"{max(held_out_limit, 0):,}"), getattr(data, larger))]
    problems: list[Problem] = []
    pool = training_pool(facts, data)
    if data.initial_samples > pool:
        where = ("train set holds" if facts.test_set_samples is not None
                 else "training pool (after the held-out splits) holds")
        return [Problem(("data", "initial_samples"), (
            f"{facts.possessive} {where} {pool:,} samples; write data.initial_samples: {pool} or less"),
            data.initial_samples)]
    if data.device_test_samples > data.test_samples:
        problems.append(Problem(("data", "device_test_samples"), (
            f"each device's local test split is drawn from the test split (data.test_samples: "
            f"{data.test_samples}); write data.device_test_samples: {data.test_samples} or less"),
            data.device_test_samples))
    allowed = max_rounds(facts, data)
    if scenario.rounds > allowed:
        problems.append(Problem(("rounds",), (
            f"the data allow at most {allowed} rounds (round 0 on data.initial_samples: {data.initial_samples}, "
            f"then data.new_samples_per_round: {data.new_samples_per_round} of the {pool - data.initial_samples:,} "
            f"samples left in {facts.possessive} training pool); write rounds: {allowed}, or lower "
            "data.new_samples_per_round"), scenario.rounds))
    return problems


# ---------------------------------------------------------------- models: weights, parameters, activations


@dataclass(frozen=True)
class ModelFootprint:
    """A model as server.models builds it, in float32 values."""

    weights: int
    """Every float tensor of its state dict (parameters and BatchNorm statistics): what is sent and held."""
    parameters: int
    """What trains: gradients and Adam's moments are this size."""
    activations: int
    """Per sample: the outputs of all its Linear, Conv2d, BatchNorm2d, ReLU and MaxPool2d layers."""
    largest_activation: int
    """Per sample: the largest of those outputs."""


class _Tally:
    """Adds up a model layer by layer."""

    def __init__(self) -> None:
        self.weights = self.parameters = self.activations = self.largest_activation = 0

    def layer(self, output: int, parameters: int = 0, buffers: int = 0) -> None:
        self.parameters += parameters
        self.weights += parameters + buffers
        self.activations += output
        self.largest_activation = max(self.largest_activation, output)

    def conv_bn(self, in_channels: int, out_channels: int, side: tuple[int, int], kernel: int = 3,
                stride: int = 1) -> tuple[int, int]:
        """A bias-free conv (padding kernel // 2) and BatchNorm2d; returns the output's height and width."""
        height, width = ((length - 1) // stride + 1 for length in side)
        output = out_channels * height * width
        self.layer(output, in_channels * out_channels * kernel * kernel)
        self.layer(output, 2 * out_channels, 2 * out_channels)  # scale and shift; running mean and variance
        return height, width

    def footprint(self) -> ModelFootprint:
        return ModelFootprint(self.weights, self.parameters, self.activations, self.largest_activation)


def image_shape(input_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(channels, height, width) as the CNNs read a sample (flat s² values as one s×s channel), else None."""
    if len(input_shape) == 3:
        return input_shape  # type: ignore[return-value]
    if len(input_shape) == 1 and math.isqrt(input_shape[0]) ** 2 == input_shape[0]:
        return (1, math.isqrt(input_shape[0]), math.isqrt(input_shape[0]))
    return None


def _mlp(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> ModelFootprint:
    tally = _Tally()
    widths = [math.prod(input_shape), *spec.hidden]
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        tally.layer(fan_out, fan_in * fan_out + fan_out)
        tally.layer(fan_out)  # ReLU
    tally.layer(num_classes, widths[-1] * num_classes + num_classes)
    return tally.footprint()


def _vgg(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> ModelFootprint:
    channels, height, width = image_shape(input_shape) or (1, 1, math.prod(input_shape))
    tally = _Tally()
    for stage_width in spec.channels:
        for in_channels in (channels, stage_width):
            tally.conv_bn(in_channels, stage_width, (height, width))
            tally.layer(stage_width * height * width)  # ReLU
        height, width = height // 2, width // 2
        tally.layer(stage_width * height * width)  # MaxPool2d(2)
        channels = stage_width
    tally.layer(num_classes, channels * num_classes + num_classes)
    return tally.footprint()


def _resnet(spec: ModelSpec, input_shape: tuple[int, ...], num_classes: int) -> ModelFootprint:
    channels, height, width = image_shape(input_shape) or (1, 1, math.prod(input_shape))
    tally = _Tally()
    height, width = tally.conv_bn(channels, spec.channels[0], (height, width))
    tally.layer(spec.channels[0] * height * width)  # the stem's ReLU
    channels = spec.channels[0]
    for stage, stage_width in enumerate(spec.channels):
        for block in range(spec.blocks_per_stage):
            stride = 2 if stage > 0 and block == 0 else 1
            block_input = (height, width)
            height, width = tally.conv_bn(channels, stage_width, block_input, stride=stride)
            tally.conv_bn(stage_width, stage_width, (height, width))
            if stride != 1 or channels != stage_width:
                tally.conv_bn(channels, stage_width, block_input, kernel=1, stride=stride)  # the projection
            channels = stage_width
    tally.layer(num_classes, channels * num_classes + num_classes)
    return tally.footprint()


MODEL_FOOTPRINTS: dict[str, Callable[[ModelSpec, tuple[int, ...], int], ModelFootprint]] = {
    "mlp": _mlp,
    "vgg": _vgg,
    "resnet": _resnet,
}
"""By model kind, as server.models.MODEL_BUILDERS builds it."""


def model_footprint(spec: ModelSpec, facts: DatasetFacts) -> ModelFootprint:
    """The `spec.kind` model for samples of the data set `facts`."""
    return MODEL_FOOTPRINTS[spec.kind](spec, facts.input_shape, facts.num_classes)


def size_field(spec: ModelSpec) -> str:
    """The field that sets the model's width: model.hidden (MLP) or model.channels (CNNs)."""
    return "hidden" if spec.kind == "mlp" else "channels"


def model_problems(scenario: Scenario) -> list[Problem]:
    """A CNN with more pooling stages than its input has pixels (server.models refuses to build it)."""
    spec, facts = scenario.model, DATASETS[scenario.data.dataset]
    image = image_shape(facts.input_shape)
    if spec.kind == "mlp":
        return []
    if image is None:
        return [Problem(("model", "kind"), f"{spec.kind} needs image input; {facts.name} samples are "
                        f"{facts.input_shape}: use kind 'mlp'", spec.kind)]
    stages = min(image[1:]).bit_length() - 1  # each VGG stage halves height and width
    if spec.kind == "vgg" and len(spec.channels) > stages:
        return [Problem(("model", "channels"), (
            f"each vgg stage halves the input: {facts.possessive} {image[1]}×{image[2]} samples allow at most "
            f"{stages} stages; give model.channels at most {stages} widths"), list(spec.channels))]
    return []


# ---------------------------------------------------------------- memory


@dataclass(frozen=True)
class MemoryEstimate:
    """What a run holds at its peak, by part (see the module docstring for what each counts)."""

    footprint: ModelFootprint
    versions_kept: int
    emulated_devices: int
    batch: int
    """Training batch: update.batch_size, or the whole training set when that is smaller."""
    evaluation_activation_bytes: int
    data_bytes: int

    @property
    def weight_copies(self) -> int:
        return SERVER_WEIGHT_COPIES + self.versions_kept + DEVICE_WEIGHT_COPIES * self.emulated_devices

    @property
    def weight_bytes(self) -> int:
        return self.footprint.weights * BYTES_PER_VALUE * self.weight_copies

    @property
    def activation_bytes_per_sample(self) -> int:
        """Training activations per sample of a batch."""
        return ACTIVATION_COPIES * self.footprint.activations * BYTES_PER_VALUE

    @property
    def activation_bytes(self) -> int:
        return max(self.batch * self.activation_bytes_per_sample, self.evaluation_activation_bytes)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.data_bytes


def memory_estimate(scenario: Scenario, facts: DatasetFacts | None = None) -> MemoryEstimate:
    """The run's peak memory, roughly, with rounds clamped to what the data allow."""
    data = scenario.data
    facts = facts or DATASETS[data.dataset]
    rounds = max(1, min(scenario.rounds, max_rounds(facts, data)))
    devices = emulated_device_count(scenario)
    largest_training_set = max(1, training_samples(facts, data, rounds))
    footprint = model_footprint(scenario.model, facts)
    evaluated = min(EVALUATION_BATCH, max(data.validation_samples, data.test_samples))
    prepared = largest_training_set + data.validation_samples + data.test_samples + devices * data.device_test_samples
    return MemoryEstimate(
        footprint=footprint,
        versions_kept=rounds + 1,
        emulated_devices=devices,
        batch=min(scenario.update.batch_size, largest_training_set),
        evaluation_activation_bytes=2 * evaluated * footprint.largest_activation * BYTES_PER_VALUE,
        data_bytes=facts.num_features * (facts.stored_samples * facts.stored_bytes_per_value
                                         + prepared * BYTES_PER_VALUE),
    )


def format_bytes(size: float) -> str:
    """A size for people: `17.2 GiB`, `980.0 KiB`, `12 B`."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor:
            return f"{size / factor:.1f} {unit}"
    return f"{int(size)} B"


def memory_problems(scenario: Scenario, budget_bytes: int, budget: str, raisable: bool = True) -> list[Problem]:
    """The run's estimate above `budget_bytes` (called `budget` in the message), located at what to shrink.

    `raisable`: the budget is memory_budget (the message offers raising it), not the host's memory.
    """
    estimate = memory_estimate(scenario)
    if estimate.total_bytes <= budget_bytes:
        return []
    one_copy = estimate.footprint.weights * BYTES_PER_VALUE
    parts = (f"{estimate.weight_copies} copies of the model's {estimate.footprint.weights:,} weights "
             f"({format_bytes(one_copy)} each: {SERVER_WEIGHT_COPIES} to train, {estimate.versions_kept} versions "
             f"the publisher keeps, {DEVICE_WEIGHT_COPIES} on each of {estimate.emulated_devices} emulated devices), "
             f"{format_bytes(estimate.activation_bytes)} of activations, {format_bytes(estimate.data_bytes)} of data")
    needs = f"this run needs about {format_bytes(estimate.total_bytes)}, above {budget}: {parts}"
    room = budget_bytes - estimate.weight_bytes - estimate.data_bytes
    if estimate.activation_bytes > estimate.weight_bytes and room >= estimate.evaluation_activation_bytes:
        batch = room // estimate.activation_bytes_per_sample
        if 1 <= batch < estimate.batch:
            return [Problem(("update", "batch_size"), f"{needs}; write update.batch_size: {batch} or less",
                            scenario.update.batch_size)]
    spare = budget_bytes - estimate.activation_bytes - estimate.data_bytes
    fitting = max(0, spare // (BYTES_PER_VALUE * estimate.weight_copies))
    field = size_field(scenario.model)
    return [Problem(("model", field), (
        f"{needs}; use a smaller model (about {fitting:,} weights fit) or fewer rounds or emulated devices"
        f"{', or raise memory_budget' if raisable else ''}"), list(getattr(scenario.model, field)))]


def capacity_problems(scenario: Scenario, budget_bytes: int, budget: str) -> list[Problem]:
    """Everything validate checks here: data, model shape, then memory (only once the data fit)."""
    problems = data_problems(scenario) + model_problems(scenario)
    if problems:
        return problems
    return memory_problems(scenario, budget_bytes, budget)



# ---------------------------------------------------------------- open files

OPEN_FILES_BASE = 256
"""The run's own files and sockets: data, results, exporter, broker listener, the run's MQTT session."""
OPEN_FILES_PER_EMULATED_DEVICE = 8
"""Per emulated device with the embedded broker, measured (issue 13): 1000 devices held 8,006 descriptors
(the link's listener, both proxied connections, the device's client socket, and the broker's end of it)."""


def emulated_device_count(scenario: Scenario) -> int:
    """How many devices of the scenario run as agents inside the run's process."""
    return sum(1 for entry in scenario.device_entries().values() if entry.kind == "emulated")


def open_files_needed(emulated_devices: int, largest_worker_share: int | None, embedded_broker: bool) -> int:
    """File descriptors the busiest process of a run needs at its peak, roughly (see OPEN_FILES_PER_EMULATED_DEVICE):
    the run's process when its `emulated_devices` run in it (`largest_worker_share` None); with fleet workers the
    larger of the busiest worker (its share's links and clients) and the run's process (the embedded broker's end of
    every device's connection, if the broker is embedded). Each process has its own limit."""
    if largest_worker_share is None:
        return OPEN_FILES_BASE + OPEN_FILES_PER_EMULATED_DEVICE * emulated_devices
    return max(OPEN_FILES_BASE + OPEN_FILES_PER_EMULATED_DEVICE * largest_worker_share,
               OPEN_FILES_BASE + (emulated_devices if embedded_broker else 0))
