"""Tests of the index and value codecs: round trips, exact size claims, the log2 C(n, k) floor, error bounds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.core.codecs import (
    index_codecs,
    value_codecs,

    StoredValues,
    WireError,
    index_floor_bits,
)
from testbed.core.codecs.index import GolombRiceIndex
from testbed.core.wire import INDEX_CODECS, VALUE_CODECS

GOLOMB = GolombRiceIndex()


@st.composite
def position_sets(draw: st.DrawFn, max_n: int = 5000) -> tuple[np.ndarray, int]:
    """Sorted unique positions in [0, n) for any n >= 0 and any k in [0, n] (both ends included)."""
    n = draw(st.integers(0, max_n))
    mode = draw(st.sampled_from(["empty", "full", "random", "clustered"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if mode == "empty" or n == 0:
        mask = np.zeros(n, bool)
    elif mode == "full":
        mask = np.ones(n, bool)
    elif mode == "random":
        mask = rng.random(n) < draw(st.floats(0.0, 1.0))
    else:
        mask = np.zeros(n, bool)
        start = rng.integers(0, n)
        mask[start:start + rng.integers(1, n + 1)] = True
        mask[rng.integers(0, n, size=draw(st.integers(0, 5)))] = True
    return np.flatnonzero(mask).astype(np.int64), n


# --- index codecs ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(position_sets())
def test_every_index_codec_round_trips_and_keeps_its_size_claims(case: tuple[np.ndarray, int]) -> None:
    positions, n = case
    k = int(positions.size)
    for name in INDEX_CODECS:
        codec = index_codecs()[name]
        claimed = codec.section_bytes(positions, n)
        bounds = codec.section_bounds(n, k)
        assert (claimed is None) == (bounds is None)
        if claimed is None:
            assert name == "dense" and k != n
            continue
        section = codec.encode(positions, n)
        assert len(section) == claimed  # never larger (nor smaller) than it claims
        assert bounds[0] <= claimed <= bounds[1]
        decoded = codec.decode(section, n, k)
        assert decoded.dtype == np.int64 and decoded.tolist() == positions.tolist()


@settings(max_examples=200, deadline=None)
@given(position_sets())
def test_golomb_rice_picks_the_best_parameter(case: tuple[np.ndarray, int]) -> None:
    positions, n = case
    k = int(positions.size)
    section = GOLOMB.encode(positions, n)
    b = section[0]
    assert b == GOLOMB.parameter(positions, n) <= GOLOMB.max_parameter(n)
    if k == 0:
        assert section == b"\x00"
        return
    gaps = np.diff(positions, prepend=-1) - 1
    sizes = {c: k * (c + 1) + int(np.sum(gaps >> c)) for c in range(GOLOMB.max_parameter(n) + 1)}
    assert sizes[b] == min(sizes.values())
    assert len(section) == 1 + (sizes[b] + 7) // 8
    rule_of_thumb = min(max(0, round(math.log2(math.log(2) * n / k))), GOLOMB.max_parameter(n))
    assert sizes[b] <= sizes[rule_of_thumb]


def test_golomb_rice_layout_by_hand() -> None:
    # positions 3, 4, 12 of n=16 -> gaps 3, 0, 7; with b=1: q = 1, 0, 3 and r = 1, 0, 1.
    # unary stream "01" "1" "0001", remainders "1" "0" "1": 0110 0011 01(00 0000) -> 0x63 0x40.
    positions = np.array([3, 4, 12])
    assert GOLOMB.parameter(positions, 16) == 1  # b=1: 10 bits; b=0: 13 bits; b=2: 11 bits
    assert GOLOMB.encode(positions, 16) == bytes([1, 0b01100011, 0b01000000])
    assert GOLOMB.decode(bytes([1, 0b01100011, 0b01000000]), 16, 3).tolist() == [3, 4, 12]


def test_golomb_rice_rejects_malformed_sections() -> None:
    good = GOLOMB.encode(np.array([3, 4, 12]), 16)
    cases = [
        (b"", 16, 3, "empty"),
        (bytes([5]) + good[1:], 16, 3, "too large"),
        (good[:2], 16, 3, "truncated|unary"),
        (good + b"\x00", 16, 3, "trailing"),
        (good[:2] + bytes([good[2] | 0x01]), 16, 3, "padding"),
        (good, 12, 3, "beyond n|out of range"),
        (bytes([0, 0, 0]), 16, 3, "unary"),
        (b"\x01", 16, 0, "k=0"),
        (b"", 16, 0, "k=0"),
        (bytes([0, 0xC0]), 16, 1, "padding"),  # b=0, one code "1" (position 0), then a set padding bit
        (bytes([0, 0x01]), 6, 1, "beyond n|out of range"),  # gap 7 in n=6
    ]
    for section, n, k, message in cases:
        with pytest.raises(WireError, match=message):
            GOLOMB.decode(section, n, k)
    assert GOLOMB.decode(bytes([0, 0x80]), 16, 1).tolist() == [0]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 300), st.data())
def test_golomb_rice_decodes_any_bytes_safely(section: bytes, n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    try:
        positions = GOLOMB.decode(section, n, k)
    except WireError:
        return
    assert positions.size == k and (k == 0 or (positions[0] >= 0 and positions[-1] < n))
    assert np.all(np.diff(positions) > 0)
    lo, hi = GOLOMB.section_bounds(n, k)
    assert lo <= len(section) <= hi


def test_index_floor_bits() -> None:
    for n, k in [(1, 0), (1, 1), (10, 3), (64, 32), (1000, 5), (500, 499)]:
        assert index_floor_bits(n, k) == pytest.approx(math.log2(math.comb(n, k)), abs=1e-9)
    assert index_floor_bits(0, 0) == 0.0 and index_floor_bits(5, 5) == 0.0
    with pytest.raises(WireError):
        index_floor_bits(3, 4)


FLOOR_CASES = [(n, density) for n in (17_000, 100_000, 1_000_000) for density in (0.005, 0.01, 0.05)]


@pytest.mark.parametrize(("n", "density"), FLOOR_CASES)
def test_golomb_rice_is_within_five_percent_of_the_floor(n: int, density: float) -> None:
    rng = np.random.default_rng(n + int(density * 1000))
    k = round(density * n)
    positions = np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)
    section = GOLOMB.encode(positions, n)
    ratio = 8 * len(section) / index_floor_bits(n, k)
    print(f"golomb-rice n={n} k/n={density}: {8 * len(section)} bits, floor {index_floor_bits(n, k):.0f},"
          f" ratio {ratio:.4f}")
    assert ratio <= 1.05
    assert GOLOMB.decode(section, n, k).tolist() == positions.tolist()


# --- value codecs ----------------------------------------------------------------------------


@st.composite
def value_cases(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(target, base, tensor_of, tensor_count) at k selected positions, finite float32 values."""
    tensor_count = draw(st.integers(1, 5))
    k = draw(st.integers(0, 200))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    tensor_of = np.sort(rng.integers(0, tensor_count, size=k))
    magnitude = 10.0 ** draw(st.floats(-6, 4))
    base = (rng.standard_normal(k) * magnitude).astype(np.float32)
    delta = (rng.standard_normal(k) * magnitude * 10.0 ** draw(st.floats(-3, 1))).astype(np.float32)
    delta[rng.random(k) < 0.05] = 0.0
    target = (base + delta).astype(np.float32)
    return target, base, tensor_of, tensor_count


