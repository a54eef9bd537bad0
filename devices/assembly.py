"""Reassembly of an update's chunks announced by a manifest (pure, bounded)."""

from __future__ import annotations

from testbed.core.manifest import UpdateManifest, payload_digest
from testbed.core.wire import WireError, join_chunks

MAX_PENDING_KEYS = 8


class UpdateAssembler:
    """Collects chunks per update key; yields the payload once a manifest's chunks are all there."""

    def __init__(self, max_update_bytes: int = 64 * 1024 * 1024) -> None:
        self.max_update_bytes = max_update_bytes
        self._manifests: dict[str, UpdateManifest] = {}
        self._chunks: dict[str, dict[int, bytes]] = {}
        self._arrival: dict[str, None] = {}  # pending keys, oldest first
        self._held_bytes: dict[str, int] = {}
        self.received_chunk_bytes = 0
        self.dropped_chunks = 0

    def expect(self, manifest: UpdateManifest) -> bytes | None:
        """Register a manifest; returns the payload if its chunks already all arrived."""
        if manifest.total_bytes > self.max_update_bytes:
            raise WireError(f"update of {manifest.total_bytes} bytes exceeds the limit of {self.max_update_bytes}")
        self._manifests[manifest.key] = manifest
        held = self._chunks.get(manifest.key, {})
        for index in [index for index in held if index >= manifest.chunk_count]:
            # arrived before the manifest said they cannot belong to it
            self._held_bytes[manifest.key] -= len(held.pop(index))
            self.dropped_chunks += 1
        self._arrived(manifest.key)
        return self._complete(manifest.key)

    def add_chunk(self, key: str, index: int, data: bytes) -> bytes | None:
        """Store one chunk; returns the whole payload when the update is complete, else None."""
        manifest = self._manifests.get(key)
        if index < 0 or (manifest is not None and index >= manifest.chunk_count):
            self.dropped_chunks += 1
            limit = "" if manifest is None else f" of its {manifest.chunk_count} chunks"
            raise WireError(f"chunk {index} of update {key} is not a valid chunk index{limit}")
        self.received_chunk_bytes += len(data)
        held = self._chunks.setdefault(key, {})
        previous = held.get(index)
        held[index] = data
        self._held_bytes[key] = self._held_bytes.get(key, 0) + len(data) - (0 if previous is None else len(previous))
        if self._held_bytes[key] > self.max_update_bytes:
            self.dropped_chunks += len(held)
            self.forget(key)
            raise WireError(f"update {key}: chunks held exceed the limit of {self.max_update_bytes} bytes")
        self._arrived(key)
        return self._complete(key)

    @property
    def pending_updates(self) -> int:
        """Updates with a manifest or chunks held but not complete yet."""
        return len(self._arrival)

    def forget(self, key: str) -> None:
        """Drop everything held for one update."""
        self._manifests.pop(key, None)
        self._chunks.pop(key, None)
        self._arrival.pop(key, None)
        self._held_bytes.pop(key, None)

    def _complete(self, key: str) -> bytes | None:
        manifest = self._manifests.get(key)
        chunks = self._chunks.get(key, {})
        # Held indexes are all below chunk_count (checked on arrival and in expect), so a full count is complete.
        if manifest is None or len(chunks) < manifest.chunk_count:
            return None
        try:
            payload = join_chunks(chunks, manifest.chunk_count, manifest.total_bytes)
        except WireError:
            self.forget(key)
            raise
        if payload_digest(payload) != manifest.payload_sha256:
            self.forget(key)
            raise WireError(f"update {key}: reassembled payload does not match the manifest's SHA-256")
        self.forget(key)
        return payload

    def _arrived(self, key: str) -> None:
        """Note a key as pending and drop the oldest other keys beyond MAX_PENDING_KEYS."""
        self._arrival.setdefault(key, None)
        while len(self._arrival) > MAX_PENDING_KEYS:
            oldest = next(other for other in self._arrival if other != key)
            self.dropped_chunks += len(self._chunks.get(oldest, {}))
            self.forget(oldest)
