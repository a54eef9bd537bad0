"""Publishing updates over MQTT: encode, announce with a manifest, send the chunks; catch-ups on request."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiomqtt
import numpy as np

from server.checkpoint import weights_from_tensors, weights_to_tensors
from testbed.core.manifest import DEFAULT_LIFETIME_S, UpdateManifest
from testbed.core.signing import SigningKey
from testbed.core.topics import Topics, mqtt_publish_wire_bytes, update_key
from testbed.core.wire import encode_full_model, encode_update, split_chunks, update_sizes

PUBLISH_TIMEOUT_S = 60.0

WeightDict = dict[str, np.ndarray]


@dataclass(frozen=True)
class PublishedUpdate:
    """What went out for one update: its manifest and its byte counts."""

    manifest: UpdateManifest
    payload_bytes: int
    wire_bytes: int
    index_bits: int
    value_bytes: int
    dense_bytes: int


@dataclass(frozen=True)
class PublisherState:
    """A publisher between rounds, as a run's checkpoint keeps it (testbed.run_checkpoint)."""

    latest_version: int
    latest_weights: WeightDict | None
    published_bytes: int

    def to_saveable(self) -> dict[str, Any]:
        """Tensors and numbers only (torch.load with weights_only reads it back)."""
        return {"latest_version": self.latest_version, "latest_weights": weights_to_tensors(self.latest_weights),
                "published_bytes": self.published_bytes}

    @classmethod
    def from_saveable(cls, saved: dict[str, Any]) -> PublisherState:
        return cls(int(saved["latest_version"]), weights_from_tensors(saved["latest_weights"]),
                   int(saved["published_bytes"]))


class UpdatePublisher:
    """Keeps every published version's weights so that a lagging device can get a cumulative update.

    Version 0 is the shared initial model w⁰, which devices regenerate themselves. Every manifest is
    signed with `signing_key` and valid for `lifetime_s` after it is published.
    """

    def __init__(self, client: aiomqtt.Client, topics: Topics, chunk_size: int, signing_key: SigningKey,
                 initial_weights: WeightDict | None = None, lifetime_s: float = DEFAULT_LIFETIME_S) -> None:
        self.client = client
        self.topics = topics
        self.chunk_size = chunk_size
        self.signing_key = signing_key
        self.lifetime_s = lifetime_s
        self.versions: dict[int, WeightDict] = {} if initial_weights is None else {0: initial_weights}
        self.latest_version = 0
        self.published_bytes = 0

    def encode(self, target_version: int, weights: WeightDict, base_version: int | None) -> bytes:
        """An exact (fp32) cumulative update from `base_version` (None or unknown: a full snapshot) to target."""
        if base_version is None or base_version not in self.versions:
            return encode_full_model(weights, target_version)
        return encode_update(self.versions[base_version], weights, base_version, target_version)

    def checkpoint_state(self) -> PublisherState:
        """What a resumed run's publisher needs: the latest version and its weights (catch-ups from w⁰ or any other
        version to it; fresh devices hold w⁰) and the bytes published so far."""
        return PublisherState(self.latest_version, self.versions.get(self.latest_version), self.published_bytes)

    def restore(self, state: PublisherState) -> None:
        """Continue from `state`: versions other than w⁰ and the latest are gone (a catch-up from one: a snapshot)."""
        if state.latest_weights is not None and state.latest_version > 0:
            self.versions[state.latest_version] = {name: array.copy() for name, array in state.latest_weights.items()}
        self.latest_version = state.latest_version
        self.published_bytes = state.published_bytes

    async def publish_version(self, round_index: int, target_version: int, weights: WeightDict,
                              base_version: int | None, payload: bytes) -> PublishedUpdate:
        """Broadcast the server's encoded update for a new version: retained manifest, then its chunks.

        `weights` is what a device holds after applying `payload`; it is kept for later catch-ups.
        """
        self.versions[target_version] = {name: array.copy() for name, array in weights.items()}
        self.latest_version = target_version
        return await self._publish(round_index, target_version, base_version, payload,
                                   manifest_topic=self.topics.manifest, retain=True, key=update_key(target_version),
                                   device_id=None)

    async def publish_catch_up(self, round_index: int, device_id: str, device_version: int) -> PublishedUpdate:
        """A cumulative update from the device's version (or a full snapshot) to the latest, for it alone."""
        target = self.latest_version
        base = device_version if device_version in self.versions else None
        payload = self.encode(target, self.versions[target], base)
        key = update_key(target, base if base is not None else 0)
        return await self._publish(round_index, target, base, payload,
                                   manifest_topic=self.topics.device(device_id, "manifest"), retain=False, key=key,
                                   device_id=device_id)

    async def _publish(self, round_index: int, target_version: int, base_version: int | None, payload: bytes,
                       manifest_topic: str, retain: bool, key: str, device_id: str | None) -> PublishedUpdate:
        chunks = split_chunks(payload, self.chunk_size)
        manifest = UpdateManifest.for_payload(
            payload, run_id=self.topics.run_id, round_index=round_index, key=key, base_version=base_version,
            chunk_size=self.chunk_size, published_at=time.time(), lifetime_s=self.lifetime_s,
        ).signed(self.signing_key)
        assert manifest.target_version == target_version, "the payload's header names another version"
        manifest_payload = manifest.to_json()
        await self.client.publish(manifest_topic, manifest_payload, qos=1, retain=retain, timeout=PUBLISH_TIMEOUT_S)
        wire_bytes = mqtt_publish_wire_bytes(manifest_topic, len(manifest_payload), qos=1)
        for index, chunk in enumerate(chunks):
            topic = (self.topics.update_chunk(key, index) if device_id is None
                     else self.topics.device_update_chunk(device_id, key, index))
            await self.client.publish(topic, chunk, qos=1, timeout=PUBLISH_TIMEOUT_S)
            wire_bytes += mqtt_publish_wire_bytes(topic, len(chunk), qos=1)
        self.published_bytes += len(payload)
        sizes = update_sizes(payload)
        return PublishedUpdate(
            manifest=manifest,
            payload_bytes=len(payload),
            wire_bytes=wire_bytes,
            index_bits=sizes.index_bits,
            value_bytes=sizes.value_bytes,
            dense_bytes=sizes.dense_bytes,
        )
