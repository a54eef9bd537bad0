"""The value codecs: float32 targets (exact), float16 deltas, and int8 deltas with a scale per partial tensor."""

from __future__ import annotations

import numpy as np

from testbed.core.codecs import StoredValues, ValueCodec, WireError
from testbed.core.plugins import register_value_codec

_FLOAT16_MAX = 65504.0
_INT8_LEVELS = 127

def _deltas(target: np.ndarray, base: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):  # IEEE results (inf, NaN, subnormals) are the defined outcome
        return np.subtract(target, base, dtype=np.float32)


@register_value_codec("fp32", wire_id=0)
class Fp32Values(ValueCodec):
    """The new values themselves as little-endian float32: exact to the bit."""

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


@register_value_codec("fp16", wire_id=1)
class Fp16Values(ValueCodec):
    """float16(target - base) as little-endian float16; held = float32(base + float32(delta16)).

    The delta is computed in float32 and rounded to nearest float16; finite deltas beyond the float16
    range are clipped to +-65504 (not turned into infinities).
    """

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


@register_value_codec("int8", wire_id=2)
class Int8Values(ValueCodec):
    """Symmetric int8 deltas with one float32 scale per partial tensor.

    Section: the scales of all partial tensors in model order (little-endian float32; 0 for a tensor
    without selected positions), then one int8 per selected position. Encoding, all in float32:
    delta = target - base; scale_t = max |finite delta| over tensor t's positions / 127;
    q = clip(rint(delta / scale_t), -127, 127) (0 where scale_t = 0 or delta is NaN, +-127 for
    infinities). The device holds float32(base + float32(float32(q) * scale_t)).
    """

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
