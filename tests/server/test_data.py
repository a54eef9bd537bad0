"""Data arrival: held-out splits, round increments, device subsets and size errors."""

from __future__ import annotations

import numpy as np
import pytest

from server.data import Split, device_test_split, load_dataset_arrival
from server.errors import ServerError
from testbed.core.scenario import DataSpec


def test_arrival_sizes_cover_the_data_set_once() -> None:
    spec = DataSpec(initial_samples=300, new_samples_per_round=100, validation_samples=180, test_samples=360)
    arrival = load_dataset_arrival(spec, seed=0)
    assert (len(arrival.validation), len(arrival.test), len(arrival.initial)) == (180, 360, 300)
    assert [len(s) for s in arrival.increments] == [100] * 9 + [57]
    assert arrival.max_rounds == 11 and (arrival.num_features, arrival.num_classes) == (64, 10)
    assert len(arrival.training_set(3)) == 600
    np.testing.assert_array_equal(arrival.training_set(1).x[:300], arrival.initial.x)
    assert arrival.initial.x.dtype == np.float32 and arrival.initial.y.dtype == np.int64
    assert 0.0 <= arrival.initial.x.min() and arrival.initial.x.max() <= 1.0
    total = sum(len(s) for s in [arrival.validation, arrival.test, arrival.training_set(10)])
    assert total == 1797
    with pytest.raises(ServerError):
        arrival.training_set(11)


def test_same_seed_same_arrival_other_seed_differs() -> None:
    a, b, c = (load_dataset_arrival(DataSpec(), seed) for seed in (4, 4, 5))
    np.testing.assert_array_equal(a.initial.x, b.initial.x)
    assert not np.array_equal(a.initial.x, c.initial.x)


def test_sizes_that_do_not_fit_name_the_numbers() -> None:
    with pytest.raises(ServerError, match=r"1797 samples.*test_samples \(1700\)"):
        load_dataset_arrival(DataSpec(test_samples=1700), seed=0)


def test_device_test_split_is_seeded_per_device_and_bounded() -> None:
    test = Split(np.arange(40, dtype=np.float32).reshape(20, 2), np.arange(20, dtype=np.int64))
    first = device_test_split(test, 0, 10, seed=1)
    assert len(first) == 10 and len(set(first.y.tolist())) == 10
    assert not np.array_equal(first.y, device_test_split(test, 1, 10, seed=1).y)
    np.testing.assert_array_equal(first.y, device_test_split(test, 0, 10, seed=1).y)
    assert sorted(device_test_split(test, 2, 99, seed=1).y.tolist()) == list(range(20))


def test_digits_keep_flat_samples_and_increments_are_read_lazily() -> None:
    arrival = load_dataset_arrival(DataSpec(), seed=2)
    assert arrival.input_shape == (64,) and arrival.initial.x.shape == (300, 64)
    assert len(arrival.increments[2:4]) == 2 and len(arrival.increments[-1]) == 57
    np.testing.assert_array_equal(arrival.increments[2:4][1].x, arrival.increments[3].x)
    late, early, again = arrival.training_set(5), arrival.training_set(2), arrival.training_set(7)
    np.testing.assert_array_equal(again.x[: len(late)], late.x)
    np.testing.assert_array_equal(again.x[: len(early)], early.x)
    assert len(again) == 300 + 7 * 100


def test_split_keeps_image_shapes_and_rejects_mismatches() -> None:
    images = Split(np.zeros((4, 3, 2, 2), np.float32), np.zeros(4, np.int64))
    assert images.subset(np.array([1, 2])).x.shape == (2, 3, 2, 2)
    with pytest.raises(ServerError, match=r"x of shape \(N, ...\)"):
        Split(np.zeros(4, np.float32), np.zeros(4, np.int64))
    with pytest.raises(ServerError):
        Split(np.zeros((4, 3), np.float32), np.zeros(3, np.int64))


def test_unknown_data_set_lists_the_known_ones() -> None:
    spec = DataSpec.model_construct(dataset="imagenet")
    with pytest.raises(ServerError, match="choose one of cifar10, digits, mnist"):
        load_dataset_arrival(spec, seed=0)
