"""The deployed model of a device and the rule that changes it: collect an update, verify it, then swap."""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from devices.assembly import UpdateAssembler
from testbed.core.initial_weights import initial_weights, layout_of
from testbed.core.manifest import (
    ManifestError,
    RejectReason,
    UpdateManifest,
    UpdateRejected,
    verify_manifest,
)
from testbed.core.signing import TrustedKey
from testbed.core.wire import FULL_SNAPSHOT_BASE, WireError, apply_update, decode_update, model_fingerprint

WeightDict = dict[str, np.ndarray]


@functools.lru_cache(maxsize=8)
def _read_only_initial_weights(layout: tuple[tuple[str, tuple[int, ...]], ...], init_seed: int) -> WeightDict:
    weights = initial_weights(layout, init_seed)
    for array in weights.values():
        array.setflags(write=False)
    return weights


def shared_initial_weights(layout: tuple[tuple[str, tuple[int, ...]], ...], init_seed: int) -> WeightDict:
    """w⁰ of `layout` and `init_seed`, its arrays one read-only copy for every receiver of the process (an update
    is applied to a copy, so a device's own weights replace w⁰ and never change it)."""
    return dict(_read_only_initial_weights(layout, init_seed))


@dataclass(frozen=True)
class UpdateTrust:
    """Whose updates a device applies: the run it takes part in and the public key of that run's signer."""

    run_id: str
    trusted_key: TrustedKey
    clock: Callable[[], float] = field(default=time.time, compare=False)
    """Wall clock for manifest expiry."""


@dataclass(frozen=True)
class CompletedUpdate:
    """Every chunk of an announced update, reassembled and matching the manifest's digest."""

    manifest: UpdateManifest
    payload: bytes


