"""Tests of the update wire format: round trips, codec choice, corruption, apply checks, chunking."""

from __future__ import annotations

import hashlib
import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from testbed.core import wire
from testbed.core.wire import (
    HEADER,
    HEADER_BYTES,
    INDEX_CODECS,
    VALUE_CODECS,
    WireError,
    apply_update,
    count_partial,
    decode_update,
    encode_full_model,
    encode_sparse_snapshot,
    encode_update,
    flatten_partial,
    held_weights_after,
    join_chunks,
    model_fingerprint,
    partial_tensor_names,
    split_chunks,
    update_sizes,
    weights_hash,
)

Weights = dict[str, np.ndarray]

# Byte range of target_version in the header: the one field no hash or cross-check covers
# (the device must compare it with the version it asked for / the manifest announced).
TARGET_VERSION_FIELD = range(struct.calcsize("<4sBBBB16sI"), struct.calcsize("<4sBBBB16sII"))
INDEX_CODEC_BYTE = 5
VALUE_CODEC_BYTE = 6
FLAGS_BYTE = 7


def identical(a: Weights, b: Weights) -> bool:
    """Same names in the same order, same shapes, same float32 bit patterns (NaN-safe)."""
    return list(a) == list(b) and all(
        a[name].shape == b[name].shape and a[name].dtype == np.float32 and b[name].dtype == np.float32
        and np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32))
        for name in a
    )


def snapshot(weights: Weights) -> Weights:
    return {name: array.copy() for name, array in weights.items()}


def mlp(seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.standard_normal((8, 5)).astype(np.float32),
        "fc1.bias": rng.standard_normal(8).astype(np.float32),
        "fc2.weight": rng.standard_normal((3, 8)).astype(np.float32),
        "fc2.bias": rng.standard_normal(3).astype(np.float32),
    }


def with_changes(base: Weights, positions: list[int], change_dense: bool = True) -> Weights:
    """Copy of base with the given flat partial positions changed (+1) and, optionally, the biases."""
    target = snapshot(base)
    flat = flatten_partial(base)
    flat[positions] += 1.0
    offset = 0
    for name in partial_tensor_names(base):
        size = base[name].size
        target[name] = flat[offset:offset + size].reshape(base[name].shape)
        offset += size
    if change_dense:
        for name in base:
            if base[name].ndim <= 1:
                target[name] = target[name] + np.float32(0.5)
    return target


def round_trip(base: Weights, target: Weights, codec: str = "auto", versions: tuple[int, int] = (3, 4)) -> Weights:
    data = encode_update(base, target, *versions, index_codec=codec)
    update = decode_update(data)
    before = snapshot(base)
    result = apply_update(base, versions[0], update)
    assert identical(base, before), "apply_update mutated its base"
    assert identical(result, target)
    assert weights_hash(result) == weights_hash(target) == update.header.post_apply_hash
    return result


# --- hand-made examples ----------------------------------------------------------------------


def test_weights_helpers() -> None:
    weights = mlp()
    assert partial_tensor_names(weights) == ["fc1.weight", "fc2.weight"]
    assert count_partial(weights) == 40 + 24
    flat = flatten_partial(weights)
    assert flat.dtype == np.float32 and flat.shape == (64,)
    assert np.array_equal(flat[:40], weights["fc1.weight"].ravel())
    assert len(model_fingerprint(weights)) == 16 and len(weights_hash(weights)) == 32
    assert model_fingerprint(weights) == model_fingerprint(mlp(seed=1))
    assert weights_hash(weights) != weights_hash(mlp(seed=1))
    reshaped = {**weights, "fc2.weight": weights["fc2.weight"].reshape(8, 3)}
    assert model_fingerprint(reshaped) != model_fingerprint(weights)
    reordered = dict(reversed(list(weights.items())))
    assert model_fingerprint(reordered) != model_fingerprint(weights)
    with pytest.raises(WireError, match="float32"):
        model_fingerprint({"w": np.zeros((2, 2), dtype=np.float64)})


