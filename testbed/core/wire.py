"""Wire format of sparse weight updates: encode, decode, verify, apply, and chunk them (pure, no I/O).

Index and value codecs live in `testbed.core.codecs`; this module owns the header, the section layout
(header, index section, value section, dense section) and what a device holds after applying.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from testbed.core.codecs import StoredValues, ValueCodec, index_codecs, value_codecs
from testbed.core.codecs import WireError as WireError  # re-exported: the one error of the wire format
from testbed.core.codecs import choose_index_codec, tensor_of, value_codec_named
from testbed.core.codecs import index_floor_bits as index_floor_bits  # re-exported for benchmarks
from testbed.core.weight_layout import (  # re-exported: the layout is part of the wire contract
    FINGERPRINT_BYTES as FINGERPRINT_BYTES,
    _checked,
    _dense_tensor_names,
    _flatten_dense,
    _le_bytes,
    _partial_sizes,
    count_partial as count_partial,
    flatten_partial as flatten_partial,
    model_fingerprint as model_fingerprint,
    partial_tensor_names as partial_tensor_names,
    weights_hash as weights_hash,
)

FORMAT_VERSION = 1
MAGIC = b"EDTB"
INDEX_CODECS = tuple(index_codecs())  # by wire id: dense, raw, bitmap, golomb-rice
VALUE_CODECS = tuple(value_codecs())  # by wire id: fp32, fp16, int8
FULL_SNAPSHOT_BASE = 0xFFFFFFFF  # base_version of a snapshot: applies to any base
FLAG_FULL_SNAPSHOT = 0x01  # every partial weight, dense index, values relative to zeros
FLAG_SPARSE_SNAPSHOT = 0x02  # listed positions relative to an all-zeros partial base; the rest become 0
_KNOWN_FLAGS = FLAG_FULL_SNAPSHOT | FLAG_SPARSE_SNAPSHOT
_U32_MAX = 0xFFFFFFFF

# The one definition of the header layout (little-endian, no padding):
# magic, format_version, index codec id, value codec id, flags, fingerprint, base_version,
# target_version, n, k, index_bytes, value_bytes, dense_bytes, payload_hash, post_apply_hash.
HEADER = struct.Struct("<4sBBBB16sIIQQIII32s32s")
HEADER_BYTES = HEADER.size


@dataclass(frozen=True)
class UpdateHeader:
    """The decoded fixed-size header of an update."""

    format_version: int
    fingerprint: bytes
    base_version: int
    target_version: int
    n: int
    k: int
    index_codec: str
    value_codec: str
    index_bytes: int
    value_bytes: int
    dense_bytes: int
    payload_hash: bytes
    post_apply_hash: bytes
    flags: int = 0

    @property
    def is_full_snapshot(self) -> bool:
        """True when the update carries every partial weight (dense index) and needs no base version."""
        return bool(self.flags & FLAG_FULL_SNAPSHOT)

    @property
    def is_sparse_snapshot(self) -> bool:
        """True when unlisted partial weights become 0 and the update needs no base version."""
        return bool(self.flags & FLAG_SPARSE_SNAPSHOT)

    @property
    def is_snapshot(self) -> bool:
        """True when the update applies to any base of the same model (full or sparse snapshot)."""
        return self.base_version == FULL_SNAPSHOT_BASE


@dataclass(frozen=True)
class DecodedUpdate:
    """A verified update: sorted partial positions, their values as the value codec stores them (fp32:
    float32 new values; fp16: float16 deltas; int8: int8 deltas + one scale per partial tensor), dense tensors."""

    header: UpdateHeader
    positions: np.ndarray  # int64, strictly increasing, in [0, n)
    values: np.ndarray  # len k, dtype of the value codec
    dense: np.ndarray  # float32, all dense tensors concatenated in order
    scales: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


@dataclass(frozen=True)
class UpdateSizes:
    """Byte accounting of one encoded update."""

    header_bytes: int
    index_bytes: int
    value_bytes: int
    dense_bytes: int
    total_bytes: int
    index_bits: int
    value_bits: int


def _held_weights(
    template: Mapping[str, np.ndarray], base_partial: np.ndarray, positions: np.ndarray,
    values: ValueCodec, stored: StoredValues, dense: np.ndarray,
) -> dict[str, np.ndarray]:
    """The one definition of what a device holds: base partial weights with the codec's held values
    at the positions, and the dense tensors as sent (names and shapes from the template)."""
    flat = np.array(base_partial, dtype=np.float32, copy=True)  # always fresh: the base stays untouched
    flat[positions] = values.held(flat[positions], stored, tensor_of(positions, _partial_sizes(template)))
    partial_offset = dense_offset = 0
    result: dict[str, np.ndarray] = {}
    for name, array in _checked(template):
        if array.ndim > 1:
            chunk = flat[partial_offset:partial_offset + array.size]
            partial_offset += array.size
        else:
            chunk = dense[dense_offset:dense_offset + array.size]
            dense_offset += array.size
        result[name] = np.array(chunk, dtype=np.float32).reshape(array.shape)
    return result


def _check_version(label: str, value: object, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise WireError(f"{label} must be an int, got {value!r}")
    if not 0 <= int(value) < limit:
        raise WireError(f"{label} must be in [0, {limit}), got {value}")
    return int(value)


def _u32(label: str, value: int) -> int:
    if value > _U32_MAX:
        raise WireError(f"{label} of {value} bytes does not fit the u32 header field; split the model")
    return value


def _encode(
    template: Mapping[str, np.ndarray], base_partial: np.ndarray, target_partial: np.ndarray,
    positions: np.ndarray, base_version: int, target_version: int, flags: int,
    index_name: str, value_name: str,
) -> bytes:
    """Quantise, compute what the device will hold, hash that, and lay out header + sections."""
    values = value_codec_named(value_name)
    n = int(target_partial.size)
    index_name = choose_index_codec(index_name, positions, n)
    sizes = _partial_sizes(template)
    stored = values.quantise(
        target_partial[positions], base_partial[positions], tensor_of(positions, sizes), len(sizes)
    )
    dense = _flatten_dense(template)
    held = _held_weights(template, base_partial, positions, values, stored, dense)
    index = index_codecs()[index_name].encode(positions, n)
    value_section = values.pack(stored)
    body = index + value_section + _le_bytes(dense)
    header = HEADER.pack(
        MAGIC, FORMAT_VERSION, INDEX_CODECS.index(index_name), VALUE_CODECS.index(value_name), flags,
        model_fingerprint(template), base_version, target_version, n, int(positions.size),
        _u32("index section", len(index)),
        _u32("value section", len(value_section)),
        _u32("dense section", 4 * int(dense.size)),
        hashlib.sha256(body).digest(),
        weights_hash(held),
    )
    return header + body


def encode_update(
    base: Mapping[str, np.ndarray],
    target: Mapping[str, np.ndarray],
    base_version: int,
    target_version: int,
    index_codec: str = "auto",
    value_codec: str = "fp32",
) -> bytes:
    """Encode the partial positions where target differs bitwise from base, plus every dense tensor.

    `index_codec="auto"` picks the smallest index section of all codecs that can represent the set
    (ties: registry order). fp32 values make the device hold exactly `target`; fp16/int8 carry
    quantised deltas and the device holds `held_weights_after(base, payload)`, whose hash the header
    carries.
    """
    base_version = _check_version("base_version", base_version, FULL_SNAPSHOT_BASE)
    target_version = _check_version("target_version", target_version, FULL_SNAPSHOT_BASE)
    if target_version <= base_version:
        raise WireError(f"target_version {target_version} must be greater than base_version {base_version}")
    fingerprint = model_fingerprint(target)
    if model_fingerprint(base) != fingerprint:
        raise WireError("base and target have different architectures (names, shapes or dtypes)")
    base_flat = flatten_partial(base)
    target_flat = flatten_partial(target)
    # Compare bit patterns, so -0.0 vs 0.0 is a change and an unchanged NaN is not.
    changed = base_flat.view(np.uint32) != target_flat.view(np.uint32)
    positions = np.flatnonzero(changed).astype(np.int64)
    return _encode(target, base_flat, target_flat, positions, base_version, target_version, 0,
                   index_codec, value_codec)


def encode_full_model(weights: Mapping[str, np.ndarray], target_version: int, value_codec: str = "fp32") -> bytes:
    """Encode a full snapshot (dense index, every weight) that applies to any base of the same model.

    fp16/int8 quantise the values themselves (deltas against an all-zeros base).
    """
    target_version = _check_version("target_version", target_version, FULL_SNAPSHOT_BASE)
    flat = flatten_partial(weights)
    return _encode(weights, np.zeros_like(flat), flat, np.arange(flat.size, dtype=np.int64),
                   FULL_SNAPSHOT_BASE, target_version, FLAG_FULL_SNAPSHOT, "dense", value_codec)


def full_model_bytes(weights: Mapping[str, np.ndarray]) -> int:
    """len(encode_full_model(weights, v)) with fp32 values, without encoding: the full-updating reference."""
    return HEADER_BYTES + 4 * sum(int(np.asarray(tensor).size) for _, tensor in _checked(weights))


def encode_sparse_snapshot(
    weights: Mapping[str, np.ndarray], target_version: int, index_codec: str = "auto", value_codec: str = "fp32",
) -> bytes:
    """Encode the non-zero partial entries (bitwise: -0.0 is listed) against an all-zeros partial base.

    Applies to any base of the same model; partial entries not listed become +0.0; dense tensors are
    sent whole. Meant for mostly-zero (pruned) models.
    """
    target_version = _check_version("target_version", target_version, FULL_SNAPSHOT_BASE)
    flat = flatten_partial(weights)
    positions = np.flatnonzero(flat.view(np.uint32) != 0).astype(np.int64)
    return _encode(weights, np.zeros_like(flat), flat, positions, FULL_SNAPSHOT_BASE, target_version,
                   FLAG_SPARSE_SNAPSHOT, index_codec, value_codec)


def _parse_header(data: bytes) -> UpdateHeader:
    """Unpack and cross-check the header fields and the total length (not the payload hash)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"an update must be bytes, got {type(data).__name__}")
    if len(data) < HEADER_BYTES:
        raise WireError(f"update is {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    (magic, version, index_id, value_id, flags, fingerprint, base_version, target_version,
     n, k, index_bytes, value_bytes, dense_bytes, payload_hash, post_apply_hash) = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}; this is not an edge-testbed update")
    if version != FORMAT_VERSION:
        raise WireError(f"format version {version} is not supported (this side speaks {FORMAT_VERSION})")
    if index_id >= len(INDEX_CODECS):
        raise WireError(f"unknown index codec id {index_id}")
    if value_id >= len(VALUE_CODECS):
        raise WireError(f"unknown value codec id {value_id}")
    if flags & ~_KNOWN_FLAGS:
        raise WireError(f"unknown header flags 0x{flags:02x}")
    if flags == FLAG_FULL_SNAPSHOT | FLAG_SPARSE_SNAPSHOT:
        raise WireError("an update cannot be both a full and a sparse snapshot")
    index_codec = INDEX_CODECS[index_id]
    if bool(flags) != (base_version == FULL_SNAPSHOT_BASE):
        raise WireError("the snapshot flags and the base_version sentinel disagree")
    if flags & FLAG_FULL_SNAPSHOT and index_codec != "dense":
        raise WireError("a full snapshot must use the dense index codec")
    if not flags and target_version <= base_version:
        raise WireError(f"target_version {target_version} is not after base_version {base_version}")
    if target_version == FULL_SNAPSHOT_BASE:
        raise WireError("target_version uses the reserved value 0xFFFFFFFF")
    if k > n:
        raise WireError(f"k={k} exceeds n={n}")
    bounds = index_codecs()[index_codec].section_bounds(n, k)
    if bounds is None:
        raise WireError(f"index codec {index_codec} cannot represent k={k} of n={n} positions")
    if not bounds[0] <= index_bytes <= bounds[1]:
        expected = bounds[0] if bounds[0] == bounds[1] else f"{bounds[0]}..{bounds[1]}"
        raise WireError(f"index section is {index_bytes} bytes; {index_codec} needs {expected} (k={k}, n={n})")
    values = value_codecs()[VALUE_CODECS[value_id]]
    if values.tensor_entries(k, value_bytes) is None:
        layout = f"{values.value_bytes}*k" + (f" + {values.tensor_bytes}*tensors" if values.tensor_bytes else "")
        raise WireError(f"value section is {value_bytes} bytes; {values.name} needs {layout} for k={k}")
    if dense_bytes % 4:
        raise WireError(f"dense section of {dense_bytes} bytes is not a whole number of float32")
    expected_total = HEADER_BYTES + index_bytes + value_bytes + dense_bytes
    if len(data) != expected_total:
        raise WireError(f"update is {len(data)} bytes, its header describes {expected_total} (truncated or padded)")
    return UpdateHeader(
        format_version=version, fingerprint=bytes(fingerprint), base_version=base_version,
        target_version=target_version, n=n, k=k, index_codec=index_codec, value_codec=values.name,
        index_bytes=index_bytes, value_bytes=value_bytes, dense_bytes=dense_bytes,
        payload_hash=bytes(payload_hash), post_apply_hash=bytes(post_apply_hash), flags=flags,
    )


