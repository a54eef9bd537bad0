"""Index and value codecs of the update wire format: pure functions over arrays and bytes, one registry per kind.

An *index codec* turns the sorted, unique partial positions of an update (int64 in [0, n)) into the
index section and back. A *value codec* turns the new values at those positions into the value section
and defines, bit for bit, what a device holds after applying them. Both registries are keyed by the
names scenarios use; the wire id of a codec is its position in its registry (stable: new codecs are
appended, never inserted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class WireError(Exception):
    """An update, a chunk set or a weight dict is malformed or does not match what it claims."""


_U32_MAX = 0xFFFFFFFF
_GOLOMB_MAX_N = 2**62  # keeps every gap, remainder and running sum inside int64
_FLOAT16_MAX = 65504.0
_INT8_LEVELS = 127


def index_floor_bits(n: int, k: int) -> float:
    """log2 C(n, k): the fewest bits any code needs to name one k-subset of n positions."""
    if not 0 <= k <= n:
        raise WireError(f"need 0 <= k <= n, got k={k}, n={n}")
    if k in (0, n):
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


# --- index codecs ------------------------------------------------------------------------------


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


class DenseIndex(IndexCodec):
    """Every position, no section at all (k == n)."""

    name = "dense"

    def section_bytes(self, positions: np.ndarray, n: int) -> int | None:
        return 0 if positions.size == n else None

    def section_bounds(self, n: int, k: int) -> tuple[int, int] | None:
        return (0, 0) if k == n else None

    def encode(self, positions: np.ndarray, n: int) -> bytes:
        return b""

    def decode(self, section: bytes, n: int, k: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)


class RawIndex(IndexCodec):
    """Each position as a little-endian u32 (n <= 2**32)."""

    name = "raw"

    def section_bytes(self, positions: np.ndarray, n: int) -> int | None:
        bounds = self.section_bounds(n, int(positions.size))
        return None if bounds is None else bounds[0]

    def section_bounds(self, n: int, k: int) -> tuple[int, int] | None:
        return (4 * k, 4 * k) if n <= _U32_MAX + 1 else None

    def encode(self, positions: np.ndarray, n: int) -> bytes:
        return positions.astype("<u4").tobytes()

    def decode(self, section: bytes, n: int, k: int) -> np.ndarray:
        positions = np.frombuffer(section, dtype="<u4").astype(np.int64)
        if k and np.any(np.diff(positions) <= 0):
            raise WireError("raw index positions are not strictly increasing (sorted, unique)")
        if k and positions[-1] >= n:
            raise WireError(f"raw index position {int(positions[-1])} is out of range for n={n}")
        return positions


class BitmapIndex(IndexCodec):
    """One bit per position, LSB-first within each byte; padding bits after n must be zero."""

    name = "bitmap"

    def section_bytes(self, positions: np.ndarray, n: int) -> int | None:
        return (n + 7) // 8

    def section_bounds(self, n: int, k: int) -> tuple[int, int] | None:
        return ((n + 7) // 8,) * 2

    def encode(self, positions: np.ndarray, n: int) -> bytes:
        bits = np.zeros(n, dtype=np.uint8)
        bits[positions] = 1
        return np.packbits(bits, bitorder="little").tobytes()

    def decode(self, section: bytes, n: int, k: int) -> np.ndarray:
        bits = np.unpackbits(np.frombuffer(section, dtype=np.uint8), bitorder="little")
        if np.any(bits[n:]):
            raise WireError("bitmap index has bits set in the padding after position n")
        positions = np.flatnonzero(bits[:n]).astype(np.int64)
        if positions.size != k:
            raise WireError(f"bitmap index has {positions.size} bits set but the header says k={k}")
        return positions


class GolombRiceIndex(IndexCodec):
    """Rice codes of the gaps between sorted positions.

    gap[0] = p[0], gap[i] = p[i] - p[i-1] - 1. With Rice parameter b, gap = q * 2**b + r is coded as
    q zero bits and a one bit (unary), then r in b bits. Layout of the section: one byte b (0 <= b <=
    max(0, bit_length(n) - 1)), then, MSB-first, the k unary parts one after another, then the k
    remainders (b bits each, most significant first), then zero bits up to the byte boundary. This is
    the same set of codewords as interleaved Rice coding (so the same size), split into two streams so
    both directions are vectorised. The encoder picks the b of smallest exact size (ties: smaller b).
    k = 0 is the single byte 0.
    """

    name = "golomb-rice"

    @staticmethod
    def max_parameter(n: int) -> int:
        return max(0, int(n).bit_length() - 1)

    @staticmethod
    def _gaps(positions: np.ndarray) -> np.ndarray:
        return np.diff(positions.astype(np.int64), prepend=-1) - 1

    @staticmethod
    def _bits(gaps: np.ndarray, b: int) -> int:
        return int(gaps.size) * (b + 1) + int(np.sum(gaps >> b))

    def parameter(self, positions: np.ndarray, n: int) -> int:
        """The Rice parameter of smallest exact size for these positions (0 when k = 0)."""
        if positions.size == 0:
            return 0
        gaps = self._gaps(positions)
        return min(range(self.max_parameter(n) + 1), key=lambda b: (self._bits(gaps, b), b))

    def section_bytes(self, positions: np.ndarray, n: int) -> int | None:
        if n > _GOLOMB_MAX_N:
            return None
        if positions.size == 0:
            return 1
        return 1 + (self._bits(self._gaps(positions), self.parameter(positions, n)) + 7) // 8

    def section_bounds(self, n: int, k: int) -> tuple[int, int] | None:
        if n > _GOLOMB_MAX_N:
            return None
        if k == 0:
            return (1, 1)
        # sum(gaps) = p[k-1] - (k-1) <= n - k, so sum(gaps >> b) <= (n - k) >> b.
        largest = max(k * (b + 1) + ((n - k) >> b) for b in range(self.max_parameter(n) + 1))
        return (1 + (k + 7) // 8, 1 + (largest + 7) // 8)

    def encode(self, positions: np.ndarray, n: int) -> bytes:
        k = int(positions.size)
        if k == 0:
            return b"\x00"
        b = self.parameter(positions, n)
        gaps = self._gaps(positions)
        quotients = gaps >> b
        unary_bits = int(quotients.sum()) + k
        bits = np.zeros(unary_bits + k * b, dtype=np.uint8)
        bits[np.cumsum(quotients + 1) - 1] = 1  # the terminating one of each unary part
        if b:
            remainders = gaps & ((1 << b) - 1)
            planes = bits[unary_bits:].reshape(k, b)
            for column in range(b):
                planes[:, column] = (remainders >> (b - 1 - column)) & 1
        return bytes([b]) + np.packbits(bits, bitorder="big").tobytes()

    def decode(self, section: bytes, n: int, k: int) -> np.ndarray:
        if k == 0:
            if section != b"\x00":
                raise WireError("golomb-rice index of k=0 must be the single byte 0")
            return np.zeros(0, dtype=np.int64)
        if not section:
            raise WireError("golomb-rice index section is empty; it needs the Rice parameter byte")
        b = section[0]
        if b > self.max_parameter(n):
            raise WireError(f"golomb-rice parameter b={b} is too large for n={n}")
        bits = np.unpackbits(np.frombuffer(section, dtype=np.uint8, offset=1), bitorder="big")
        ones = np.flatnonzero(bits)
        if ones.size < k:
            raise WireError(f"golomb-rice index ends after {ones.size} of k={k} unary codes")
        terminators = ones[:k].astype(np.int64)
        unary_bits = int(terminators[-1]) + 1
        end = unary_bits + k * b
        if end > bits.size:
            raise WireError("golomb-rice index is truncated inside its remainder bits")
        if (end + 7) // 8 != bits.size // 8 or np.any(bits[end:]):
            raise WireError("golomb-rice index has trailing bytes or non-zero padding bits")
        quotients = np.diff(terminators, prepend=-1) - 1
        if np.any(quotients > (n - 1) >> b):
            raise WireError(f"golomb-rice index has a gap beyond n={n}")
        remainders = np.zeros(k, dtype=np.int64)
        planes = bits[unary_bits:end].reshape(k, b)
        for column in range(b):
            remainders = (remainders << 1) | planes[:, column]
        gaps = (quotients << b) | remainders
        if float(gaps.sum(dtype=np.float64)) + k > n + 1.0:  # guards the int64 running sum
            raise WireError(f"golomb-rice positions run past n={n}")
        positions = np.cumsum(gaps + 1) - 1
        if positions[-1] >= n:
            raise WireError(f"golomb-rice position {int(positions[-1])} is out of range for n={n}")
        return positions


# --- value codecs ------------------------------------------------------------------------------


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


def _deltas(target: np.ndarray, base: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):  # IEEE results (inf, NaN, subnormals) are the defined outcome
        return np.subtract(target, base, dtype=np.float32)


class Fp32Values(ValueCodec):
    """The new values themselves as little-endian float32: exact to the bit."""

    name = "fp32"
    value_bytes = 4

    def quantise(
        self, target: np.ndarray, base: np.ndarray, tensor_of: np.ndarray, tensor_count: int
    ) -> StoredValues:
        return StoredValues(np.asarray(target, dtype=np.float32).copy(), np.zeros(0, np.float32))

    def pack(self, stored: StoredValues) -> bytes:
        return np.ascontiguousarray(stored.values, dtype="<f4").tobytes()

    def unpack(self, section: bytes, k: int, tensor_count: int) -> StoredValues:
        return StoredValues(np.frombuffer(section, dtype="<f4").astype(np.float32), np.zeros(0, np.float32))

    def held(self, base: np.ndarray, stored: StoredValues, tensor_of: np.ndarray) -> np.ndarray:
        return stored.values.astype(np.float32, copy=True)


class Fp16Values(ValueCodec):
    """float16(target - base) as little-endian float16; held = float32(base + float32(delta16)).

    The delta is computed in float32 and rounded to nearest float16; finite deltas beyond the float16
    range are clipped to +-65504 (not turned into infinities).
    """

    name = "fp16"
    value_bytes = 2

    def quantise(
        self, target: np.ndarray, base: np.ndarray, tensor_of: np.ndarray, tensor_count: int
    ) -> StoredValues:
        delta = _deltas(target, base)
        finite = np.isfinite(delta)
        delta[finite] = np.clip(delta[finite], -_FLOAT16_MAX, _FLOAT16_MAX)
        with np.errstate(under="ignore"):
            return StoredValues(delta.astype(np.float16), np.zeros(0, np.float32))

    def pack(self, stored: StoredValues) -> bytes:
        return np.ascontiguousarray(stored.values, dtype="<f2").tobytes()

    def unpack(self, section: bytes, k: int, tensor_count: int) -> StoredValues:
        return StoredValues(np.frombuffer(section, dtype="<f2").astype(np.float16), np.zeros(0, np.float32))

    def held(self, base: np.ndarray, stored: StoredValues, tensor_of: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            return np.add(base, stored.values.astype(np.float32), dtype=np.float32)


class Int8Values(ValueCodec):
    """Symmetric int8 deltas with one float32 scale per partial tensor.

    Section: the scales of all partial tensors in model order (little-endian float32; 0 for a tensor
    without selected positions), then one int8 per selected position. Encoding, all in float32:
    delta = target - base; scale_t = max |finite delta| over tensor t's positions / 127;
    q = clip(rint(delta / scale_t), -127, 127) (0 where scale_t = 0 or delta is NaN, +-127 for
    infinities). The device holds float32(base + float32(float32(q) * scale_t)).
    """

    name = "int8"
    value_bytes = 1
    tensor_bytes = 4

    def quantise(
        self, target: np.ndarray, base: np.ndarray, tensor_of: np.ndarray, tensor_count: int
    ) -> StoredValues:
        delta = _deltas(target, base)
        magnitude = np.where(np.isfinite(delta), np.abs(delta), np.float32(0)).astype(np.float32)
        largest = np.zeros(tensor_count, dtype=np.float32)
        np.maximum.at(largest, tensor_of, magnitude)
        with np.errstate(all="ignore"):
            scales = (largest / np.float32(_INT8_LEVELS)).astype(np.float32)
        scale = scales[tensor_of]
        with np.errstate(all="ignore"):
            ratio = np.where(scale > 0, delta / np.where(scale > 0, scale, np.float32(1)), np.float32(0))
        ratio = np.nan_to_num(ratio, nan=0.0, posinf=_INT8_LEVELS, neginf=-_INT8_LEVELS)
        quantised = np.clip(np.rint(ratio), -_INT8_LEVELS, _INT8_LEVELS).astype(np.int8)
        return StoredValues(quantised, scales)

    def pack(self, stored: StoredValues) -> bytes:
        return np.ascontiguousarray(stored.scales, dtype="<f4").tobytes() + stored.values.astype(np.int8).tobytes()

    def unpack(self, section: bytes, k: int, tensor_count: int) -> StoredValues:
        scales = np.frombuffer(section, dtype="<f4", count=tensor_count).astype(np.float32)
        values = np.frombuffer(section, dtype=np.int8, offset=4 * tensor_count).copy()
        if not np.all(np.isfinite(scales)) or np.any(np.signbit(scales)):
            raise WireError("int8 scales must be finite and non-negative")
        if np.any(values == -128):
            raise WireError("int8 value -128 is outside the symmetric range [-127, 127]")
        return StoredValues(values, scales)

    def held(self, base: np.ndarray, stored: StoredValues, tensor_of: np.ndarray) -> np.ndarray:
        with np.errstate(all="ignore"):
            step = np.multiply(stored.values.astype(np.float32), stored.scales[tensor_of], dtype=np.float32)
            return np.add(base, step, dtype=np.float32)


INDEX_CODEC_REGISTRY: dict[str, IndexCodec] = {
    codec.name: codec for codec in (DenseIndex(), RawIndex(), BitmapIndex(), GolombRiceIndex())
}
VALUE_CODEC_REGISTRY: dict[str, ValueCodec] = {
    codec.name: codec for codec in (Fp32Values(), Fp16Values(), Int8Values())
}


def index_codec_named(name: str) -> IndexCodec:
    """The index codec registered under `name`."""
    if name not in INDEX_CODEC_REGISTRY:
        raise WireError(f"unknown index codec {name!r}; expected one of {tuple(INDEX_CODEC_REGISTRY)} or 'auto'")
    return INDEX_CODEC_REGISTRY[name]


def value_codec_named(name: str) -> ValueCodec:
    """The value codec registered under `name`."""
    if name not in VALUE_CODEC_REGISTRY:
        raise WireError(f"unknown value codec {name!r}; expected one of {tuple(VALUE_CODEC_REGISTRY)}")
    return VALUE_CODEC_REGISTRY[name]


def choose_index_codec(name: str, positions: np.ndarray, n: int) -> str:
    """`name` if it can represent the positions; for 'auto' the smallest section (ties: registry order)."""
    if name != "auto":
        if index_codec_named(name).section_bytes(positions, n) is None:
            raise WireError(f"index codec {name!r} cannot represent k={positions.size} of n={n} positions")
        return name
    usable = []
    for order, (codec_name, codec) in enumerate(INDEX_CODEC_REGISTRY.items()):
        size = codec.section_bytes(positions, n)
        if size is not None:
            usable.append((size, order, codec_name))
    return min(usable)[2]


def tensor_of(positions: np.ndarray, tensor_sizes: list[int]) -> np.ndarray:
    """Index of the partial tensor each flat position falls in (tensors concatenated in order)."""
    return np.searchsorted(np.cumsum(tensor_sizes, dtype=np.int64), positions, side="right")