def test_header_layout_is_fixed() -> None:
    assert HEADER.format == "<4sBBBB16sIIQQIII32s32s"
    assert HEADER_BYTES == 124
    data = encode_update(mlp(), with_changes(mlp(), [1]), 0, 1)
    assert data[:4] == b"EDTB" and data[4] == wire.FORMAT_VERSION


def test_round_trip_sparse_raw() -> None:
    base = mlp()
    target = with_changes(base, [0, 63])
    data = encode_update(base, target, 3, 4, index_codec="raw")
    update = decode_update(data)
    assert update.header.index_codec == "raw"
    assert update.header.k == 2 and update.header.n == 64
    assert update.positions.tolist() == [0, 63] and update.positions.dtype == np.int64
    assert np.array_equal(update.values, flatten_partial(target)[[0, 63]])
    assert update.dense.size == 11
    round_trip(base, target, "raw")
    auto = decode_update(encode_update(base, target, 3, 4)).header
    assert (auto.index_codec, auto.index_bytes) == ("golomb-rice", 3)  # b=5: 1 byte b + 13 bits
    round_trip(base, target)


def test_only_dense_changed_gives_k_zero() -> None:
    base = mlp()
    target = with_changes(base, [])
    data = encode_update(base, target, 0, 1)
    header = decode_update(data).header
    assert header.k == 0 and header.index_codec == "raw" and header.index_bytes == 0
    assert len(data) == HEADER_BYTES + 11 * 4
    round_trip(base, target, versions=(0, 1))


def test_every_position_changed_uses_dense_codec() -> None:
    base = mlp()
    target = with_changes(base, list(range(64)))
    data = encode_update(base, target, 1, 2)
    header = decode_update(data).header
    assert header.index_codec == "dense" and header.k == header.n == 64 and header.index_bytes == 0
    round_trip(base, target, versions=(1, 2))


def test_one_position() -> None:
    base = mlp()
    target = with_changes(base, [42], change_dense=False)
    sizes = update_sizes(encode_update(base, target, 1, 2))
    assert (sizes.index_bytes, sizes.value_bytes, sizes.dense_bytes) == (2, 4, 44)  # golomb-rice
    sizes = update_sizes(encode_update(base, target, 1, 2, index_codec="raw"))
    assert (sizes.index_bytes, sizes.value_bytes, sizes.dense_bytes) == (4, 4, 44)
    round_trip(base, target, versions=(1, 2))


def test_codec_choice_and_sizes() -> None:
    base = mlp()
    n = 64  # bitmap = 8 bytes, raw = 4k bytes, golomb-rice = 1 + ceil(Rice bits / 8) bytes
    dense_ish = with_changes(base, list(range(0, 64, 2)))
    sizes = update_sizes(encode_update(base, dense_ish, 1, 2))
    data = encode_update(base, dense_ish, 1, 2)
    assert decode_update(data).header.index_codec == "bitmap"
    assert sizes == wire.UpdateSizes(
        header_bytes=HEADER_BYTES, index_bytes=n // 8, value_bytes=32 * 4, dense_bytes=44,
        total_bytes=HEADER_BYTES + 8 + 128 + 44, index_bits=64, value_bits=32 * 32,
    )
    golomb = update_sizes(encode_update(base, dense_ish, 1, 2, index_codec="golomb-rice"))
    assert golomb.index_bytes == 9 > sizes.index_bytes  # 63 or 64 bits of codes + the parameter byte
    raw = update_sizes(encode_update(base, dense_ish, 1, 2, index_codec="raw"))
    assert raw.index_bytes == 32 * 4 > sizes.index_bytes
    sparse = with_changes(base, [5])
    assert decode_update(encode_update(base, sparse, 1, 2)).header.index_codec == "golomb-rice"
    assert update_sizes(encode_update(base, sparse, 1, 2)).index_bits == 16
    assert update_sizes(encode_update(base, sparse, 1, 2, index_codec="raw")).index_bits == 32
    assert update_sizes(encode_update(base, sparse, 1, 2, index_codec="bitmap")).index_bits == 64


