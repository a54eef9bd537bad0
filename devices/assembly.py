"""Reassembly of an update's chunks against its signed manifest (pure, bounded).

Every chunk is checked against the digest the manifest lists for it, so a chunk injected on an update's
topic is dropped on arrival and the genuine one is still awaited. Chunks that arrive before their
manifest are held unchecked, within a small budget, and checked once the manifest is there.
"""

from __future__ import annotations

from testbed.core.manifest import RejectReason, UpdateManifest, UpdateRejected, chunk_digest, payload_digest
from testbed.core.wire import WireError, join_chunks

MAX_PENDING_KEYS = 8
MAX_UPDATE_BYTES = 64 * 1024 * 1024
MAX_UNANNOUNCED_BYTES = 1024 * 1024
"""Chunks held for updates whose manifest has not arrived (the broker delivers a manifest before its
chunks, so this only needs to cover reordering); the oldest are dropped beyond it."""
MAX_CANDIDATES = 4
"""Different chunks held for one index of an unannounced update: an injected one cannot displace the genuine one."""


class UpdateAssembler:
    """Collects checked chunks per update key; yields the payload once a manifest's chunks are all there."""

    def __init__(self, max_update_bytes: int = MAX_UPDATE_BYTES,
                 max_unannounced_bytes: int = MAX_UNANNOUNCED_BYTES) -> None:
        self.max_update_bytes = max_update_bytes
        self.max_unannounced_bytes = max_unannounced_bytes
        self._manifests: dict[str, UpdateManifest] = {}
        self._chunks: dict[str, dict[int, bytes]] = {}  # checked chunks of announced updates
        self._candidates: dict[str, dict[int, list[bytes]]] = {}  # unchecked chunks of unannounced ones
        self._arrival: dict[str, None] = {}  # keys with a manifest, oldest first
        self._unannounced_bytes: dict[str, int] = {}  # keys with chunks but no manifest yet, oldest first
        self._completed: dict[str, None] = {}  # the last MAX_PENDING_KEYS keys completed, oldest first
        self.received_chunk_bytes = 0
        self.late_chunks = 0
        """Chunks of an update already complete (a duplicate arriving after the last chunk): dropped, not held."""
        self.dropped_chunks = 0
        self.mismatched_chunks = 0
        """Chunks held before their manifest came that did not match its digests (also in `dropped_chunks`)."""

    def expect(self, manifest: UpdateManifest) -> bytes | None:
        """Register a verified manifest; returns the payload if its chunks already all arrived.

        Chunks held for its key that do not match the manifest's digests are dropped (counted in
        `dropped_chunks`); the genuine ones may still come.
        """
        if manifest.total_bytes > self.max_update_bytes:
            raise UpdateRejected(RejectReason.MALFORMED, f"update of {manifest.total_bytes} bytes exceeds the "
                                                         f"limit of {self.max_update_bytes}")
        if manifest.key in self._manifests:
            return None  # announced again (a retained manifest on reconnect): what is held stays
        self._manifests[manifest.key] = manifest
        self._unannounced_bytes.pop(manifest.key, None)
        held = self._chunks.setdefault(manifest.key, {})
        for index, candidates in self._candidates.pop(manifest.key, {}).items():
            for candidate in candidates:
                if index < manifest.chunk_count and chunk_digest(candidate) == manifest.chunk_sha256[index]:
                    held[index] = candidate
                else:
                    self.dropped_chunks += 1
                    self.mismatched_chunks += 1
        self._arrived(manifest.key)
        return self._complete(manifest.key)

    def add_chunk(self, key: str, index: int, data: bytes) -> bytes | None:
        """Store one chunk; the whole payload when the update is complete, else None.

        UpdateRejected (bad_chunk) for a chunk that does not belong to its announced update, or that would
        take the unannounced chunks past their budget; nothing held before is lost.
        """
        manifest = self._manifests.get(key)
        if manifest is None and key in self._completed:
            self.late_chunks += 1  # held, it would keep a finished update "in flight" until pushed out
            return None
        if manifest is None:
            return self._hold_unannounced(key, index, data)
        if index >= manifest.chunk_count:
            self.dropped_chunks += 1
            raise UpdateRejected(RejectReason.BAD_CHUNK,
                                 f"chunk {index} of update {key} is not one of its {manifest.chunk_count} chunks")
        held = self._chunks.setdefault(key, {})
        if index in held:
            return None  # a duplicate of a chunk already checked
        if chunk_digest(data) != manifest.chunk_sha256[index]:
            self.dropped_chunks += 1
            raise UpdateRejected(RejectReason.BAD_CHUNK, f"chunk {index} of update {key} does not match its digest")
        self.received_chunk_bytes += len(data)
        held[index] = data
        return self._complete(key)

    def expects(self, key: str) -> bool:
        """Whether a manifest for `key` is registered and its update not complete yet."""
        return key in self._manifests

    @property
    def pending_updates(self) -> int:
        """Updates with a manifest or chunks held but not complete yet."""
        return len(self._arrival) + len(self._unannounced_bytes)

    def forget(self, key: str) -> None:
        """Drop everything held for one update."""
        self._manifests.pop(key, None)
        self._chunks.pop(key, None)
        self._candidates.pop(key, None)
        self._arrival.pop(key, None)
        self._unannounced_bytes.pop(key, None)

    def _hold_unannounced(self, key: str, index: int, data: bytes) -> None:
        if len(data) > self.max_unannounced_bytes:
            self.dropped_chunks += 1
            raise UpdateRejected(RejectReason.BAD_CHUNK, f"chunk {index} of unannounced update {key!r:.40} is "
                                                         f"{len(data)} bytes")
        candidates = self._candidates.setdefault(key, {}).setdefault(index, [])
        if data in candidates:
            return None
        if len(candidates) >= MAX_CANDIDATES:
            self.dropped_chunks += 1
            raise UpdateRejected(RejectReason.BAD_CHUNK, f"chunk {index} of unannounced update {key!r:.40} "
                                                         f"arrived in more than {MAX_CANDIDATES} versions")
        candidates.append(data)
        self.received_chunk_bytes += len(data)
        self._unannounced_bytes[key] = self._unannounced_bytes.get(key, 0) + len(data)
        # Unannounced keys never push out an announced one: they have a byte and a key budget of their own.
        while (sum(self._unannounced_bytes.values()) > self.max_unannounced_bytes
               or len(self._unannounced_bytes) > MAX_PENDING_KEYS):
            oldest = next(iter(self._unannounced_bytes))
            self.dropped_chunks += sum(len(versions) for versions in self._candidates.get(oldest, {}).values())
            self.forget(oldest)
        return None

    def _complete(self, key: str) -> bytes | None:
        manifest = self._manifests.get(key)
        chunks = self._chunks.get(key, {})
        # Held indexes are all below chunk_count and match their digests, so a full count is complete.
        if manifest is None or len(chunks) < manifest.chunk_count:
            return None
        self.forget(key)
        self._completed[key] = None
        while len(self._completed) > MAX_PENDING_KEYS:
            del self._completed[next(iter(self._completed))]
        try:
            payload = join_chunks(chunks, manifest.chunk_count, manifest.total_bytes)
        except WireError as error:
            raise UpdateRejected(RejectReason.BAD_UPDATE, f"update {key}: {error}") from None
        if payload_digest(payload) != manifest.payload_sha256:
            raise UpdateRejected(RejectReason.BAD_UPDATE,
                                 f"update {key}: reassembled payload does not match the manifest's SHA-256")
        return payload

    def _arrived(self, key: str) -> None:
        """Note an announced key as pending and drop the oldest other announced keys beyond MAX_PENDING_KEYS."""
        self._arrival.setdefault(key, None)
        while len(self._arrival) > MAX_PENDING_KEYS:
            oldest = next(other for other in self._arrival if other != key)
            self.dropped_chunks += len(self._chunks.get(oldest, {}))
            self.forget(oldest)