def decode_header(data: bytes) -> UpdateHeader:
    """The header of an encoded update, checked against the update's length (the body is not hashed here)."""
    return _parse_header(data)


def decode_update(data: bytes) -> DecodedUpdate:
    """Parse and verify an update; any malformation raises WireError.

    The payload hash covers the body and the post-apply hash (checked by apply_update) the result;
    target_version is covered by neither, so a device compares it with the version it expects.
    """
    header = _parse_header(data)
    body = bytes(data[HEADER_BYTES:])
    if hashlib.sha256(body).digest() != header.payload_hash:
        raise WireError("payload hash mismatch: the update body is corrupted")
    index_end = header.index_bytes
    value_end = index_end + header.value_bytes
    positions = index_codecs()[header.index_codec].decode(body[:index_end], header.n, header.k)
    values = value_codecs()[header.value_codec]
    entries = values.tensor_entries(header.k, header.value_bytes) or 0
    stored = values.unpack(body[index_end:value_end], header.k, entries)
    dense = np.frombuffer(body[value_end:], dtype="<f4").astype(np.float32)
    return DecodedUpdate(header=header, positions=positions, values=stored.values, dense=dense, scales=stored.scales)


def update_sizes(data: bytes) -> UpdateSizes:
    """Byte accounting of an encoded update (header and lengths are checked, the hash is not)."""
    header = _parse_header(data)
    return UpdateSizes(
        header_bytes=HEADER_BYTES, index_bytes=header.index_bytes, value_bytes=header.value_bytes,
        dense_bytes=header.dense_bytes, total_bytes=len(data), index_bits=8 * header.index_bytes,
        value_bits=8 * header.value_bytes,
    )