def test_bitwise_change_detection() -> None:
    base = {"w": np.array([[0.0, np.nan, 1.0, np.inf]], dtype=np.float32), "b": np.zeros(1, np.float32)}
    target = snapshot(base)
    target["w"][0, 0] = -0.0  # bitwise different from 0.0, must be sent
    data = encode_update(base, target, 0, 1)
    update = decode_update(data)
    assert update.positions.tolist() == [0]  # the unchanged NaN is not a change
    round_trip(base, target, versions=(0, 1))


def test_full_snapshot_applies_to_any_base() -> None:
    target = mlp(seed=7)
    data = encode_full_model(target, 9)
    update = decode_update(data)
    assert update.header.is_full_snapshot and update.header.base_version == 0xFFFFFFFF
    assert update.header.index_codec == "dense" and update.header.k == 64
    for base_version, base in [(0, mlp(seed=1)), (123, mlp(seed=2))]:
        assert identical(apply_update(base, base_version, update), target)
    with pytest.raises(WireError, match="fingerprint"):
        apply_update({"other": np.zeros((2, 2), np.float32)}, 0, update)


def test_codec_names_and_wire_ids_are_stable() -> None:
    assert INDEX_CODECS == ("dense", "raw", "bitmap", "golomb-rice")
    assert VALUE_CODECS == ("fp32", "fp16", "int8")
    base = mlp()
    for value_codec in VALUE_CODECS:
        data = encode_update(base, with_changes(base, [1, 2]), 0, 1, index_codec="bitmap", value_codec=value_codec)
        assert (data[INDEX_CODEC_BYTE], data[VALUE_CODEC_BYTE]) == (2, VALUE_CODECS.index(value_codec))


def pruned(seed: int = 0, keep: float = 0.1) -> Weights:
    weights = mlp(seed)
    rng = np.random.default_rng(seed)
    for name in partial_tensor_names(weights):
        weights[name][rng.random(weights[name].shape) >= keep] = 0.0
    weights["fc1.weight"][0, 0] = -0.0  # bitwise non-zero: listed, so fp32 reproduces it exactly
    return weights


def test_sparse_snapshot_round_trip() -> None:
    target = pruned()
    nonzero = np.flatnonzero(flatten_partial(target).view(np.uint32))
    data = encode_sparse_snapshot(target, 7)
    update = decode_update(data)
    header = update.header
    assert header.is_sparse_snapshot and header.is_snapshot and not header.is_full_snapshot
    assert header.base_version == wire.FULL_SNAPSHOT_BASE and data[FLAGS_BYTE] == wire.FLAG_SPARSE_SNAPSHOT
    assert header.k == nonzero.size < header.n and update.positions.tolist() == nonzero.tolist()
    assert header.index_codec == "golomb-rice"
    for base_version, base in [(0, mlp(seed=1)), (99, mlp(seed=2)), (3, pruned(seed=4))]:
        before = snapshot(base)
        assert identical(apply_update(base, base_version, update), target)
        assert identical(base, before)
    assert identical(held_weights_after(mlp(seed=5), data), target)
    for codec in INDEX_CODECS[1:]:
        assert identical(held_weights_after(mlp(), encode_sparse_snapshot(target, 7, index_codec=codec)), target)
    with pytest.raises(WireError, match="fingerprint"):
        apply_update({"other": np.zeros((2, 2), np.float32)}, 0, update)


