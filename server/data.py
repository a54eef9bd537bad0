"""Data sets and their arrival schedule: an initial training set, then new samples each round."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from server.errors import ServerError

if TYPE_CHECKING:
    from testbed.scenario import DataSpec


@dataclass(frozen=True)
class Split:
    """Samples `x` (float32, N×D) with integer labels `y` (int64, N)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        if self.x.ndim != 2 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ServerError(
                f"a split needs x of shape (N, D) and y of shape (N,), got {self.x.shape} and {self.y.shape}"
            )

    def __len__(self) -> int:
        return len(self.y)

    def concat(self, other: Split) -> Split:
        """This split followed by `other`."""
        return Split(np.concatenate([self.x, other.x]), np.concatenate([self.y, other.y]))

    def subset(self, indices: np.ndarray) -> Split:
        """The samples at `indices`, in that order."""
        return Split(self.x[indices], self.y[indices])


@dataclass(frozen=True)
class DataArrival:
    """The round-by-round arrival of training data, with fixed validation and test splits."""

    initial: Split
    increments: list[Split]
    validation: Split
    test: Split
    num_features: int
    num_classes: int
    _cache: dict[int, Split] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def max_rounds(self) -> int:
        """Round 0 (initial data) plus one round per increment."""
        return 1 + len(self.increments)

    def training_set(self, round_index: int) -> Split:
        """Everything collected by `round_index`: the initial split plus the first `round_index` increments."""
        if not 0 <= round_index < self.max_rounds:
            raise ServerError(f"round {round_index} is outside the data arrival (rounds 0..{self.max_rounds - 1})")
        if round_index not in self._cache:
            split = self.initial
            for increment in self.increments[:round_index]:
                split = split.concat(increment)
            self._cache[round_index] = split
        return self._cache[round_index]


def _load_digits() -> Split:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    return Split(x, np.asarray(bunch.target, dtype=np.int64))


DATASET_LOADERS: dict[str, Callable[[], Split]] = {"digits": _load_digits}


def load_dataset_arrival(spec: DataSpec, seed: int) -> DataArrival:
    """Shuffle the data set with `seed`, hold out validation + test, and cut the rest into rounds."""
    loader = DATASET_LOADERS.get(spec.dataset)
    if loader is None:
        raise ServerError(f"unknown data set {spec.dataset!r}; choose one of {', '.join(sorted(DATASET_LOADERS))}")
    everything = loader()
    total = len(everything)
    held_out = spec.test_samples + spec.validation_samples
    needed = held_out + spec.initial_samples
    if needed > total:
        raise ServerError(
            f"data set {spec.dataset!r} has {total} samples, but test_samples ({spec.test_samples}) + "
            f"validation_samples ({spec.validation_samples}) + initial_samples ({spec.initial_samples}) = {needed}; "
            "lower one of them"
        )
    order = np.random.default_rng(seed).permutation(total)
    # The validation split is held out from the test part (as in the paper), the rest is the training pool.
    validation = everything.subset(order[: spec.validation_samples])
    test = everything.subset(order[spec.validation_samples : held_out])
    pool = order[held_out:]
    initial = everything.subset(pool[: spec.initial_samples])
    rest = pool[spec.initial_samples :]
    step = spec.new_samples_per_round
    increments = [everything.subset(rest[start : start + step]) for start in range(0, len(rest), step)]
    return DataArrival(
        initial=initial,
        increments=increments,
        validation=validation,
        test=test,
        num_features=int(everything.x.shape[1]),
        num_classes=int(everything.y.max()) + 1,
    )


def device_test_split(test: Split, device_index: int, samples: int, seed: int) -> Split:
    """A seeded subset of the test split (without replacement) that differs from device to device."""
    if device_index < 0 or samples < 0:
        raise ServerError(f"device_index ({device_index}) and samples ({samples}) must not be negative")
    count = min(samples, len(test))
    rng = np.random.default_rng([int(seed), 1, int(device_index)])
    indices = rng.choice(len(test), size=count, replace=False)
    return test.subset(indices)