def apply_update(
    base: Mapping[str, np.ndarray], base_version: int, update: DecodedUpdate
) -> dict[str, np.ndarray]:
    """Return the weights a device holds after the update, verified against the post-apply hash.

    The base is never mutated; a snapshot ignores the base's values (but not its architecture).
    """
    header = update.header
    if model_fingerprint(base) != header.fingerprint:
        raise WireError("update is for a different model (fingerprint mismatch)")
    if not header.is_snapshot and base_version != header.base_version:
        raise WireError(f"update applies to version {header.base_version}, but the device holds {base_version}")
    n = count_partial(base)
    if header.n != n:
        raise WireError(f"update addresses n={header.n} partial weights, the model has {n}")
    if update.positions.size != header.k or update.values.size != header.k:
        raise WireError(
            f"update carries {update.positions.size} positions and {update.values.size} values,"
            f" header says k={header.k}"
        )
    if header.k and (update.positions.min() < 0 or update.positions.max() >= n):
        raise WireError("update positions fall outside the model")
    values = value_codec_named(header.value_codec)
    tensor_count = len(partial_tensor_names(base)) if values.tensor_bytes else 0
    if update.scales.size != tensor_count:
        raise WireError(f"update carries {update.scales.size} scales, the model has {tensor_count} partial tensors")
    dense_count = sum(int(np.asarray(base[name]).size) for name in _dense_tensor_names(base))
    if update.dense.size != dense_count:
        raise WireError(f"update carries {update.dense.size} dense values, the model has {dense_count}")
    base_partial = np.zeros(n, dtype=np.float32) if header.is_snapshot else flatten_partial(base)
    stored = StoredValues(values=update.values, scales=update.scales)
    result = _held_weights(base, base_partial, update.positions, values, stored, update.dense)
    if weights_hash(result) != header.post_apply_hash:
        raise WireError("post-apply hash mismatch: the base weights differ from what the server assumed")
    return result