def test_sparse_snapshot_of_zeros_and_lossy_values() -> None:
    zeros = {name: np.zeros_like(array) for name, array in mlp().items()}
    update = decode_update(encode_sparse_snapshot(zeros, 1))
    assert update.header.k == 0 and identical(apply_update(mlp(), 0, update), zeros)
    target = pruned(seed=3)
    for value_codec in ("fp16", "int8"):
        data = encode_sparse_snapshot(target, 2, value_codec=value_codec)
        held = held_weights_after(mlp(seed=9), data)
        assert identical(held, held_weights_after(mlp(seed=8), data))  # independent of the base values
        assert weights_hash(held) == decode_update(data).header.post_apply_hash
        for name in partial_tensor_names(target):
            assert np.all(held[name][target[name] == 0] == 0)
            assert np.allclose(held[name], target[name], rtol=0, atol=np.abs(target[name]).max() / 200)


def test_lossy_values_hold_what_the_hash_says() -> None:
    base = mlp()
    target = with_changes(base, [0, 5, 17, 40, 41, 63])
    for value_codec in ("fp16", "int8"):
        for index_codec in INDEX_CODECS[1:]:
            data = encode_update(base, target, 3, 4, index_codec=index_codec, value_codec=value_codec)
            update = decode_update(data)
            held = apply_update(base, 3, update)
            assert identical(held, held_weights_after(base, data))
            assert weights_hash(held) == update.header.post_apply_hash
            assert np.allclose(flatten_partial(held), flatten_partial(target), atol=1 / 127, rtol=0)
            for name in base:  # dense tensors always travel as exact float32
                if base[name].ndim <= 1:
                    assert np.array_equal(held[name], target[name])
        update = decode_update(encode_update(base, target, 3, 4, value_codec=value_codec))
        expected_dtype = {"fp16": np.float16, "int8": np.int8}[value_codec]
        assert update.values.dtype == expected_dtype
        assert update.scales.size == (2 if value_codec == "int8" else 0)
    sizes = update_sizes(encode_update(base, target, 3, 4, value_codec="int8"))
    assert (sizes.value_bytes, sizes.value_bits) == (6 + 4 * 2, 8 * (6 + 8))
    assert update_sizes(encode_update(base, target, 3, 4, value_codec="fp16")).value_bytes == 12


def test_full_snapshot_with_lossy_values() -> None:
    target = mlp(seed=4)
    for value_codec in ("fp16", "int8"):
        data = encode_full_model(target, 5, value_codec=value_codec)
        update = decode_update(data)
        assert update.header.is_full_snapshot and update.header.value_codec == value_codec
        held = apply_update(mlp(seed=1), 0, update)
        assert identical(held, held_weights_after(mlp(seed=2), data))
        assert np.allclose(flatten_partial(held), flatten_partial(target), atol=0.02, rtol=0)
    fp16 = apply_update(mlp(), 0, decode_update(encode_full_model(target, 5, value_codec="fp16")))
    assert np.array_equal(flatten_partial(fp16), flatten_partial(target).astype(np.float16).astype(np.float32))


