"""Data sets and their arrival schedule: an initial training set, then new samples each round.

Samples keep their per-sample shape (`DataArrival.input_shape`): digits (64,) in [0, 1]; MNIST
(1, 28, 28) in [0, 1]; CIFAR-10 (3, 32, 32) normalised per channel with the usual training-set
mean and standard deviation (`CIFAR10_MEAN`, `CIFAR10_STD`). For digits, validation and test are
held out of the shuffled data set; for MNIST and CIFAR-10 the training pool is the official train
set, and validation + test are drawn (validation held out first) from the official test set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, overload

import numpy as np

from server.datasets import OfficialSplits, dataset_directory, load_cifar10, load_mnist
from server.errors import ServerError
from testbed.core.seeds import Stream, generator

if TYPE_CHECKING:
    from testbed.core.scenario import DataSpec

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

@dataclass(frozen=True)
class Split:
    """Samples `x` (float32, N×input shape, e.g. N×D or N×C×H×W) with integer labels `y` (int64, N)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim < 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ServerError(
                f"a split needs x of shape (N, ...) and y of shape (N,), got {self.x.shape} and {self.y.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def concat(self, other: Split) -> Split:
        """This split followed by `other`."""
        return Split(np.concatenate([self.x, other.x]), np.concatenate([self.y, other.y]))

    def subset(self, indices: np.ndarray) -> Split:
        """The samples at `indices`, in that order."""
        return Split(self.x[indices], self.y[indices])


Prepare = Callable[[np.ndarray], np.ndarray]
"""Turns stored samples (e.g. uint8 pixels) into float32 model inputs."""


class Increments(Sequence[Split]):
    """The per-round increments, converted to float32 only when read (the raw pool stays compact)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, chunks: list[np.ndarray], prepare: Prepare) -> None:
        self._x, self._y, self._chunks, self._prepare = x, y, chunks, prepare

    def __len__(self) -> int:
        return len(self._chunks)

    @overload
    def __getitem__(self, index: int) -> Split: ...

    @overload
    def __getitem__(self, index: slice) -> list[Split]: ...

    def __getitem__(self, index: int | slice) -> Split | list[Split]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        chunk = self._chunks[index]
        return Split(self._prepare(self._x[chunk]), self._y[chunk])


@dataclass(frozen=True)
class DataArrival:
    """The round-by-round arrival of training data, with fixed validation and test splits."""

    initial: Split
    increments: Sequence[Split]
    validation: Split
    test: Split
    num_features: int
    """Values per sample: the product of `input_shape`."""
    num_classes: int
    input_shape: tuple[int, ...]
    """Shape of one sample: (64,) digits, (1, 28, 28) MNIST, (3, 32, 32) CIFAR-10."""
    _cache: dict[int, Split] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def max_rounds(self) -> int:
        """Round 0 (initial data) plus one round per increment."""
        return 1 + len(self.increments)

    def training_set(self, round_index: int) -> Split:
        """Everything collected by `round_index`: the initial split plus the first `round_index` increments.

        Only the latest requested round is cached; a later round extends it instead of starting over.
        """
        if not 0 <= round_index < self.max_rounds:
            raise ServerError(f"round {round_index} is outside the data arrival (rounds 0..{self.max_rounds - 1})")
        if round_index not in self._cache:
            base_round, split = 0, self.initial
            for cached_round, cached in self._cache.items():
                if cached_round < round_index:
                    base_round, split = cached_round, cached
            for increment in self.increments[base_round:round_index]:
                split = split.concat(increment)
            self._cache.clear()
            self._cache[round_index] = split
        return self._cache[round_index]


@dataclass(frozen=True)
class DataSource:
    """A data set as stored: a training pool and, if the data set has one, an official test part."""

    pool_x: np.ndarray
    pool_y: np.ndarray
    official_test: tuple[np.ndarray, np.ndarray] | None
    num_classes: int
    prepare: Prepare


def _unchanged(x: np.ndarray) -> np.ndarray:
    return x


def _pixels_to_unit(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32) / np.float32(255.0)).astype(np.float32)


def _cifar10_normalised(x: np.ndarray) -> np.ndarray:
    mean = np.asarray(CIFAR10_MEAN, dtype=np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD, dtype=np.float32).reshape(1, 3, 1, 1)
    return ((_pixels_to_unit(x) - mean) / std).astype(np.float32)


def _load_digits(spec: DataSpec) -> DataSource:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    return DataSource(x, np.asarray(bunch.target, dtype=np.int64), None, 10, _unchanged)


def _from_official(splits: OfficialSplits, prepare: Prepare) -> DataSource:
    return DataSource(splits.train_x, splits.train_y, (splits.test_x, splits.test_y), 10, prepare)


def _load_mnist(spec: DataSpec) -> DataSource:
    return _from_official(load_mnist(dataset_directory("mnist", spec.root), spec.download), _pixels_to_unit)


def _load_cifar10(spec: DataSpec) -> DataSource:
    return _from_official(load_cifar10(dataset_directory("cifar10", spec.root), spec.download), _cifar10_normalised)


DATASET_LOADERS: dict[str, Callable[[DataSpec], DataSource]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "cifar10": _load_cifar10,
}


def _too_small(spec: DataSpec, part: str, total: int, needed: int, terms: str) -> ServerError:
    return ServerError(
        f"data set {spec.dataset!r} has {total} samples{part}, but {terms} = {needed}; lower one of them"
    )


def load_dataset_arrival(spec: DataSpec, seed: int) -> DataArrival:
    """Shuffle the data set with `seed`, hold out validation + test, and cut the training pool into rounds."""
    loader = DATASET_LOADERS.get(spec.dataset)
    if loader is None:
        raise ServerError(f"unknown data set {spec.dataset!r}; choose one of {', '.join(sorted(DATASET_LOADERS))}")
    source = loader(spec)
    held_out = spec.test_samples + spec.validation_samples
    held_terms = f"test_samples ({spec.test_samples}) + validation_samples ({spec.validation_samples})"
    rng = generator(seed, Stream.DATA_ORDER)
    if source.official_test is None:
        total = len(source.pool_y)
        needed = held_out + spec.initial_samples
        if needed > total:
            raise _too_small(spec, "", total, needed, f"{held_terms} + initial_samples ({spec.initial_samples})")
        order = rng.permutation(total)
        # The validation split is held out from the test part (as in the paper), the rest is the training pool.
        test_x, test_y, test_order = source.pool_x, source.pool_y, order[:held_out]
        pool = order[held_out:]
    else:
        test_x, test_y = source.official_test
        if held_out > len(test_y):
            raise _too_small(spec, " in its test set", len(test_y), held_out, held_terms)
        if spec.initial_samples > len(source.pool_y):
            raise _too_small(
                spec, " in its train set", len(source.pool_y), spec.initial_samples,
                f"initial_samples ({spec.initial_samples})",
            )
        test_order = rng.permutation(len(test_y))[:held_out]
        pool = rng.permutation(len(source.pool_y))

    def take(x: np.ndarray, y: np.ndarray, indices: np.ndarray) -> Split:
        return Split(source.prepare(x[indices]), y[indices].astype(np.int64))

    validation = take(test_x, test_y, test_order[: spec.validation_samples])
    test = take(test_x, test_y, test_order[spec.validation_samples :])
    initial = take(source.pool_x, source.pool_y, pool[: spec.initial_samples])
    rest = pool[spec.initial_samples :]
    step = spec.new_samples_per_round
    chunks = [rest[start : start + step] for start in range(0, len(rest), step)]
    input_shape = tuple(int(d) for d in initial.x.shape[1:])
    return DataArrival(
        initial=initial,
        increments=Increments(source.pool_x, source.pool_y, chunks, source.prepare),
        validation=validation,
        test=test,
        num_features=int(np.prod(input_shape)),
        num_classes=source.num_classes,
        input_shape=input_shape,
    )


def device_test_split(test: Split, device_index: int, samples: int, seed: int) -> Split:
    """A seeded subset of the test split (without replacement) that differs from device to device."""
    if device_index < 0 or samples < 0:
        raise ServerError(f"device_index ({device_index}) and samples ({samples}) must not be negative")
    count = min(samples, len(test))
    rng = generator(int(seed), Stream.DEVICE_TEST_SPLIT, int(device_index))
    indices = rng.choice(len(test), size=count, replace=False)
    return test.subset(indices)
