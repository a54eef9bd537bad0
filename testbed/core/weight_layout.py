"""Weight dicts as the wire sees them: fingerprint, hash, and the flat partial / dense layout."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np

from testbed.core.codecs import WireError

FINGERPRINT_BYTES = 16


def _as_float32(name: str, tensor: object) -> np.ndarray:
    array = np.asarray(tensor)
    if array.dtype.kind != "f" or array.dtype.itemsize != 4:
        raise WireError(f"tensor {name!r} has dtype {array.dtype}; the wire carries float32 only")
    return array


def _checked(weights: Mapping[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    items = []
    for name, tensor in weights.items():
        if not isinstance(name, str):
            raise WireError(f"tensor name {name!r} is not a str")
        items.append((name, _as_float32(name, tensor)))
    return items


def _le_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _name_bytes(name: str) -> bytes:
    encoded = name.encode("utf-8")
    return struct.pack("<I", len(encoded)) + encoded


def model_fingerprint(weights: Mapping[str, np.ndarray]) -> bytes:
    """16 bytes identifying the architecture: sha256 over names, shapes and dtype, in order."""
    digest = hashlib.sha256(b"edge-testbed model fingerprint v1")
    for name, array in _checked(weights):
        digest.update(_name_bytes(name))
        digest.update(struct.pack("<I", array.ndim))
        digest.update(struct.pack(f"<{array.ndim}Q", *array.shape))
        digest.update(b"float32")
    return digest.digest()[:FINGERPRINT_BYTES]


def weights_hash(weights: Mapping[str, np.ndarray]) -> bytes:
    """32 bytes: sha256 over (length-prefixed name, byte count, little-endian float32 bytes) in order."""
    digest = hashlib.sha256(b"edge-testbed weights v1")
    for name, array in _checked(weights):
        data = _le_bytes(array)
        digest.update(_name_bytes(name))
        digest.update(struct.pack("<Q", len(data)))
        digest.update(data)
    return digest.digest()


def partial_tensor_names(weights: Mapping[str, np.ndarray]) -> list[str]:
    """Names of the partially updated tensors (ndim > 1: conv and linear weights), in order."""
    return [name for name, array in _checked(weights) if array.ndim > 1]


def _dense_tensor_names(weights: Mapping[str, np.ndarray]) -> list[str]:
    return [name for name, array in _checked(weights) if array.ndim <= 1]


def _concat(weights: Mapping[str, np.ndarray], names: list[str]) -> np.ndarray:
    if not names:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(weights[name], dtype=np.float32).ravel() for name in names])


def flatten_partial(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """Float32 concatenation of all partial tensors in order; flat position i addresses it."""
    return _concat(weights, partial_tensor_names(weights))


def _partial_sizes(weights: Mapping[str, np.ndarray]) -> list[int]:
    return [int(np.asarray(weights[name]).size) for name in partial_tensor_names(weights)]


def count_partial(weights: Mapping[str, np.ndarray]) -> int:
    """I: the total number of partially updated weights."""
    return sum(_partial_sizes(weights))


def _flatten_dense(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    return _concat(weights, _dense_tensor_names(weights))