def test_encode_rejects_bad_arguments() -> None:
    base = mlp()
    target = with_changes(base, [1])
    for base_version, target_version in [(-1, 1), (2, 2), (3, 2), (0, 0xFFFFFFFF), (0, 2**40)]:
        with pytest.raises(WireError):
            encode_update(base, target, base_version, target_version)
    with pytest.raises(WireError, match="int"):
        encode_update(base, target, 0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(WireError, match="architecture"):
        encode_update(base, {**target, "extra": np.zeros(1, np.float32)}, 0, 1)
    with pytest.raises(WireError, match="cannot represent"):
        encode_update(base, target, 0, 1, index_codec="dense")
    with pytest.raises(WireError, match="unknown index codec"):
        encode_update(base, target, 0, 1, index_codec="golomb")
    with pytest.raises(WireError, match="unknown value codec"):
        encode_update(base, target, 0, 1, value_codec="bf16")
    with pytest.raises(WireError, match="unknown value codec"):
        encode_sparse_snapshot(base, 1, value_codec="int4")
    with pytest.raises(WireError):
        encode_sparse_snapshot(base, 0xFFFFFFFF)
    with pytest.raises(WireError):
        encode_full_model(base, -1)


def test_apply_rejects_mismatches_and_keeps_base() -> None:
    base = mlp()
    target = with_changes(base, [3, 9])
    update = decode_update(encode_update(base, target, 5, 6))
    cases = [
        (base, 4, "version"),
        ({**base, "fc2.weight": base["fc2.weight"].reshape(8, 3)}, 5, "fingerprint"),
        (mlp(seed=3), 5, "post-apply hash"),
    ]
    for wrong_base, version, message in cases:
        before = snapshot(wrong_base)
        with pytest.raises(WireError, match=message):
            apply_update(wrong_base, version, update)
        assert identical(wrong_base, before)


def test_decode_rejects_specific_malformations() -> None:
    base = mlp()
    data = bytearray(encode_update(base, with_changes(base, [1, 2]), 0, 1))
    with pytest.raises(WireError, match="magic"):
        decode_update(b"XXXX" + bytes(data[4:]))
    with pytest.raises(WireError, match="shorter"):
        decode_update(bytes(data[:10]))
    with pytest.raises(WireError, match="padded"):
        decode_update(bytes(data) + b"\0")
    with pytest.raises(WireError, match="payload hash"):
        decode_update(bytes(data[:-1]) + bytes([data[-1] ^ 1]))
    with pytest.raises(WireError, match="bytes"):
        decode_update("not bytes")  # type: ignore[arg-type]


def _reseal(fields: dict[str, object], body: bytes) -> bytes:
    """Re-encode a header with valid payload hash around a hand-made body (for semantic checks)."""
    values = dict(fields, payload_hash=hashlib.sha256(body).digest())
    order = ["magic", "version", "index_id", "value_id", "flags", "fingerprint", "base", "target",
             "n", "k", "index_bytes", "value_bytes", "dense_bytes", "payload_hash", "post"]
    return HEADER.pack(*(values[key] for key in order)) + body


def test_decode_checks_flags_and_value_sections_even_with_a_valid_hash() -> None:
    common = dict(magic=b"EDTB", version=1, index_id=0, fingerprint=bytes(16), target=1,
                  n=2, k=2, index_bytes=0, dense_bytes=0, post=bytes(32))
    sentinel = wire.FULL_SNAPSHOT_BASE
    cases = [
        (dict(value_id=0, flags=3, base=sentinel, value_bytes=8), np.zeros(2, "<f4").tobytes(), "both"),
        (dict(value_id=0, flags=2, base=0, value_bytes=8), np.zeros(2, "<f4").tobytes(), "sentinel"),
        (dict(value_id=0, flags=4, base=0, value_bytes=8), np.zeros(2, "<f4").tobytes(), "flags"),
        (dict(value_id=1, flags=0, base=0, value_bytes=8), bytes(8), "fp16 needs"),
        (dict(value_id=2, flags=0, base=0, value_bytes=5), bytes(5), "int8 needs"),
        (dict(value_id=2, flags=0, base=0, value_bytes=6), np.array([np.inf], "<f4").tobytes() + bytes(2), "finite"),
        (dict(value_id=2, flags=0, base=0, value_bytes=6), np.array([-1], "<f4").tobytes() + bytes(2), "negative"),
        (dict(value_id=2, flags=0, base=0, value_bytes=6), bytes(4) + b"\x00\x80", "-128"),
        (dict(value_id=3, flags=0, base=0, value_bytes=8), bytes(8), "value codec id"),
        (dict(value_id=0, flags=0, base=0, value_bytes=8, index_id=3, index_bytes=3), bytes(11), "golomb-rice needs"),
        (dict(value_id=0, flags=1, base=sentinel, value_bytes=8, index_id=3, index_bytes=2), bytes(10), "dense"),
    ]
    for fields, body, message in cases:
        with pytest.raises(WireError, match=message):
            decode_update(_reseal(dict(common, **fields), body))


def test_decode_checks_positions_even_with_a_valid_hash() -> None:
    common = dict(magic=b"EDTB", version=1, value_id=0, flags=0, fingerprint=bytes(16), base=0, target=1,
                  n=10, k=2, value_bytes=8, dense_bytes=0, post=bytes(32))
    values = np.zeros(2, "<f4").tobytes()
    for positions, message in [([3, 3], "strictly increasing"), ([5, 2], "strictly increasing"),
                               ([2, 10], "out of range")]:
        body = np.array(positions, "<u4").tobytes() + values
        with pytest.raises(WireError, match=message):
            decode_update(_reseal(dict(common, index_id=1, index_bytes=8), body))
    for bitmap, message in [(b"\x07\x00", "k=2"), (b"\x03\x04", "padding")]:
        with pytest.raises(WireError, match=message):
            decode_update(_reseal(dict(common, index_id=2, index_bytes=2), bitmap + values))


# --- properties ------------------------------------------------------------------------------


@st.composite
def update_cases(draw: st.DrawFn) -> tuple[Weights, Weights]:
    """A random small model and a target differing bitwise at a random subset of positions (any k)."""
    shapes = draw(st.lists(
        st.one_of(
            st.tuples(st.integers(1, 5), st.integers(1, 5)),
            st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 2)),
            st.tuples(st.integers(0, 6)),
            st.just(()),
        ),
        min_size=0, max_size=5,
    ))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = {}
    for index, shape in enumerate(shapes):
        array = rng.standard_normal(shape).astype(np.float32)
        array[rng.random(shape) < 0.2] = 0.0
        array[rng.random(shape) < 0.1] = np.nan
        base[f"t{index}"] = array
    n = count_partial(base)
    mode = draw(st.sampled_from(["none", "all", "random"]))
    mask = {"none": np.zeros(n, bool), "all": np.ones(n, bool), "random": rng.random(n) < rng.random()}[mode]
    target = {}
    offset = 0
    for name, array in base.items():
        bits = array.view(np.uint32).copy()
        if array.ndim > 1:
            flips = rng.integers(1, 2**32, size=array.shape, dtype=np.uint64).astype(np.uint32)
            bits[mask[offset:offset + array.size].reshape(array.shape)] ^= flips[
                mask[offset:offset + array.size].reshape(array.shape)]
            offset += array.size
        elif draw(st.booleans()):
            bits ^= rng.integers(0, 2**32, size=array.shape, dtype=np.uint64).astype(np.uint32)
        target[name] = bits.view(np.float32)
    return base, target


