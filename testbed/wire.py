"""Wire format of sparse weight updates: encode, decode, verify, apply, and chunk them (pure, no I/O)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


class WireError(Exception):
    """An update, a chunk set or a weight dict is malformed or does not match what it claims."""


FORMAT_VERSION = 1
MAGIC = b"EDTB"
INDEX_CODECS = ("dense", "raw", "bitmap")  # wire id = position in this tuple
VALUE_CODECS = ("fp32",)  # wire id = position in this tuple
FULL_SNAPSHOT_BASE = 0xFFFFFFFF  # base_version of a full snapshot: applies to any base
FLAG_FULL_SNAPSHOT = 0x01
_KNOWN_FLAGS = FLAG_FULL_SNAPSHOT
_U32_MAX = 0xFFFFFFFF

# The one definition of the header layout (little-endian, no padding):
# magic, format_version, index codec id, value codec id, flags, fingerprint, base_version,
# target_version, n, k, index_bytes, value_bytes, dense_bytes, payload_hash, post_apply_hash.
HEADER = struct.Struct("<4sBBBB16sIIQQIII32s32s")
HEADER_BYTES = HEADER.size
FINGERPRINT_BYTES = 16


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

    @property
    def is_full_snapshot(self) -> bool:
        """True when the update carries every weight and needs no particular base version."""
        return self.base_version == FULL_SNAPSHOT_BASE


@dataclass(frozen=True)
class DecodedUpdate:
    """A verified update: sorted partial positions, their new values, and all dense tensors."""

    header: UpdateHeader
    positions: np.ndarray  # int64, strictly increasing, in [0, n)
    values: np.ndarray  # float32, len k
    dense: np.ndarray  # float32, all dense tensors concatenated in order


@dataclass(frozen=True)
class UpdateSizes:
    """Byte accounting of one encoded update."""

    header_bytes: int
    index_bytes: int
    value_bytes: int
    dense_bytes: int
    total_bytes: int
    index_bits: int


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


def count_partial(weights: Mapping[str, np.ndarray]) -> int:
    """I: the total number of partially updated weights."""
    return sum(int(np.asarray(weights[name]).size) for name in partial_tensor_names(weights))


def _flatten_dense(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    return _concat(weights, _dense_tensor_names(weights))


def _index_size(codec: str, n: int, k: int) -> int | None:
    """Bytes the index section takes in `codec`, or None when the codec cannot represent it."""
    if codec == "dense":
        return 0 if k == n else None
    if codec == "raw":
        return 4 * k if n <= _U32_MAX + 1 else None
    if codec == "bitmap":
        return (n + 7) // 8
    raise WireError(f"unknown index codec {codec!r}; expected one of {INDEX_CODECS} or 'auto'")


def _encode_index(codec: str, positions: np.ndarray, n: int) -> bytes:
    if codec == "dense":
        return b""
    if codec == "raw":
        return positions.astype("<u4").tobytes()
    bits = np.zeros(n, dtype=np.uint8)
    bits[positions] = 1
    return np.packbits(bits, bitorder="little").tobytes()


def _decode_index(codec: str, section: bytes, n: int, k: int) -> np.ndarray:
    if codec == "dense":
        return np.arange(n, dtype=np.int64)
    if codec == "raw":
        positions = np.frombuffer(section, dtype="<u4").astype(np.int64)
        if k and np.any(np.diff(positions) <= 0):
            raise WireError("raw index positions are not strictly increasing (sorted, unique)")
        if k and positions[-1] >= n:
            raise WireError(f"raw index position {int(positions[-1])} is out of range for n={n}")
        return positions
    bits = np.unpackbits(np.frombuffer(section, dtype=np.uint8), bitorder="little")
    if np.any(bits[n:]):
        raise WireError("bitmap index has bits set in the padding after position n")
    positions = np.flatnonzero(bits[:n]).astype(np.int64)
    if positions.size != k:
        raise WireError(f"bitmap index has {positions.size} bits set but the header says k={k}")
    return positions


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


def _assemble(
    fingerprint: bytes, base_version: int, target_version: int, flags: int, n: int, codec: str,
    positions: np.ndarray, values: np.ndarray, dense: np.ndarray, post_apply_hash: bytes,
) -> bytes:
    index = _encode_index(codec, positions, n)
    body = index + _le_bytes(values) + _le_bytes(dense)
    header = HEADER.pack(
        MAGIC, FORMAT_VERSION, INDEX_CODECS.index(codec), VALUE_CODECS.index("fp32"), flags,
        fingerprint, base_version, target_version, n, int(positions.size),
        _u32("index section", len(index)),
        _u32("value section", 4 * int(values.size)),
        _u32("dense section", 4 * int(dense.size)),
        hashlib.sha256(body).digest(),
        post_apply_hash,
    )
    return header + body


def encode_update(
    base: Mapping[str, np.ndarray],
    target: Mapping[str, np.ndarray],
    base_version: int,
    target_version: int,
    index_codec: str = "auto",
) -> bytes:
    """Encode the partial positions where target differs bitwise from base, plus every dense tensor.

    `index_codec="auto"` picks the smallest codec that can represent the set (ties: tuple order).
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
    n = int(target_flat.size)
    # Compare bit patterns, so -0.0 vs 0.0 is a change and an unchanged NaN is not.
    changed = base_flat.view(np.uint32) != target_flat.view(np.uint32)
    positions = np.flatnonzero(changed).astype(np.int64)
    k = int(positions.size)
    if index_codec == "auto":
        sizes = {codec: _index_size(codec, n, k) for codec in INDEX_CODECS}
        codec = min((c for c in INDEX_CODECS if sizes[c] is not None), key=lambda c: sizes[c])
    else:
        if _index_size(index_codec, n, k) is None:
            raise WireError(f"index codec {index_codec!r} cannot represent k={k} of n={n} positions")
        codec = index_codec
    return _assemble(
        fingerprint, base_version, target_version, 0, n, codec,
        positions, target_flat[positions], _flatten_dense(target), weights_hash(target),
    )


