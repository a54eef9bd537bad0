"""The pickle → IDX rebuild: a tiny synthetic pickle read back by server/datasets.py, IDX and pixel round trips."""

from __future__ import annotations

import gzip
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

from server.datasets import MNIST_FILES, load_mnist, read_idx
from server.errors import ServerError
from server.mnist_rebuild import (
    MNIST_FILE_CHECKSUMS,
    checksum_problem,
    checksum_problems,
    idx_bytes,
    pixels_to_bytes,
    read_mnist_pickle,
    rebuild_mnist_idx,
)


def synthetic_parts(sizes: tuple[int, int, int] = (7, 3, 5), seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pixels as uint8 N×784, labels) for train, validation and test."""
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64)) for n in sizes]


def pickle_gz(parts: list[tuple[np.ndarray, np.ndarray]], protocol: int = 2) -> bytes:
    """The parts as the classic pickle stores them: float32 pixels byte / 256, gzipped."""
    stored = tuple(((pixels / 256).astype(np.float32), labels) for pixels, labels in parts)
    return gzip.compress(pickle.dumps(stored, protocol=protocol))


def test_a_synthetic_pickle_rebuilds_into_files_load_mnist_reads_back(tmp_path: Path) -> None:
    parts = synthetic_parts()
    files = rebuild_mnist_idx(pickle_gz(parts))
    assert list(files) == list(MNIST_FILES)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    splits = load_mnist(tmp_path, download=False)
    (train_x, train_y), (validation_x, validation_y), (test_x, test_y) = parts
    np.testing.assert_array_equal(splits.train_x.reshape(10, 784), np.concatenate([train_x, validation_x]))
    np.testing.assert_array_equal(splits.train_y, np.concatenate([train_y, validation_y]))
    np.testing.assert_array_equal(splits.test_x.reshape(5, 784), test_x)
    np.testing.assert_array_equal(splits.test_y, test_y)
    assert files["train-images-idx3-ubyte"][:16] == bytes.fromhex("00000803" "0000000a" "0000001c" "0000001c")


@pytest.mark.parametrize("protocol", [2, 4])
def test_the_pickle_reads_at_protocols_2_and_4(protocol: int) -> None:
    train, validation, test = read_mnist_pickle(pickle_gz(synthetic_parts(), protocol))
    assert (len(train.labels), len(validation.labels), len(test.labels)) == (7, 3, 5)


@given(arrays(np.uint8, array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=6)))
def test_idx_bytes_round_trip_through_the_loaders_reader(array: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "array-idx-ubyte"
        path.write_bytes(idx_bytes(array))
        np.testing.assert_array_equal(read_idx(path, array.ndim), array)


@given(arrays(np.uint8, st.integers(0, 300)))
def test_pixels_stored_as_byte_over_256_come_back_as_the_same_bytes(pixels: np.ndarray) -> None:
    np.testing.assert_array_equal(pixels_to_bytes((pixels / 256).astype(np.float32)), pixels)


@pytest.mark.parametrize("value", [0.5 / 256, 1.0, -1 / 256])
def test_pixels_that_are_not_bytes_over_256_are_refused(value: float) -> None:
    with pytest.raises(ServerError, match="byte / 256"):
        pixels_to_bytes(np.array([0.0, value], dtype=np.float32))


def test_labels_outside_0_to_9_are_refused() -> None:
    parts = synthetic_parts()
    parts[2][1][0] = 10
    with pytest.raises(ServerError, match=r"labels run from \d+ to 10"):
        rebuild_mnist_idx(pickle_gz(parts))


class Exploit:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("true",))


@pytest.mark.parametrize("payload, words", [
    (gzip.compress(pickle.dumps(Exploit(), protocol=2)), "only numpy arrays"),
    (gzip.compress(pickle.dumps((1, 2), protocol=2)), "(train, validation, test)"),
    (gzip.compress(pickle.dumps(((np.zeros((2, 10)), np.zeros(2)),) * 3, protocol=2)), "expected N×784"),
    (b"not gzip at all", "cannot read the MNIST pickle"),
    (gzip.compress(b"\x80\x02garbage"), "cannot read the MNIST pickle"),
])
def test_a_pickle_that_is_not_the_classic_one_is_one_clear_error(payload: bytes, words: str) -> None:
    with pytest.raises(ServerError, match=words.replace("(", r"\(").replace(")", r"\)")):
        rebuild_mnist_idx(payload)


def test_synthetic_files_are_not_taken_for_the_published_ones() -> None:
    files = rebuild_mnist_idx(pickle_gz(synthetic_parts()))
    problems = checksum_problems(files)
    assert len(problems) == 4 and all("expected" in problem for problem in problems)
    size = MNIST_FILE_CHECKSUMS["t10k-labels-idx1-ubyte"][0]
    assert "has MD5" in str(checksum_problem("t10k-labels-idx1-ubyte", bytes(size)))