def _forced_codecs(base: Weights, target: Weights) -> list[str]:
    k = int(np.count_nonzero(flatten_partial(base).view(np.uint32) != flatten_partial(target).view(np.uint32)))
    return ["auto", "raw", "bitmap", "golomb-rice"] + (["dense"] if k == count_partial(base) else [])


@settings(max_examples=150, deadline=None)
@given(update_cases(), st.integers(0, 2**31), st.integers(1, 2**31 - 2))  # target <= 2**32 - 2
def test_round_trip_property(case: tuple[Weights, Weights], base_version: int, step: int) -> None:
    base, target = case
    for codec in _forced_codecs(base, target):
        data = encode_update(base, target, base_version, base_version + step, index_codec=codec)
        update = decode_update(data)
        assert codec == "auto" or update.header.index_codec == codec
        assert update.header.k == update.positions.size == update.values.size
        assert update_sizes(data).total_bytes == len(data)
        round_trip(base, target, codec, (base_version, base_version + step))
    auto = update_sizes(encode_update(base, target, 0, 1))
    assert auto.index_bytes == min(update_sizes(encode_update(base, target, 0, 1, c)).index_bytes
                                   for c in _forced_codecs(base, target)[1:])


def encode_kind(
    kind: str, base: Weights, target: Weights, index_codec: str = "auto", value_codec: str = "fp32"
) -> bytes:
    """An update from base to target (versions 1 -> 2), or a full or sparse snapshot of target."""
    if kind == "full":
        return encode_full_model(target, 2, value_codec=value_codec)
    if kind == "sparse":
        return encode_sparse_snapshot(target, 2, index_codec=index_codec, value_codec=value_codec)
    return encode_update(base, target, 1, 2, index_codec=index_codec, value_codec=value_codec)


