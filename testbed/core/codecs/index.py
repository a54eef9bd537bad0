"""The index codecs: dense (k == n), raw u32 positions, a bitmap, and Golomb-Rice coded gaps."""

from __future__ import annotations

import numpy as np

from testbed.core.codecs import IndexCodec, WireError
from testbed.core.plugins import register_index_codec

_U32_MAX = 0xFFFFFFFF
_GOLOMB_MAX_N = 2**62  # keeps every gap, remainder and running sum inside int64

@register_index_codec("dense", wire_id=0, selectable=False)
class DenseIndex(IndexCodec):
    """Every position, no section at all (k == n)."""

    def section_bytes(self, positions: np.ndarray, n: int) -> int | None:
        return 0 if positions.size == n else None

    def section_bounds(self, n: int, k: int) -> tuple[int, int] | None:
        return (0, 0) if k == n else None

    def encode(self, positions: np.ndarray, n: int) -> bytes:
        return b""

    def decode(self, section: bytes, n: int, k: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64)


@register_index_codec("raw", wire_id=1)
class RawIndex(IndexCodec):
    """Each position as a little-endian u32 (n <= 2**32)."""

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


@register_index_codec("bitmap", wire_id=2)
class BitmapIndex(IndexCodec):
    """One bit per position, LSB-first within each byte; padding bits after n must be zero."""

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


@register_index_codec("golomb-rice", wire_id=3)
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
