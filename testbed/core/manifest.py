"""The update manifest: the JSON announcement that tells devices which chunks make up an update."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from testbed.core.errors import TestbedError


class ManifestError(TestbedError):
    """A manifest payload that is not valid JSON of the expected shape."""


@dataclass(frozen=True)
class UpdateManifest:
    """What a device needs to collect and check one encoded update."""

    run_id: str
    round_index: int
    key: str
    target_version: int
    base_version: int | None
    total_bytes: int
    chunk_count: int
    chunk_size: int
    payload_sha256: str
    published_at: float

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, payload: bytes) -> UpdateManifest:
        try:
            data = json.loads(payload)
        except (ValueError, TypeError, RecursionError) as error:  # ValueError covers decode errors
            raise ManifestError(f"manifest is not JSON: {error}") from None
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise ManifestError(f"manifest fields do not match {sorted(cls.__dataclass_fields__)}")
        integer_fields = ("round_index", "target_version", "total_bytes", "chunk_count", "chunk_size")
        for name in integer_fields:
            if not isinstance(data[name], int) or isinstance(data[name], bool) or data[name] < 0:
                raise ManifestError(f"manifest field {name} must be a non-negative integer, got {data[name]!r}")
        base_version = data["base_version"]
        if base_version is not None and (
            not isinstance(base_version, int) or isinstance(base_version, bool) or base_version < 0
        ):
            raise ManifestError(
                f"manifest field base_version must be a non-negative integer or null, got {base_version!r}"
            )
        if data["chunk_count"] < 1 or data["chunk_size"] < 1:
            raise ManifestError("manifest chunk_count and chunk_size must be positive")
        expected_chunks = max(1, -(-data["total_bytes"] // data["chunk_size"]))
        if data["chunk_count"] != expected_chunks:
            raise ManifestError(
                f"manifest chunk_count {data['chunk_count']} does not fit {data['total_bytes']} bytes "
                f"in chunks of {data['chunk_size']} (expected {expected_chunks})"
            )
        for name in ("run_id", "key", "payload_sha256"):
            if not isinstance(data[name], str):
                raise ManifestError(f"manifest field {name} must be a string, got {data[name]!r}")
        published_at = data["published_at"]
        if isinstance(published_at, bool) or not (
            isinstance(published_at, int) or (isinstance(published_at, float) and math.isfinite(published_at))
        ):
            raise ManifestError(f"manifest field published_at must be a finite number, got {published_at!r}")
        return cls(**data)


def payload_digest(payload: bytes) -> str:
    """Hex SHA-256 of an encoded update, as carried in the manifest."""
    return hashlib.sha256(payload).hexdigest()
