"""The signed update manifest: what a device checks before it collects a single chunk of an update.

A manifest names one encoded update (run, round, topic key, base and target version, size, chunking), binds
its content (SHA-256 of the payload and of every chunk, the model fingerprint and the hash of the weights
after applying it) and says how long it is valid (issued at `published_at_ms`, valid until `expires_at_ms`,
whole milliseconds of Unix time: fixed-width, so a manifest's size, and the bytes a device is charged for,
do not depend on when it was published). The
run's Ed25519 key signs all of that (`signed_bytes`), so a device holding the run's public key can tell a
genuine update from a forged, relabelled, rolled back or foreign one before it assembles anything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import asdict, dataclass, replace
from enum import Enum

from testbed.core import wire
from testbed.core.errors import TestbedError
from testbed.core.signing import SIGNATURE_BYTES, SigningKey, TrustedKey

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
"""A manifest of the largest update the devices accept (64 MiB in 1 KiB chunks) is about 2.3 MB."""
MAX_CHUNKS = 1 << 17
MAX_VERSION = 0xFFFFFFFE  # versions are u32 on the wire; 0xFFFFFFFF marks a snapshot's base
MAX_ROUND = 1 << 31
MAX_BYTES = 1 << 40
MAX_TIME_MS = 10**13 - 1  # 13 digits: until the year 2286
MAX_RUN_ID_CHARS = 256
DEFAULT_LIFETIME_S = 3600.0
"""How long a manifest stays valid after it is issued; a device that gets it later asks for a fresh one."""
CHUNK_DIGEST_CHARS = 32  # hex of the first 16 bytes of a chunk's SHA-256
SIGNATURE_DOMAIN = b"edge-testbed update manifest v1\x00"

_KEY_PATTERN = re.compile(r"[0-9]{1,10}(-from-[0-9]{1,10})?")
_HEX = frozenset("0123456789abcdef")
_RUN_ID_FORBIDDEN = frozenset("/+#\x00")


class ManifestError(TestbedError):
    """A manifest payload that is not valid JSON of the expected shape."""


class RejectReason(str, Enum):
    """Why a device refused an update or part of one: the `reason` label of the rejection counter."""

    MALFORMED = "malformed"
    """The manifest does not parse (bad JSON, a field of the wrong type, out of bounds)."""
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    """Signed, but not by the run's key, or changed after signing (a relabelled version, say)."""
    WRONG_RUN = "wrong_run"
    WRONG_MODEL = "wrong_model"
    """Signed for another architecture than the one the device runs."""
    EXPIRED = "expired"
    NOT_NEWER = "not_newer"
    """A genuine update for a version the device already holds or has passed (a replay or a rollback)."""
    WRONG_BASE = "wrong_base"
    """A genuine update from a version the device does not hold: it asks for a catch-up."""
    BAD_CHUNK = "bad_chunk"
    """A chunk whose digest is not the manifest's (injected or corrupted), or one no manifest announced in time."""
    BAD_UPDATE = "bad_update"
    """A genuine, complete update that does not decode or apply to the announced weights: it asks for a catch-up."""

    @property
    def asks_for_repair(self) -> bool:
        """Whether the device nacks so the run sends it a catch-up (only for genuine updates it could not use)."""
        return self in (RejectReason.WRONG_BASE, RejectReason.BAD_UPDATE)


