"""Index and value codecs of the update wire format: the two interfaces, and looking codecs up by name or wire id.

An *index codec* turns the sorted, unique partial positions of an update (int64 in [0, n)) into the
index section and back. A *value codec* turns the new values at those positions into the value section
and defines, bit for bit, what a device holds after applying them. Codecs are plugins: a module in this
package that registers a class with ``@register_index_codec(name, wire_id=…)`` or
``@register_value_codec(name, wire_id=…)``. The wire id is what the update header carries; it is
given explicitly so that it never changes when codecs are added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from testbed.core.errors import TestbedError
from testbed.core.plugins import INDEX_CODECS, VALUE_CODECS, PluginRegistry


class WireError(TestbedError):
    """An update, a chunk set or a weight dict is malformed or does not match what it claims."""


def index_floor_bits(n: int, k: int) -> float:
    """log2 C(n, k): the fewest bits any code needs to name one k-subset of n positions."""
    if not 0 <= k <= n:
        raise WireError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k in (0, n):
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)



class IndexCodec:
    """Base of the index codecs: exact section size, size bounds, encode, decode."""

    name = ""

    def section_bytes(self, positions: np.ndarray, n: int) -> int | None:
        """Exact bytes of the section for these positions, or None when the codec cannot represent them."""
        raise NotImplementedError

    def section_bounds(self, n: int, k: int) -> tuple[int, int] | None:
        """(min, max) bytes of any valid section for k of n positions, or None when it cannot represent them."""
        raise NotImplementedError

    def encode(self, positions: np.ndarray, n: int) -> bytes:
        raise NotImplementedError

    def decode(self, section: bytes, n: int, k: int) -> np.ndarray:
        """Positions (int64, strictly increasing, in [0, n), exactly k); WireError when malformed."""
        raise NotImplementedError


@dataclass(frozen=True)
class StoredValues:
    """Values as the value section stores them, and the per-partial-tensor scales (int8 only)."""

    values: np.ndarray  # fp32: float32 targets; fp16: float16 deltas; int8: int8 quantised deltas
    scales: np.ndarray  # float32, one per partial tensor for int8, empty otherwise


class ValueCodec:
    """Base of the value codecs.

    Section size = value_bytes * k + tensor_bytes * (number of partial tensors). `held` is the single
    definition of what a device holds at the selected positions; the encoder hashes exactly that.
    """

    name = ""
    value_bytes = 4
    tensor_bytes = 0

    def tensor_entries(self, k: int, section_bytes: int) -> int | None:
        """Per-tensor entries a section of this length holds for k values, or None if no layout fits."""
        extra = section_bytes - self.value_bytes * k
        if extra < 0 or (extra % self.tensor_bytes if self.tensor_bytes else extra):
            return None
        return extra // self.tensor_bytes if self.tensor_bytes else 0

    def quantise(
        self, target: np.ndarray, base: np.ndarray, tensor_of: np.ndarray, tensor_count: int
    ) -> StoredValues:
        """Stored form of the new values; target and base are float32 at the selected positions."""
        raise NotImplementedError

    def pack(self, stored: StoredValues) -> bytes:
        raise NotImplementedError

    def unpack(self, section: bytes, k: int, tensor_count: int) -> StoredValues:
        raise NotImplementedError

    def held(self, base: np.ndarray, stored: StoredValues, tensor_of: np.ndarray) -> np.ndarray:
        """Float32 values the device holds at the selected positions, given its float32 base there."""
        raise NotImplementedError



def _by_wire_id(kind: str, registry: PluginRegistry[Any]) -> dict[str, Any]:
    ordered: dict[int, str] = {}
    for name in registry.names():
        wire_id = registry.attributes(name).get("wire_id")
        if not isinstance(wire_id, int) or not 0 <= wire_id <= 255:
            raise WireError(f"{kind} codec {name!r} needs wire_id=<0..255> in its registration")
        if wire_id in ordered:
            raise WireError(f"{kind} codecs {ordered[wire_id]!r} and {name!r} share wire id {wire_id}")
        ordered[wire_id] = name
    codecs = {}
    for _, name in sorted(ordered.items()):
        codecs[name] = registry.get(name)()
    return codecs


@cache
def index_codecs() -> dict[str, IndexCodec]:
    """Every index codec by name, in wire-id order (the header stores the position in this order)."""
    return _by_wire_id("index", INDEX_CODECS)


@cache
def value_codecs() -> dict[str, ValueCodec]:
    """Every value codec by name, in wire-id order."""
    return _by_wire_id("value", VALUE_CODECS)


def index_codec_named(name: str) -> IndexCodec:
    """The index codec registered under `name`."""
    codecs = index_codecs()
    if name not in codecs:
        raise WireError(f"unknown index codec {name!r}; expected one of {tuple(codecs)} or 'auto'")
    return codecs[name]


def value_codec_named(name: str) -> ValueCodec:
    """The value codec registered under `name`."""
    codecs = value_codecs()
    if name not in codecs:
        raise WireError(f"unknown value codec {name!r}; expected one of {tuple(codecs)}")
    return codecs[name]


def choose_index_codec(name: str, positions: np.ndarray, n: int) -> str:
    """`name` if it can represent the positions; for 'auto' the smallest section (ties: lower wire id)."""
    if name != "auto":
        if index_codec_named(name).section_bytes(positions, n) is None:
            raise WireError(f"index codec {name!r} cannot represent k={positions.size} of n={n} positions")
        return name
    usable = []
    for order, (codec_name, codec) in enumerate(index_codecs().items()):
        size = codec.section_bytes(positions, n)
        if size is not None:
            usable.append((size, order, codec_name))
    return min(usable)[2]


def tensor_of(positions: np.ndarray, tensor_sizes: list[int]) -> np.ndarray:
    """Index of the partial tensor each flat position falls in (tensors concatenated in order)."""
    return np.searchsorted(np.cumsum(tensor_sizes, dtype=np.int64), positions, side="right")