def _through_the_wire(
    name: str, target: np.ndarray, base: np.ndarray, tensor_of: np.ndarray, tensor_count: int
) -> tuple[StoredValues, np.ndarray]:
    """Stored values as the device unpacks them, and what it holds; checks the encoder agrees."""
    codec = value_codecs()[name]
    stored = codec.quantise(target, base, tensor_of, tensor_count)
    section = codec.pack(stored)
    k = target.size
    assert len(section) == codec.value_bytes * k + codec.tensor_bytes * tensor_count
    unpacked = codec.unpack(section, k, tensor_count if codec.tensor_bytes else 0)
    assert unpacked.values.tobytes() == stored.values.tobytes()
    assert unpacked.scales.tobytes() == stored.scales.tobytes()
    held = codec.held(base, unpacked, tensor_of)
    assert held.dtype == np.float32 and held.tobytes() == codec.held(base, stored, tensor_of).tobytes()
    return unpacked, held


@settings(max_examples=300, deadline=None)
@given(value_cases())
def test_fp32_is_exact_to_the_bit(case: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> None:
    target, base, tensor_of, tensor_count = case
    _, held = _through_the_wire("fp32", target, base, tensor_of, tensor_count)
    assert held.view(np.uint32).tolist() == target.view(np.uint32).tolist()


@settings(max_examples=300, deadline=None)
@given(value_cases())
def test_fp16_error_is_within_float16_precision_of_the_delta(
    case: tuple[np.ndarray, np.ndarray, np.ndarray, int]
) -> None:
    target, base, tensor_of, tensor_count = case
    stored, held = _through_the_wire("fp16", target, base, tensor_of, tensor_count)
    delta = (target - base).astype(np.float32).astype(np.float64)
    sent = stored.values.astype(np.float64)
    in_range = np.abs(delta) <= 65504
    tolerance = np.maximum(np.abs(delta) * 2.0**-11, 2.0**-25)
    assert np.all(np.abs(sent - delta)[in_range] <= tolerance[in_range])
    assert np.all(np.abs(sent[~in_range]) == 65504)
    assert held.tobytes() == (base + stored.values.astype(np.float32)).astype(np.float32).tobytes()


@settings(max_examples=300, deadline=None)
@given(value_cases())
def test_int8_error_is_at_most_half_a_step(case: tuple[np.ndarray, np.ndarray, np.ndarray, int]) -> None:
    target, base, tensor_of, tensor_count = case
    stored, held = _through_the_wire("int8", target, base, tensor_of, tensor_count)
    delta = (target - base).astype(np.float32)
    assert stored.values.dtype == np.int8 and stored.scales.shape == (tensor_count,)
    assert np.all(np.abs(stored.values.astype(int)) <= 127)
    for tensor in range(tensor_count):
        selected = tensor_of == tensor
        largest = float(np.abs(delta[selected]).max()) if selected.any() else 0.0
        assert stored.scales[tensor] == np.float32(np.float32(largest) / np.float32(127))
        if largest > 0 and stored.scales[tensor] > 0:
            assert np.abs(stored.values[selected]).max() == 127
    scale = stored.scales[tensor_of].astype(np.float64)
    step = (stored.values.astype(np.float32) * stored.scales[tensor_of]).astype(np.float32)
    error = np.abs(step.astype(np.float64) - delta.astype(np.float64))
    assert np.all(error <= scale / 2 + 1e-6 * scale * 127 + 1e-44)
    assert held.tobytes() == (base + step).astype(np.float32).tobytes()  # the specified order


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, -2.5, 1e-40, 3e38, -3e38, 1e5, np.inf, -np.inf, np.nan]),
                min_size=1, max_size=12), st.data())
def test_value_codecs_handle_special_floats(raw: list[float], data: st.DataObject) -> None:
    target = np.array(raw, dtype=np.float32)
    base = np.array(data.draw(st.permutations(raw)), dtype=np.float32)
    tensor_of = np.zeros(target.size, dtype=np.int64)
    for name in VALUE_CODECS:
        with np.errstate(all="raise"):  # no floating-point warnings escape the codecs
            stored, held = _through_the_wire(name, target, base, tensor_of, 1)
        if name == "int8":
            assert np.all(np.isfinite(stored.scales)) and np.all(stored.scales >= 0)
        if name == "fp16":
            with np.errstate(all="ignore"):
                finite = np.isfinite(target - base)
            assert np.all(np.isfinite(stored.values[finite]))  # finite deltas are clipped, not infinite
