"""The shared initial weights w⁰: regenerable anywhere from the seed and the model's tensor layout."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import numpy as np

from testbed.core.seeds import Stream, generator
from testbed.core.wire import model_fingerprint

Layout = Sequence[tuple[str, tuple[int, ...]]]


def layout_of(weights: Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in order: all that w⁰ depends on besides the seed."""
    return [(name, tuple(int(d) for d in array.shape)) for name, array in weights.items()]


def _fingerprint_of_layout(layout: Layout) -> bytes:
    return model_fingerprint({name: np.zeros(shape, dtype=np.float32) for name, shape in layout})


def initial_weights(layout: Layout, seed: int) -> dict[str, np.ndarray]:
    """w⁰ for a layout: the same bits on every machine (numpy PCG64, float64 draws rounded to float32).

    Tensors with ndim > 1 (linear/conv weights) are uniform in ±1/sqrt(fan_in), torch's default
    range (fan_in = product of all dimensions but the first). A 1-d tensor named `*.weight` is a
    normalisation scale (ones); a 1-d `*.bias` right after a weight matrix/kernel is uniform in
    ±1/sqrt(fan_in) of it (torch's Linear/Conv default), any other bias (e.g. a norm's shift) is
    zeros; other 1-d or
    0-d tensors (running statistics, counters) are zeros, except `*.running_var`, which is ones.
    Every tensor draws from its own stream, Stream.INITIAL_WEIGHTS with indices (fingerprint word,
    name word) under the seed, so adding a tensor does not shift the others.
    """
    fingerprint_key = int.from_bytes(_fingerprint_of_layout(layout)[:8], "little")
    weights: dict[str, np.ndarray] = {}
    last_fan_in: int | None = None  # fan-in of the tensor just before, when that was a weight matrix/kernel
    for name, shape in layout:
        name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
        rng = generator(int(seed), Stream.INITIAL_WEIGHTS, fingerprint_key, name_key)
        if len(shape) > 1:
            fan_in = int(np.prod(shape[1:]))
            bound = 1.0 / math.sqrt(fan_in)
            array = rng.uniform(-bound, bound, size=shape)
            last_fan_in = fan_in
        elif name.endswith("running_var") or (name.endswith("weight") and len(shape) == 1):
            array = np.ones(shape)
            last_fan_in = None
        elif name.endswith("bias") and last_fan_in is not None:
            bound = 1.0 / math.sqrt(last_fan_in)
            array = rng.uniform(-bound, bound, size=shape)
            last_fan_in = None
        else:
            array = np.zeros(shape)
            last_fan_in = None
        weights[name] = array.astype(np.float32)
    return weights