def encode_full_model(weights: Mapping[str, np.ndarray], target_version: int) -> bytes:
    """Encode a full snapshot (dense codec, every weight) that applies to any base of the same model."""
    target_version = _check_version("target_version", target_version, FULL_SNAPSHOT_BASE)
    flat = flatten_partial(weights)
    n = int(flat.size)
    return _assemble(
        model_fingerprint(weights), FULL_SNAPSHOT_BASE, target_version, FLAG_FULL_SNAPSHOT, n, "dense",
        np.arange(n, dtype=np.int64), flat, _flatten_dense(weights), weights_hash(weights),
    )


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
    full = bool(flags & FLAG_FULL_SNAPSHOT)
    index_codec = INDEX_CODECS[index_id]
    if full != (base_version == FULL_SNAPSHOT_BASE):
        raise WireError("the full-snapshot flag and the base_version sentinel disagree")
    if full and index_codec != "dense":
        raise WireError("a full snapshot must use the dense index codec")
    if not full and target_version <= base_version:
        raise WireError(f"target_version {target_version} is not after base_version {base_version}")
    if target_version == FULL_SNAPSHOT_BASE:
        raise WireError("target_version uses the reserved value 0xFFFFFFFF")
    if k > n:
        raise WireError(f"k={k} exceeds n={n}")
    expected_index = _index_size(index_codec, n, k)
    if expected_index is None:
        raise WireError(f"index codec {index_codec} cannot represent k={k} of n={n} positions")
    if index_bytes != expected_index:
        raise WireError(
            f"index section is {index_bytes} bytes; {index_codec} needs {expected_index} (k={k}, n={n})"
        )
    if value_bytes != 4 * k:
        raise WireError(f"value section is {value_bytes} bytes; fp32 needs {4 * k} for k={k}")
    if dense_bytes % 4:
        raise WireError(f"dense section of {dense_bytes} bytes is not a whole number of float32")
    expected_total = HEADER_BYTES + index_bytes + value_bytes + dense_bytes
    if len(data) != expected_total:
        raise WireError(
            f"update is {len(data)} bytes, its header describes {expected_total} (truncated or padded)"
        )
    return UpdateHeader(
        format_version=version, fingerprint=bytes(fingerprint), base_version=base_version,
        target_version=target_version, n=n, k=k, index_codec=index_codec,
        value_codec=VALUE_CODECS[value_id], index_bytes=index_bytes, value_bytes=value_bytes,
        dense_bytes=dense_bytes, payload_hash=bytes(payload_hash), post_apply_hash=bytes(post_apply_hash),
    )


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
    positions = _decode_index(header.index_codec, body[:index_end], header.n, header.k)
    values = np.frombuffer(body[index_end:value_end], dtype="<f4").astype(np.float32)
    dense = np.frombuffer(body[value_end:], dtype="<f4").astype(np.float32)
    return DecodedUpdate(header=header, positions=positions, values=values, dense=dense)


def update_sizes(data: bytes) -> UpdateSizes:
    """Byte accounting of an encoded update (header and lengths are checked, the hash is not)."""
    header = _parse_header(data)
    return UpdateSizes(
        header_bytes=HEADER_BYTES, index_bytes=header.index_bytes, value_bytes=header.value_bytes,
        dense_bytes=header.dense_bytes, total_bytes=len(data), index_bits=8 * header.index_bytes,
    )


def apply_update(
    base: Mapping[str, np.ndarray], base_version: int, update: DecodedUpdate
) -> dict[str, np.ndarray]:
    """Return new weights = base + update, verified against the post-apply hash; base is never mutated."""
    header = update.header
    if model_fingerprint(base) != header.fingerprint:
        raise WireError("update is for a different model (fingerprint mismatch)")
    if not header.is_full_snapshot and base_version != header.base_version:
        raise WireError(
            f"update applies to version {header.base_version}, but the device holds {base_version}"
        )
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
    dense_names = _dense_tensor_names(base)
    dense_count = sum(int(np.asarray(base[name]).size) for name in dense_names)
    if update.dense.size != dense_count:
        raise WireError(f"update carries {update.dense.size} dense values, the model has {dense_count}")

    flat = flatten_partial(base).copy()  # always a fresh array, so base stays untouched
    flat[update.positions] = update.values
    partial_offset = dense_offset = 0
    result: dict[str, np.ndarray] = {}
    for name, array in _checked(base):
        if array.ndim > 1:
            chunk = flat[partial_offset:partial_offset + array.size]
            partial_offset += array.size
        else:
            chunk = update.dense[dense_offset:dense_offset + array.size]
            dense_offset += array.size
        result[name] = np.array(chunk, dtype=np.float32).reshape(array.shape)
    if weights_hash(result) != header.post_apply_hash:
        raise WireError("post-apply hash mismatch: the base weights differ from what the server assumed")
    return result


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
