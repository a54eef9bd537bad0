"""A run on an open Mosquitto while a third-party client forges, relabels, replays and sprays garbage on every topic.

The issue's "done when": the run ends with exit 0, every device on the server's final version and hash, the
refusals counted by reason, and no catch-up sent (no device missed anything: its links are clean).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import time
from pathlib import Path

import aiomqtt
import numpy as np
import pytest
import yaml

from testbed import cli
from testbed.core.manifest import UpdateManifest
from testbed.core.signing import SigningKey
from testbed.core.topics import Topics
from testbed.core.wire import HEADER, HEADER_BYTES, decode_header, split_chunks

pytestmark = pytest.mark.timeout(240)

DEVICES = 3
ROUNDS = 6


def scenario_file(folder: Path, port: int) -> Path:
    path = folder / "hostile.yaml"
    path.write_text(yaml.safe_dump({
        "name": "hostile", "seed": 4, "rounds": ROUNDS, "round_timeout": "20s",
        "data": {"initial_samples": 200, "new_samples_per_round": 60},
        # round0 full: the first deployment is a snapshot, whose layout the attacker copies for its forged "v1000"
        "update": {"epochs": 2, "ratio": 0.1, "round0": "full"}, "model": {"hidden": [16]},
        "devices": [{"profile": "rpi4", "count": DEVICES}],
        "broker": {"url": f"mqtt://127.0.0.1:{port}"},
        "metrics": {"enabled": False},
    }))
    return path


class Attacker:
    """A third-party client: learns the run from its retained config, keeps what it sees, then abuses it."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.topics: Topics | None = None
        self.devices: list[str] = []
        self.manifests: list[UpdateManifest] = []
        self.chunks: dict[tuple[str, int], bytes] = {}
        self.layout: bytes | None = None
        """A genuine full snapshot seen on the broker: the template of the forgeries."""
        self.bursts = 0
        self.random = random.Random(11)
        self.sent: set[tuple[str, bytes]] = set()  # its own publications, which come back to it

    async def watch(self) -> None:
        await self.client.subscribe("testbed/+/config", qos=1)
        await self.client.subscribe("testbed/+/manifest", qos=1)
        await self.client.subscribe("testbed/+/update/+/+", qos=1)
        async for message in self.client.messages:
            topic, payload = str(message.topic), bytes(message.payload)
            if (topic, payload) in self.sent:
                continue
            if topic.endswith("/config") and payload.startswith(b'{"run"'):
                config = json.loads(payload)
                self.topics, self.devices = Topics(config["run"]), sorted(config["devices"])
            elif self.topics is None:
                continue
            elif topic == self.topics.manifest:
                self.manifests.append(UpdateManifest.from_json(payload))
            elif (chunk := self.topics.parse_update_chunk(topic)) is not None:
                self.chunks.setdefault(chunk, payload)

    def genuine(self) -> list[UpdateManifest]:
        return [manifest for manifest in self.manifests if manifest.signature and manifest.target_version < 100]

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.sent.add((topic, payload))
        await self.client.publish(topic, payload, qos=1, retain=retain)

    async def publish_update(self, manifest: UpdateManifest, payload: bytes, manifest_topic: str) -> None:
        assert self.topics is not None
        await self.publish(manifest_topic, manifest.to_json())
        for index, chunk in enumerate(split_chunks(payload, manifest.chunk_size)):
            await self.publish(self.topics.update_chunk(manifest.key, index), chunk)

    async def burst(self) -> None:
        """Every attack once: forged, relabelled, replayed, then garbage on every topic of the run."""
        topics = self.topics
        assert topics is not None
        genuine = self.genuine()
        if genuine and self.layout is None:
            first = genuine[0]
            whole = b"".join(self.chunks.get((first.key, index), b"") for index in range(first.chunk_count))
            if len(whole) == first.total_bytes and first.base_version is None:
                self.layout = whole
        manifest_topics = [topics.manifest] + [topics.device(device, "manifest") for device in self.devices]
        if self.layout is not None:
            # 1. forged: a well-formed snapshot "v1000" of constant weights, unsigned and signed by another key
            constant = _constant_snapshot(self.layout, 1000)
            unsigned = UpdateManifest.for_payload(constant, run_id=topics.run_id, round_index=9, key="1000",
                                                  base_version=None, chunk_size=256, published_at=time.time())
            for manifest in (unsigned, unsigned.signed(SigningKey.generate())):
                for manifest_topic in manifest_topics:
                    await self.publish_update(manifest, constant, manifest_topic)
        for manifest in genuine[-2:]:
            # 2. relabelled: a genuine manifest moved to version 900 (its signature no longer fits)
            await self.publish(topics.manifest, dataclasses.replace(manifest, target_version=900).to_json())
            # 3. replayed: the genuine manifest and its chunks, verbatim
            await self.publish(self.random.choice(manifest_topics), manifest.to_json())
            for index in range(manifest.chunk_count):
                chunk = self.chunks.get((manifest.key, index))
                if chunk is not None:
                    await self.publish(topics.update_chunk(manifest.key, index), chunk)
            # 4. chunks of the genuine update, forged, racing the real ones
            await self.publish(topics.update_chunk(manifest.key, 0), bytes(manifest.chunk_size))
        # 5. garbage on every topic of the run (but the config, whose retained copy attach reads)
        garbage = [self.random.randbytes(self.random.randrange(0, 400)), b"{}", b"[]", b"null", b'{"device": 1}']
        targets = [topics.manifest, topics.update_chunk("4", 0), topics.update_chunk("9" * 4301, 1),
                   topics.prefix + "update/4/" + "7" * 4301, topics.prefix + "update/" + "k" * 3000 + "/0"]
        for device in self.devices:
            targets += [topics.device(device, kind) for kind in ("manifest", "report", "nack", "hello", "status")]
            targets.append(topics.device_update_chunk(device, "5-from-4", 0))
        for topic in targets:
            await self.publish(topic, self.random.choice(garbage))
        self.bursts += 1