class UpdateReceiver:
    """Version and weights a device holds, and the transfers in flight towards newer versions.

    Transport-free: the MQTT device agent and the serial board agent feed it manifests and chunks.
    A manifest is accepted only if the run's key signed it for this run and model, it has not expired,
    its target is newer than the version held and its base is held (testbed.core.manifest); chunks are
    checked against the manifest's digests as they arrive. `verify` computes the new weights on a copy and
    checks them against the signed post-apply hash; only `commit` changes what the device holds, so a bad
    update is never half-applied. Every refusal is counted in `rejections`; each raises UpdateRejected,
    except chunks held before their manifest came and found not to match it (counted as bad_chunk).
    """

    def __init__(self, architecture_weights: Mapping[str, np.ndarray], init_seed: int, trust: UpdateTrust) -> None:
        # Version 0 is the shared initial model w⁰, regenerated from the seed and the layout alone;
        # re-initialisation rounds send sparse updates relative to it.
        self.initial_weights: WeightDict = shared_initial_weights(
            tuple(layout_of(dict(architecture_weights))), init_seed)
        self.fingerprint = model_fingerprint(self.initial_weights)
        self.trust = trust
        self.version = 0
        self.weights: WeightDict = self.initial_weights
        self.assembler = UpdateAssembler()
        self.rejections: Counter[RejectReason] = Counter()
        self._manifests: dict[str, UpdateManifest] = {}

    def restore(self, version: int, weights: Mapping[str, np.ndarray]) -> None:
        """Hold `weights` as `version` (a board resuming from its saved state)."""
        if set(weights) != set(self.initial_weights) or any(
                np.shape(weights[name]) != self.initial_weights[name].shape for name in weights):
            raise WireError("saved weights do not match the model's layout")
        self.version = version
        self.weights = {name: np.asarray(array) for name, array in weights.items()}

    @property
    def transfers_in_flight(self) -> bool:
        """Whether some update has been announced or begun but is not complete."""
        return self.assembler.pending_updates > 0

    def drop_transfers(self) -> None:
        """Forget every update in flight (its chunks were lost with a connection)."""
        self.assembler = UpdateAssembler()
        self._manifests.clear()

    @property
    def rejected_updates(self) -> int:
        return sum(self.rejections.values())

    @property
    def rejected_by_reason(self) -> dict[str, int]:
        """The refusals by reason, as a report carries them (reason names in order)."""
        return {reason.value: count for reason, count in sorted(self.rejections.items())}

    def reject(self, reason: RejectReason, detail: str) -> UpdateRejected:
        """Count a refusal and return the error that says so (for the caller to raise)."""
        self.rejections[reason] += 1
        return UpdateRejected(reason, detail)

    def add_manifest_payload(self, payload: bytes) -> CompletedUpdate | None:
        """Parse, check and register an announced update; the completed update if its chunks are all there."""
        try:
            manifest = UpdateManifest.from_json(payload)
        except ManifestError as error:
            raise self.reject(RejectReason.MALFORMED, str(error)) from None
        return self.add_manifest(manifest)

    def add_manifest(self, manifest: UpdateManifest) -> CompletedUpdate | None:
        """Check and register an announced update; UpdateRejected (counted) if it is not one to take."""
        try:
            verify_manifest(manifest, trusted_key=self.trust.trusted_key, run_id=self.trust.run_id,
                            model_fingerprint=self.fingerprint, now=self.trust.clock())
            if manifest.target_version <= self.version:
                raise UpdateRejected(RejectReason.NOT_NEWER, f"update {manifest.key} is for version "
                                     f"{manifest.target_version}; the device holds {self.version}")
            if manifest.base_version not in (None, 0, self.version):
                raise UpdateRejected(RejectReason.WRONG_BASE, f"update {manifest.key} applies to version "
                                     f"{manifest.base_version}, the device holds {self.version}")
            self._manifests[manifest.key] = manifest
            mismatched_before = self.assembler.mismatched_chunks
            try:
                payload = self.assembler.expect(manifest)
            finally:
                # chunks held before the manifest came that do not match its digests: injected ones
                mismatched = self.assembler.mismatched_chunks - mismatched_before
                if mismatched:
                    self.rejections[RejectReason.BAD_CHUNK] += mismatched
            completed = self._completed(manifest.key, payload)
            for key in [key for key in self._manifests if not self.assembler.expects(key)]:
                del self._manifests[key]  # given up by the assembler for newer announcements
            return completed
        except UpdateRejected as error:
            self.rejections[error.reason] += 1
            raise

    def add_chunk(self, key: str, index: int, data: bytes) -> CompletedUpdate | None:
        """Store one chunk; the completed update once all of its chunks are there; UpdateRejected (counted)."""
        try:
            return self._completed(key, self.assembler.add_chunk(key, index, data))
        except UpdateRejected as error:
            self.rejections[error.reason] += 1
            if key in self._manifests and not self.assembler.expects(key):
                self._manifests.pop(key)  # the assembler gave the update up
            raise

    def _completed(self, key: str, payload: bytes | None) -> CompletedUpdate | None:
        if payload is None:
            return None
        return CompletedUpdate(self._manifests.pop(key), payload)

    def verify(self, update: CompletedUpdate) -> tuple[int, WeightDict]:
        """(target version, weights after apply) of a completed update, computed on a copy; UpdateRejected
        (bad_update, counted) if its header disagrees with the signed manifest or the result is not the
        announced weights."""
        manifest = update.manifest
        try:
            decoded = decode_update(update.payload)
            header = decoded.header
            announced_base = FULL_SNAPSHOT_BASE if manifest.base_version is None else manifest.base_version
            if (header.target_version, header.base_version) != (manifest.target_version, announced_base):
                raise WireError(f"header says {header.base_version} → {header.target_version}, the manifest "
                                f"{manifest.base_version} → {manifest.target_version}")
            if header.post_apply_hash.hex() != manifest.post_apply_sha256:
                raise WireError("header's post-apply hash is not the manifest's")
            if manifest.base_version == 0:
                return header.target_version, apply_update(self.initial_weights, 0, decoded)
            return header.target_version, apply_update(self.weights, self.version, decoded)
        except WireError as error:
            raise self.reject(RejectReason.BAD_UPDATE, f"update {manifest.key}: {error}") from None

    def commit(self, version: int, weights: WeightDict) -> None:
        """Swap in verified weights."""
        self.version = version
        self.weights = weights