def held_weights_after(base: Mapping[str, np.ndarray], payload: bytes) -> dict[str, np.ndarray]:
    """What a device holding `base` (at the update's base version) ends with: decode + apply, WireError
    when a device would reject it. The server deploys exactly this, so lossy codecs never make it drift."""
    update = decode_update(payload)
    return apply_update(base, update.header.base_version, update)


def split_chunks(data: bytes, chunk_size: int) -> list[bytes]:
    """Cut data into chunks of chunk_size bytes (the last may be shorter); empty data is one empty chunk."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise WireError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    data = bytes(data)
    if not data:
        return [b""]
    return [data[start:start + chunk_size] for start in range(0, len(data), int(chunk_size))]


def join_chunks(chunks: Mapping[int, bytes], chunk_count: int, total_bytes: int) -> bytes:
    """Reassemble chunks 0..chunk_count-1; a missing or extra index or a wrong total is a WireError."""
    if isinstance(chunk_count, bool) or not isinstance(chunk_count, (int, np.integer)) or chunk_count < 1:
        raise WireError(f"chunk_count must be >= 1, got {chunk_count}")
    if len(chunks) < chunk_count:  # before building anything of size chunk_count (which may be huge)
        raise WireError(f"missing chunks: only {len(chunks)} of {chunk_count} are there")
    expected = set(range(chunk_count))
    missing = sorted(expected - set(chunks))
    if missing:
        raise WireError(f"missing chunks {missing[:10]} of {chunk_count}")
    extra = sorted(set(chunks) - expected, key=repr)
    if extra:
        raise WireError(f"unexpected chunk indexes {extra[:10]} (chunk_count is {chunk_count})")
    data = b"".join(bytes(chunks[index]) for index in range(chunk_count))
    if len(data) != total_bytes:
        raise WireError(f"chunks join to {len(data)} bytes, expected {total_bytes}")
    return data