@settings(max_examples=150, deadline=None)
@given(update_cases(), st.sampled_from(VALUE_CODECS), st.sampled_from(["update", "full", "sparse"]))
def test_every_value_codec_applies_to_what_the_hash_says(
    case: tuple[Weights, Weights], value_codec: str, kind: str
) -> None:
    """apply_update == held_weights_after, its hash is the header's, fp32 is exact to the bit."""
    base, target = case
    data = encode_kind(kind, base, target, "auto", value_codec)
    update = decode_update(data)
    before = snapshot(base)
    held = apply_update(base, 1, update)
    assert identical(base, before)
    assert identical(held, held_weights_after(base, data))
    assert weights_hash(held) == update.header.post_apply_hash
    assert update_sizes(data).value_bits == 8 * update.header.value_bytes
    expected = target
    if kind == "sparse":  # only listed entries survive; the rest of a sparse snapshot is +0.0
        expected = {name: np.where(array.view(np.uint32) != 0, array, np.float32(0)) if array.ndim > 1 else array
                    for name, array in target.items()}
    if value_codec == "fp32":
        assert identical(held, expected)
    for name, array in target.items():
        if array.ndim <= 1:
            assert np.array_equal(held[name].view(np.uint32), array.view(np.uint32))


KINDS = st.sampled_from(["update", "full", "sparse"])