def _constant_snapshot(template: bytes, version: int) -> bytes:
    """`template` (a genuine full fp32 snapshot) with every weight 0.5, relabelled `version` and re-hashed:
    a third party can compute every unkeyed hash itself (the post-apply hash is left as it was)."""
    header = decode_header(template)
    body = bytearray(template)
    start = len(template) - header.value_bytes - header.dense_bytes
    body[start:] = np.full((header.value_bytes + header.dense_bytes) // 4, 0.5, dtype="<f4").tobytes()
    fields = list(HEADER.unpack_from(body))
    fields[7] = version  # target_version
    fields[13] = hashlib.sha256(bytes(body[HEADER_BYTES:])).digest()  # payload hash
    body[:HEADER_BYTES] = HEADER.pack(*fields)
    return bytes(body)


async def test_a_hostile_third_party_cannot_move_or_stall_any_device(mosquitto: tuple[str, int],
                                                                      tmp_path: Path) -> None:
    host, port = mosquitto
    out = tmp_path / "out"
    path = scenario_file(tmp_path, port)
    async with aiomqtt.Client(host, port, identifier=f"attacker-{time.monotonic_ns()}") as client:
        attacker = Attacker(client)
        watcher = asyncio.create_task(attacker.watch())
        run = asyncio.create_task(asyncio.to_thread(cli.main, ["run", str(path), "--out", str(out)]))
        try:
            attacked = 0
            while not run.done():
                # One burst of every attack each time the server announces a version: every round is attacked,
                # and the links are not flooded (flooding is what the broker's ACLs are for, see test_broker_acl).
                if attacker.topics is not None and attacker.devices and len(attacker.genuine()) > attacked:
                    attacked = len(attacker.genuine())
                    await attacker.burst()
                await asyncio.wait({run}, timeout=0.02)
            exit_code = await run
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    assert exit_code == 0
    summary = json.loads((out / "summary.json").read_text())
    versions = sum(record["sent"] for record in summary["rounds"])
    # a burst as each version is announced (two announcements during one burst make one burst)
    assert versions >= 4 and attacker.bursts >= 3 and attacker.layout is not None, "the attack never got going"
    server = summary["server"]
    refused: dict[str, int] = {}
    for device_id, state in summary["devices"].items():
        assert (state["final_version"], state["weights_hash"]) == (server["final_version"], server["weights_hash"]), \
            device_id
        for reason, count in state["rejected_by_reason"].items():
            refused[reason] = refused.get(reason, 0) + count
    assert {"unsigned", "bad_signature", "not_newer", "malformed", "bad_chunk"} <= set(refused), refused
    # No device missed anything, so nothing but the rounds' own broadcasts went out: no catch-up at all.
    assert server["published_bytes"] == sum(record["update_bytes"] for record in summary["rounds"])
