"""Reassembly of an update's chunks announced by a manifest (pure, bounded)."""

from __future__ import annotations

from testbed.manifest import UpdateManifest, payload_digest
from testbed.wire import WireError, join_chunks

MAX_PENDING_KEYS = 8


class UpdateAssembler:
    """Collects chunks per update key; yields the payload once a manifest's chunks are all there."""

    def __init__(self, max_update_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_update_bytes = max_update_bytes
        self._manifests: dict[str, UpdateManifest] = {}
        self._chunks: dict[str, dict[int, bytes]] = {}
        self.received_chunk_bytes = 0
        self.dropped_chunks = 0

    def expect(self, manifest: UpdateManifest) -> bytes | None:
        """Register a manifest; returns the payload if its chunks already all arrived."""
        if manifest.total_bytes > self.max_update_bytes:
            raise WireError(f"update of {manifest.total_bytes} bytes exceeds the limit of {self.max_update_bytes}")
        self._manifests[manifest.key] = manifest
        self._trim()
        return self._complete(manifest.key)

    def add_chunk(self, key: str, index: int, data: bytes) -> bytes | None:
        """Store one chunk; returns the whole payload when the update is complete, else None."""
        manifest = self._manifests.get(key)
        if manifest is not None and index >= manifest.chunk_count:
            self.dropped_chunks += 1
            raise WireError(f"chunk {index} of update {key} is beyond its {manifest.chunk_count} chunks")
        self.received_chunk_bytes += len(data)
        self._chunks.setdefault(key, {})[index] = data
        self._trim()
        return self._complete(key)

    def forget(self, key: str) -> None:
        """Drop everything held for one update."""
        self._manifests.pop(key, None)
        self._chunks.pop(key, None)

    def _complete(self, key: str) -> bytes | None:
        manifest = self._manifests.get(key)
        chunks = self._chunks.get(key, {})
        if manifest is None or len(chunks) < manifest.chunk_count:
            return None
        payload = join_chunks(chunks, manifest.chunk_count, manifest.total_bytes)
        if payload_digest(payload) != manifest.payload_sha256:
            self.forget(key)
            raise WireError(f"update {key}: reassembled payload does not match the manifest's SHA-256")
        self.forget(key)
        return payload

    def _trim(self) -> None:
        keys = list(dict.fromkeys([*self._chunks, *self._manifests]))
        for key in keys[:-MAX_PENDING_KEYS] if len(keys) > MAX_PENDING_KEYS else []:
            self.dropped_chunks += len(self._chunks.get(key, {}))
            self.forget(key)