@settings(max_examples=100, deadline=None)
@given(update_cases(), st.data())
def test_any_truncation_or_extension_raises(case: tuple[Weights, Weights], data: st.DataObject) -> None:
    base, target = case
    encoded = encode_kind(data.draw(KINDS), base, target, data.draw(st.sampled_from(["auto", "bitmap", "golomb-rice"])),
                          data.draw(st.sampled_from(VALUE_CODECS)))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(WireError):
        decode_update(encoded[:cut])
    with pytest.raises(WireError):
        update_sizes(encoded[:cut])
    with pytest.raises(WireError):
        decode_update(encoded + data.draw(st.binary(min_size=1, max_size=8)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update_cases(), st.data())
def test_any_single_byte_mutation_is_caught(case: tuple[Weights, Weights], data: st.DataObject) -> None:
    """decode + apply raises WireError, except where the design cannot see the change.

    The payload hash covers the body; header fields are cross-checked at decode and the fingerprint,
    base version, n, scale count and post-apply hash at apply. Not covered: target_version (the
    device checks it against the manifest); a codec id byte when the other codec reads the same
    section as the same thing (index codec when n = 0 or k = 0: no positions; value codec when k = 0);
    the snapshot flags when n = 0 (no partial weights: a full and a sparse snapshot set the same).
    In those cases the applied weights must still be exactly what the original update gives.
    """
    base, target = case
    kind = data.draw(KINDS)
    encoded = encode_kind(kind, base, target, data.draw(st.sampled_from(["auto", "raw", "bitmap", "golomb-rice"])),
                          data.draw(st.sampled_from(VALUE_CODECS)))
    offset = data.draw(st.integers(0, len(encoded) - 1))
    mask = data.draw(st.integers(1, 255))
    mutated = bytearray(encoded)
    mutated[offset] ^= mask
    try:
        result = apply_update(base, 1, decode_update(bytes(mutated)))
    except WireError:
        return
    header = decode_update(encoded).header
    assert (offset in TARGET_VERSION_FIELD or (offset == INDEX_CODEC_BYTE and 0 in (header.n, header.k))
            or (offset == VALUE_CODEC_BYTE and header.k == 0) or (offset == FLAGS_BYTE and header.n == 0))
    assert identical(result, held_weights_after(base, encoded))


@pytest.mark.parametrize(("kind", "index_codec", "value_codec"), [
    ("update", "raw", "fp32"), ("update", "bitmap", "fp16"), ("update", "golomb-rice", "int8"),
    ("update", "golomb-rice", "fp32"), ("full", "dense", "fp32"), ("full", "dense", "int8"),
    ("sparse", "golomb-rice", "fp16"), ("sparse", "raw", "int8"),
])
def test_every_byte_and_bit_mutation_of_one_update(kind: str, index_codec: str, value_codec: str) -> None:
    base = mlp()
    target = with_changes(base, [0, 9, 40, 63])
    if kind == "sparse":
        target = pruned(seed=2, keep=0.3)
    encoded = encode_kind(kind, base, target, index_codec, value_codec)
    assert decode_update(encoded).header.index_codec == index_codec
    for offset in range(len(encoded)):
        for mask in [0x01, 0x02, 0x10, 0x80, 0xFF]:
            mutated = bytearray(encoded)
            mutated[offset] ^= mask
            if offset in TARGET_VERSION_FIELD:
                continue
            with pytest.raises(WireError):
                apply_update(base, 1, decode_update(bytes(mutated)))


def test_target_version_is_the_only_unauthenticated_field() -> None:
    base = mlp()
    target = with_changes(base, [4])
    mutated = bytearray(encode_update(base, target, 1, 2))
    mutated[TARGET_VERSION_FIELD.start] ^= 0x10
    update = decode_update(bytes(mutated))
    assert update.header.target_version == 2 ^ 0x10
    assert identical(apply_update(base, 1, update), target)


# --- chunks ----------------------------------------------------------------------------------


@given(st.binary(max_size=2000), st.integers(1, 300), st.randoms())
def test_chunks_round_trip(data: bytes, chunk_size: int, rng: random.Random) -> None:
    chunks = split_chunks(data, chunk_size)
    assert len(chunks) == max(1, -(-len(data) // chunk_size))
    assert all(len(chunk) == chunk_size for chunk in chunks[:-1]) and len(chunks[-1]) <= chunk_size
    received = dict(enumerate(chunks))
    shuffled = list(received.items())
    rng.shuffle(shuffled)
    assert join_chunks(dict(shuffled), len(chunks), len(data)) == data


def test_chunk_errors() -> None:
    assert split_chunks(b"", 10) == [b""]
    assert join_chunks({0: b""}, 1, 0) == b""
    for bad in [0, -1, 1.5, True]:
        with pytest.raises(WireError, match="chunk_size"):
            split_chunks(b"abc", bad)  # type: ignore[arg-type]
    chunks = dict(enumerate(split_chunks(b"abcdefg", 3)))
    with pytest.raises(WireError, match="missing"):
        join_chunks({0: chunks[0], 2: chunks[2]}, 3, 7)
    with pytest.raises(WireError, match="unexpected"):
        join_chunks({**chunks, 3: b"x"}, 3, 7)
    with pytest.raises(WireError, match="expected 8"):
        join_chunks(chunks, 3, 8)
    with pytest.raises(WireError, match="chunk_count"):
        join_chunks({}, 0, 0)


@given(st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4), st.integers(0, 20))
def test_full_model_bytes_is_the_encoded_length(shapes: list[tuple[int, int]], biases: int) -> None:
    from testbed.core.wire import full_model_bytes

    weights = {f"layer{i}.weight": np.ones(shape, dtype=np.float32) for i, shape in enumerate(shapes)}
    weights["out.bias"] = np.zeros(biases, dtype=np.float32)
    assert full_model_bytes(weights) == len(encode_full_model(weights, 1))
