"""The deployed model of a device and the rule that changes it: collect an update, verify it, then swap."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from devices.assembly import UpdateAssembler
from testbed.core.initial_weights import initial_weights, layout_of
from testbed.core.manifest import UpdateManifest
from testbed.core.wire import WireError, apply_update, decode_update

WeightDict = dict[str, np.ndarray]


@dataclass(frozen=True)
class CompletedUpdate:
    """Every chunk of an announced update, reassembled and matching the manifest's digest."""

    manifest: UpdateManifest
    payload: bytes


class UpdateReceiver:
    """Version and weights a device holds, and the transfers in flight towards newer versions.

    Transport-free: the MQTT device agent and the serial board agent feed it manifests and chunks.
    `verify` computes the new weights on a copy and checks the post-apply hash (testbed.core.wire); only
    `commit` changes what the device holds, so a bad update is never half-applied.
    """

    def __init__(self, architecture_weights: Mapping[str, np.ndarray], init_seed: int) -> None:
        # Version 0 is the shared initial model w⁰, regenerated from the seed and the layout alone;
        # re-initialisation rounds send sparse updates relative to it.
        self.initial_weights: WeightDict = initial_weights(layout_of(dict(architecture_weights)), init_seed)
        self.version = 0
        self.weights: WeightDict = self.initial_weights
        self.assembler = UpdateAssembler()
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

    def add_manifest(self, manifest: UpdateManifest) -> CompletedUpdate | None:
        """Register an announced update; None if it is not newer than the held version or still incomplete."""
        if manifest.target_version <= self.version:
            return None
        if manifest.base_version not in (None, 0, self.version):
            raise WireError(
                f"update {manifest.key} applies to version {manifest.base_version}, device holds {self.version}"
            )
        self._manifests[manifest.key] = manifest
        return self._completed(manifest.key, self.assembler.expect(manifest))

    def add_chunk(self, key: str, index: int, data: bytes) -> CompletedUpdate | None:
        """Store one chunk; the completed update once all of its chunks are there."""
        return self._completed(key, self.assembler.add_chunk(key, index, data))

    def _completed(self, key: str, payload: bytes | None) -> CompletedUpdate | None:
        if payload is None:
            return None
        return CompletedUpdate(self._manifests.pop(key), payload)

    def verify(self, update: CompletedUpdate) -> tuple[int, WeightDict]:
        """(target version, weights after apply) of a completed update, computed on a copy; WireError if wrong."""
        decoded = decode_update(update.payload)
        if decoded.header.target_version != update.manifest.target_version:
            raise WireError(
                f"update header says version {decoded.header.target_version}, "
                f"manifest announced {update.manifest.target_version}"
            )
        if update.manifest.base_version == 0:
            return decoded.header.target_version, apply_update(self.initial_weights, 0, decoded)
        return decoded.header.target_version, apply_update(self.weights, self.version, decoded)

    def commit(self, version: int, weights: WeightDict) -> None:
        """Swap in verified weights."""
        self.version = version
        self.weights = weights