class UpdateRejected(TestbedError):
    """A device refused an update (or a chunk of one) for `reason`."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class UpdateManifest:
    """What a device needs to collect, check and apply one encoded update; see the module docstring."""

    run_id: str
    round_index: int
    key: str
    target_version: int
    base_version: int | None
    total_bytes: int
    chunk_count: int
    chunk_size: int
    payload_sha256: str
    chunk_sha256: tuple[str, ...]
    model_fingerprint: str
    post_apply_sha256: str
    published_at_ms: int
    expires_at_ms: int
    signature: str = ""

    @property
    def published_at(self) -> float:
        """Issue time, seconds of Unix time."""
        return self.published_at_ms / 1000.0

    @property
    def expires_at(self) -> float:
        """End of validity, seconds of Unix time."""
        return self.expires_at_ms / 1000.0

    @classmethod
    def for_payload(cls, payload: bytes, *, run_id: str, round_index: int, key: str, base_version: int | None,
                    chunk_size: int, published_at: float, lifetime_s: float = DEFAULT_LIFETIME_S) -> UpdateManifest:
        """The unsigned manifest of an encoded update; target, fingerprint and post-apply hash come from its header."""
        header = wire.decode_header(payload)
        chunks = wire.split_chunks(payload, chunk_size)
        return cls(
            run_id=run_id, round_index=round_index, key=key, target_version=header.target_version,
            base_version=base_version, total_bytes=len(payload), chunk_count=len(chunks), chunk_size=chunk_size,
            payload_sha256=payload_digest(payload), chunk_sha256=tuple(chunk_digest(chunk) for chunk in chunks),
            model_fingerprint=header.fingerprint.hex(), post_apply_sha256=header.post_apply_hash.hex(),
            published_at_ms=round(published_at * 1000), expires_at_ms=round((published_at + lifetime_s) * 1000),
        )

    def signed_bytes(self) -> bytes:
        """What the signature covers: a domain tag and the canonical JSON of every other field."""
        fields = asdict(self)
        del fields["signature"]
        fields["chunk_sha256"] = list(self.chunk_sha256)
        return SIGNATURE_DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")

    def signed(self, key: SigningKey) -> UpdateManifest:
        """This manifest with `key`'s signature."""
        return replace(self, signature=base64.b64encode(key.sign(self.signed_bytes())).decode("ascii"))

    def has_valid_signature(self, trusted_key: TrustedKey) -> bool:
        try:
            signature = base64.b64decode(self.signature.encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            return False
        return len(signature) == SIGNATURE_BYTES and trusted_key.verify(self.signed_bytes(), signature)

    def to_json(self) -> bytes:
        fields = asdict(self)
        fields["chunk_sha256"] = list(self.chunk_sha256)
        return json.dumps(fields, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, payload: bytes) -> UpdateManifest:
        """Parse a manifest (not its signature, see `verify_manifest`); ManifestError saying what is wrong."""
        if len(payload) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest of {len(payload)} bytes exceeds the {MAX_MANIFEST_BYTES}-byte limit")
        try:
            data = json.loads(payload)
        except (ValueError, TypeError, RecursionError) as error:  # ValueError covers decode errors
            raise ManifestError(f"manifest is not JSON: {str(error)[:200]}") from None
        if not isinstance(data, dict) or set(data) != set(cls.__dataclass_fields__):
            raise ManifestError(f"manifest fields do not match {sorted(cls.__dataclass_fields__)}")
        _check_integer(data, "round_index", 0, MAX_ROUND)
        _check_integer(data, "target_version", 1, MAX_VERSION)
        _check_integer(data, "total_bytes", 0, MAX_BYTES)
        _check_integer(data, "chunk_count", 1, MAX_CHUNKS)
        _check_integer(data, "chunk_size", 1, MAX_BYTES)
        if data["base_version"] is not None:
            _check_integer(data, "base_version", 0, MAX_VERSION)
        expected_chunks = max(1, -(-data["total_bytes"] // data["chunk_size"]))
        if data["chunk_count"] != expected_chunks:
            raise ManifestError(
                f"manifest chunk_count {data['chunk_count']} does not fit {data['total_bytes']} bytes "
                f"in chunks of {data['chunk_size']} (expected {expected_chunks})"
            )
        run_id = data["run_id"]
        if (not isinstance(run_id, str) or not 0 < len(run_id) <= MAX_RUN_ID_CHARS
                or any(character in _RUN_ID_FORBIDDEN for character in run_id)):
            raise ManifestError(f"manifest field run_id must be a topic-safe name of 1 to {MAX_RUN_ID_CHARS} "
                                f"characters, got {str(run_id)[:80]!r}")
        key = data["key"]
        if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
            raise ManifestError(f"manifest field key must be <target> or <target>-from-<base>, got {str(key)[:80]!r}")
        _check_hex(data, "payload_sha256", 64)
        _check_hex(data, "model_fingerprint", 2 * wire.FINGERPRINT_BYTES)
        _check_hex(data, "post_apply_sha256", 64)
        digests = data["chunk_sha256"]
        if not isinstance(digests, list) or len(digests) != data["chunk_count"]:
            raise ManifestError(f"manifest field chunk_sha256 must list one digest per chunk ({data['chunk_count']})")
        for digest in digests:
            if not _is_hex(digest, CHUNK_DIGEST_CHARS):
                raise ManifestError(f"manifest field chunk_sha256 lists {CHUNK_DIGEST_CHARS} lowercase hex characters per chunk, "
                                    f"got {str(digest)[:80]!r}")
        _check_integer(data, "published_at_ms", 0, MAX_TIME_MS)
        _check_integer(data, "expires_at_ms", 0, MAX_TIME_MS)
        signature = data["signature"]
        if not isinstance(signature, str) or len(signature) > 128:
            raise ManifestError(f"manifest field signature must be base64 text, got {str(signature)[:80]!r}")
        data["chunk_sha256"] = tuple(digests)
        return cls(**data)


def verify_manifest(manifest: UpdateManifest, *, trusted_key: TrustedKey, run_id: str,
                    model_fingerprint: bytes | None, now: float) -> None:
    """Check who issued `manifest`, for which run and model, and whether it is still valid; UpdateRejected if not.

    `model_fingerprint` None skips the model check (a serial bridge, which does not hold the model). The
    version checks (newer than what is held, from the base held) are the receiver's: they need its state.
    """
    if not manifest.signature:
        raise UpdateRejected(RejectReason.UNSIGNED, f"update {manifest.key} carries no signature")
    if not manifest.has_valid_signature(trusted_key):
        raise UpdateRejected(RejectReason.BAD_SIGNATURE,
                             f"update {manifest.key} is not signed by the run's key {trusted_key.key_id}")
    if manifest.run_id != run_id:
        raise UpdateRejected(RejectReason.WRONG_RUN, f"update {manifest.key} was issued for run {manifest.run_id!r:.80}")
    if model_fingerprint is not None and manifest.model_fingerprint != model_fingerprint.hex():
        raise UpdateRejected(RejectReason.WRONG_MODEL, f"update {manifest.key} is for another model architecture")
    if now > manifest.expires_at:
        raise UpdateRejected(RejectReason.EXPIRED, f"update {manifest.key} expired {now - manifest.expires_at:.0f} s ago")


def payload_digest(payload: bytes) -> str:
    """Hex SHA-256 of an encoded update, as carried in the manifest."""
    return hashlib.sha256(payload).hexdigest()


def chunk_digest(chunk: bytes) -> str:
    """Hex of the first 16 bytes of a chunk's SHA-256, as listed in the manifest."""
    return hashlib.sha256(chunk).hexdigest()[:CHUNK_DIGEST_CHARS]


def _check_integer(data: dict[str, object], name: str, low: int, high: int) -> None:
    value = data[name]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(f"manifest field {name} must be an integer from {low} to {high}, got {str(value)[:80]!r}")


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX


def _check_hex(data: dict[str, object], name: str, length: int) -> None:
    if not _is_hex(data[name], length):
        raise ManifestError(f"manifest field {name} must be {length} lowercase hex characters, "
                            f"got {str(data[name])[:80]!r}")
