"""MNIST IDX and CIFAR-10 batch loaders: small generated files, gz/tar.gz variants, strict errors, mocked download."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from server import datasets
from server.data import CIFAR10_MEAN, CIFAR10_STD, load_dataset_arrival
from server.datasets import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    CIFAR10_TEST_BATCH,
    CIFAR10_TRAIN_BATCHES,
    CIFAR10_URL,
    MNIST_FILES,
    MNIST_MIRRORS,
    dataset_directory,
    load_cifar10,
    load_mnist,
    mnist_sample_counts,
    read_cifar_batch,
    read_idx,
)
from server.errors import ServerError
from testbed.core.scenario import DataSpec

REAL_FETCH = datasets.fetch_url  # captured before the autouse fixture replaces it
SIZES = {"initial_samples": 20, "new_samples_per_round": 15, "validation_samples": 10, "test_samples": 10}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def make_mnist(directory: Path, train: int = 60, test: int = 20, gz: bool = False, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        write(directory / name, idx_bytes(array), gz)
    return arrays


def batch_bytes(data: object, labels: object) -> bytes:
    return pickle.dumps({b"batch_label": b"x", b"data": data, b"labels": labels, b"filenames": []}, protocol=2)


def make_cifar(directory: Path, per_batch: int = 12, test: int = 20, seed: int = 0) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    folder = directory / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name, count in [*((n, per_batch) for n in CIFAR10_TRAIN_BATCHES), (CIFAR10_TEST_BATCH, test)]:
        data = rng.integers(0, 256, (count, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, count)]
        (folder / name).write_bytes(batch_bytes(data, labels))
        batches[name] = (data, labels)
    return batches


def refuse_network(url: str, destination: Path, timeout_s: float = 0.0) -> None:
    raise OSError(f"no network in tests ({url})")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "fetch_url", refuse_network)


# ---------------------------------------------------------------- directories


def test_dataset_directory_prefers_root_then_environment_then_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EDGE_TESTBED_DATA", raising=False)
    assert dataset_directory("mnist", tmp_path / "mine") == tmp_path / "mine"
    assert dataset_directory("mnist", None) == Path.home() / ".cache" / "edge-testbed" / "datasets" / "mnist"
    monkeypatch.setenv("EDGE_TESTBED_DATA", str(tmp_path / "shared"))
    assert dataset_directory("cifar10", None) == tmp_path / "shared" / "cifar10"
    assert dataset_directory("cifar10", tmp_path) == tmp_path


# ---------------------------------------------------------------- MNIST


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_loads_plain_and_gzipped_idx(tmp_path: Path, gz: bool) -> None:
    arrays = make_mnist(tmp_path, gz=gz)
    splits = load_mnist(tmp_path, download=False)
    assert splits.train_x.shape == (60, 1, 28, 28) and splits.test_x.shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(splits.train_x[:, 0], arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(splits.test_y, arrays["t10k-labels-idx1-ubyte"])
    assert splits.train_y.dtype == np.int64


def test_mnist_arrival_uses_train_pool_and_official_test(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path)
    arrival = load_dataset_arrival(DataSpec(dataset="mnist", root=tmp_path, download=False, **SIZES), seed=3)
    assert arrival.input_shape == (1, 28, 28) and arrival.num_features == 784 and arrival.num_classes == 10
    assert (len(arrival.initial), [len(s) for s in arrival.increments]) == (20, [15, 15, 10])
    assert (len(arrival.validation), len(arrival.test)) == (10, 10)
    assert arrival.initial.x.dtype == np.float32 and arrival.initial.x.shape == (20, 1, 28, 28)
    assert 0.0 <= arrival.initial.x.min() and arrival.initial.x.max() <= 1.0
    train_pixels = {bytes(img) for img in arrays["train-images-idx3-ubyte"]}
    test_pixels = {bytes(img) for img in arrays["t10k-images-idx3-ubyte"]}
    as_pixels = lambda split: {bytes(np.rint(img[0] * 255).astype(np.uint8)) for img in split.x}  # noqa: E731
    assert as_pixels(arrival.training_set(3)) == train_pixels
    assert as_pixels(arrival.validation) | as_pixels(arrival.test) == test_pixels
    assert not as_pixels(arrival.validation) & as_pixels(arrival.test)
    again = load_dataset_arrival(DataSpec(dataset="mnist", root=tmp_path, download=False, **SIZES), seed=3)
    other = load_dataset_arrival(DataSpec(dataset="mnist", root=tmp_path, download=False, **SIZES), seed=4)
    np.testing.assert_array_equal(arrival.increments[1].x, again.increments[1].x)
    assert not np.array_equal(arrival.initial.y, other.initial.y)


def test_mnist_sizes_that_do_not_fit_name_the_numbers(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    spec = DataSpec(dataset="mnist", root=tmp_path, download=False, validation_samples=15, test_samples=10)
    with pytest.raises(ServerError, match=r"20 samples in its test set.*test_samples \(10\)"):
        load_dataset_arrival(spec, seed=0)
    spec = DataSpec(dataset="mnist", root=tmp_path, download=False, initial_samples=61, **{
        k: v for k, v in SIZES.items() if k != "initial_samples"})
    with pytest.raises(ServerError, match=r"60 samples in its train set.*initial_samples \(61\)"):
        load_dataset_arrival(spec, seed=0)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_counts_are_read_from_the_headers(tmp_path: Path, gz: bool) -> None:
    assert mnist_sample_counts(tmp_path) is None
    make_mnist(tmp_path, train=33, test=7, gz=gz)
    assert mnist_sample_counts(tmp_path) == (33, 7)
    (tmp_path / f"t10k-images-idx3-ubyte{'.gz' if gz else ''}").write_bytes(b"not idx")
    with pytest.raises(ServerError, match="t10k-images"):
        mnist_sample_counts(tmp_path)


def test_absent_mnist_names_directory_files_and_url(tmp_path: Path) -> None:
    target = tmp_path / "nothing here"
    with pytest.raises(ServerError) as caught:
        load_dataset_arrival(DataSpec(dataset="mnist", root=target, download=False, **SIZES), seed=0)
    message = str(caught.value)
    assert str(target) in message and MNIST_MIRRORS[0] in message
    assert all(name in message for name in MNIST_FILES)


def test_failed_mnist_download_gives_the_same_clear_message(tmp_path: Path) -> None:
    make_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ServerError) as caught:
        load_mnist(tmp_path, download=True)
    message = str(caught.value)
    assert str(tmp_path) in message and "missing t10k-labels-idx1-ubyte" in message
    assert "download failed" in message and "no network in tests" in message
    assert not list(tmp_path.glob("*.part"))


def test_mnist_download_checks_size_and_md5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    make_mnist(source, gz=True)
    fetched: list[str] = []

    def fake_fetch(url: str, destination: Path, timeout_s: float = 0.0) -> None:
        fetched.append(url)
        destination.write_bytes((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(datasets, "fetch_url", fake_fetch)
    archives = {f"{n}.gz": ((source / f"{n}.gz").stat().st_size, None) for n in MNIST_FILES}
    monkeypatch.setattr(datasets, "MNIST_ARCHIVES", archives)
    splits = load_mnist(tmp_path / "fresh", download=True)
    assert len(splits.train_y) == 60 and fetched == [MNIST_MIRRORS[0] + f"{n}.gz" for n in MNIST_FILES]
    archives["t10k-images-idx3-ubyte.gz"] = (archives["t10k-images-idx3-ubyte.gz"][0], "0" * 32)
    with pytest.raises(ServerError, match="MD5"):
        load_mnist(tmp_path / "md5", download=True)
    assert not (tmp_path / "md5" / "t10k-images-idx3-ubyte.gz").exists()
    archives["t10k-images-idx3-ubyte.gz"] = (1, None)
    with pytest.raises(ServerError, match="bytes, expected 1"):
        load_mnist(tmp_path / "size", download=True)


def test_fetch_url_writes_through_a_temporary_file(tmp_path: Path) -> None:
    # file:// needs no network; the real function (not the autouse stub) is exercised.
    real_fetch = REAL_FETCH
    source = tmp_path / "source.bin"
    source.write_bytes(b"payload" * 1000)
    destination = tmp_path / "out" / "copy.bin"
    real_fetch(source.as_uri(), destination, timeout_s=5.0)
    assert destination.read_bytes() == source.read_bytes()
    with pytest.raises(OSError):
        real_fetch((tmp_path / "absent").as_uri(), tmp_path / "out" / "absent.bin", timeout_s=5.0)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["copy.bin"]


def _corrupt_mnist(directory: Path, name: str, data: bytes) -> Path:
    make_mnist(directory)
    (directory / name).unlink()
    return write(directory / name, data)


@pytest.mark.parametrize(
    ("name", "data", "match"),
    [
        ("train-images-idx3-ubyte", idx_bytes(np.zeros((60, 28, 28)))[:-1], "truncated"),
        ("train-images-idx3-ubyte", idx_bytes(np.zeros((60, 28, 28))) + b"\0", "longer than its header"),
        ("train-images-idx3-ubyte", idx_bytes(np.zeros((60, 28, 28)))[:9], "truncated"),
        ("train-images-idx3-ubyte", b"\0\0\x0d\x03" + idx_bytes(np.zeros((60, 28, 28)))[4:], "IDX magic 00000d03"),
        ("train-images-idx3-ubyte", idx_bytes(np.zeros((60, 784))), "IDX magic 00000802"),
        ("train-images-idx3-ubyte", idx_bytes(np.zeros((60, 32, 32))), r"shape \(32, 32\), expected \(28, 28\)"),
        ("train-labels-idx1-ubyte", idx_bytes(np.zeros(59)), "60 images but .* 59 labels"),
        ("t10k-labels-idx1-ubyte", idx_bytes(np.full(20, 10)), "label 10"),
        ("t10k-labels-idx1-ubyte", idx_bytes(np.zeros((20, 1))), "IDX magic 00000802"),
    ],
)
def test_malformed_mnist_file_names_the_file(tmp_path: Path, name: str, data: bytes, match: str) -> None:
    path = _corrupt_mnist(tmp_path, name, data)
    with pytest.raises(ServerError, match=match) as caught:
        load_mnist(tmp_path, download=False)
    assert str(path) in str(caught.value)


def test_corrupt_gzip_names_the_file(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ServerError, match="t10k-images-idx3-ubyte.gz"):
        load_mnist(tmp_path, download=False)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(ServerError, match="cannot read .*t10k-images-idx3-ubyte.gz"):
        read_idx(path, 3)


# ---------------------------------------------------------------- CIFAR-10


def test_cifar_loads_batches_and_arrival_is_normalised_per_channel(tmp_path: Path) -> None:
    batches = make_cifar(tmp_path)
    splits = load_cifar10(tmp_path, download=False)
    assert splits.train_x.shape == (60, 3, 32, 32) and splits.test_x.shape == (20, 3, 32, 32)
    np.testing.assert_array_equal(splits.train_x[12:24].reshape(12, -1), batches["data_batch_2"][0])
    assert splits.test_y.tolist() == batches[CIFAR10_TEST_BATCH][1]
    arrival = load_dataset_arrival(DataSpec(dataset="cifar10", root=tmp_path, download=False, **SIZES), seed=1)
    assert arrival.input_shape == (3, 32, 32) and arrival.num_features == 3072
    assert arrival.initial.x.shape == (20, 3, 32, 32) and arrival.initial.x.dtype == np.float32
    pixels = arrival.training_set(3).x * np.asarray(CIFAR10_STD).reshape(1, 3, 1, 1) + np.asarray(
        CIFAR10_MEAN
    ).reshape(1, 3, 1, 1)
    restored = np.rint(pixels * 255).astype(np.uint8).reshape(60, -1)
    assert sorted(map(bytes, restored)) == sorted(map(bytes, splits.train_x.reshape(60, -1)))


def test_cifar_archive_is_extracted(tmp_path: Path) -> None:
    make_cifar(tmp_path / "build")
    archive = tmp_path / "data" / CIFAR10_ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "build" / CIFAR10_FOLDER, arcname=CIFAR10_FOLDER)
    splits = load_cifar10(tmp_path / "data", download=False)
    assert len(splits.train_y) == 60 and (tmp_path / "data" / CIFAR10_FOLDER / CIFAR10_TEST_BATCH).is_file()


def test_unsafe_or_broken_cifar_archive_is_refused(tmp_path: Path) -> None:
    archive = tmp_path / CIFAR10_ARCHIVE
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escape")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(ServerError, match="unsafe member '../escape'"):
        load_cifar10(tmp_path, download=False)
    assert not (tmp_path.parent / "escape").exists()
    archive.write_bytes(b"not an archive")
    with pytest.raises(ServerError, match=f"cannot extract .*{CIFAR10_ARCHIVE}"):
        load_cifar10(tmp_path, download=False)


def test_absent_cifar_names_directory_files_and_url(tmp_path: Path) -> None:
    for download in (False, True):
        with pytest.raises(ServerError) as caught:
            load_dataset_arrival(DataSpec(dataset="cifar10", root=tmp_path, download=download, **SIZES), seed=0)
        message = str(caught.value)
        assert str(tmp_path) in message and CIFAR10_URL in message and CIFAR10_ARCHIVE in message
        assert all(name in message for name in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH, CIFAR10_FOLDER))
        assert ("download failed" in message) == download


def test_environment_directory_is_used_when_root_is_unset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path / "cifar10")
    monkeypatch.setenv("EDGE_TESTBED_DATA", str(tmp_path))
    arrival = load_dataset_arrival(DataSpec(dataset="cifar10", download=False, **SIZES), seed=0)
    assert len(arrival.test) == 10


class _Evil:
    def __reduce__(self) -> tuple:
        return (os.getcwd, ())


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (batch_bytes(np.zeros((4, 3071), np.uint8), [0] * 4), r"shape \(N, 3072\)"),
        (batch_bytes(np.zeros((4, 3072), np.float32), [0] * 4), "uint8"),
        (batch_bytes([[0] * 3072] * 4, [0] * 4), "got list"),
        (batch_bytes(np.zeros((4, 3072), np.uint8), [0] * 3), "4 images but 3 labels"),
        (batch_bytes(np.zeros((4, 3072), np.uint8), [0, 1, 2, 10]), "label 10"),
        (batch_bytes(np.zeros((4, 3072), np.uint8), [[0], [1], [2], [3]]), "flat list"),
        (batch_bytes(np.zeros((4, 3072), np.uint8), ["a"] * 4), "flat list"),
        (pickle.dumps({b"data": 1}), "expected a dict"),
        (pickle.dumps([1, 2]), "expected a dict"),
        (batch_bytes(np.zeros((4, 3072), np.uint8), [0] * 4)[:-30], "cannot unpickle"),
        (b"", "cannot unpickle"),
        (pickle.dumps({b"data": _Evil(), b"labels": []}), "refusing to load the global posix.getcwd|cannot unpickle"),
    ],
)
def test_malformed_cifar_batch_names_the_file(tmp_path: Path, payload: bytes, match: str) -> None:
    make_cifar(tmp_path)
    path = tmp_path / CIFAR10_FOLDER / "data_batch_3"
    path.write_bytes(payload)
    with pytest.raises(ServerError, match=match) as caught:
        load_cifar10(tmp_path, download=False)
    assert str(path) in str(caught.value)
    with pytest.raises(ServerError):
        read_cifar_batch(path)


def test_cifar_download_is_verified_then_extracted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar(tmp_path / "build")
    built = tmp_path / "built.tar.gz"
    with tarfile.open(built, "w:gz") as tar:
        tar.add(tmp_path / "build" / CIFAR10_FOLDER, arcname=CIFAR10_FOLDER)
    urls: list[str] = []

    def fake_fetch(url: str, destination: Path, timeout_s: float = 0.0) -> None:
        urls.append(url)
        destination.write_bytes(built.read_bytes())

    monkeypatch.setattr(datasets, "fetch_url", fake_fetch)
    monkeypatch.setattr(datasets, "CIFAR10_ARCHIVE_SIZE", built.stat().st_size)
    monkeypatch.setattr(datasets, "CIFAR10_ARCHIVE_MD5", hashlib.md5(built.read_bytes()).hexdigest())
    assert len(load_cifar10(tmp_path / "data", download=True).test_y) == 20 and urls == [CIFAR10_URL]
    monkeypatch.setattr(datasets, "CIFAR10_ARCHIVE_MD5", "0" * 32)
    with pytest.raises(ServerError, match="download failed .*MD5") as caught:
        load_cifar10(tmp_path / "other", download=True)
    assert str(tmp_path / "other") in str(caught.value) and not (tmp_path / "other" / CIFAR10_ARCHIVE).exists()
