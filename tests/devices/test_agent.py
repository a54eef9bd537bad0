"""The device agent against a real Mosquitto broker: good updates apply, bad ones are refused whole."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import numpy as np
import pytest

from devices.agent import DeviceAgent, DeviceConfig
from devices.profiles import get_device_profile
from server.update_server import UpdateServer
from testbed.inference import TorchInference
from testbed.core.manifest import UpdateManifest, payload_digest
from testbed.core.mqtt import MqttEndpoint
from testbed.publisher import UpdatePublisher
from testbed.core.scenario import parse_scenario
from testbed.core.topics import Topics
from testbed.core.wire import HEADER_BYTES, encode_full_model, encode_update, split_chunks, weights_hash

SCENARIO = parse_scenario({
    "name": "agent-test", "seed": 3, "rounds": 3,
    "model": {"hidden": [16]},
    "update": {"strategy": "dpu", "ratio": 0.1, "epochs": 2},
    "devices": [{"name": "dev-a", "profile": "rpi4"}],
})


@pytest.fixture(scope="module")
def trained() -> tuple[UpdateServer, list[Any]]:
    server = UpdateServer(SCENARIO)
    return server, [server.run_round(0), server.run_round(1)]


class Harness:
    """One agent plus a control client that publishes raw messages and reads the device's replies."""

    def __init__(self, agent: DeviceAgent, control: aiomqtt.Client, topics: Topics) -> None:
        self.agent = agent
        self.control = control
        self.topics = topics
        self.replies: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    async def publish_update(self, payload: bytes, target_version: int, base_version: int | None,
                             digest: str | None = None, key: str | None = None, chunk_size: int = 200) -> None:
        key = key or str(target_version)
        chunks = split_chunks(payload, chunk_size)
        manifest = UpdateManifest(
            run_id=self.topics.run_id, round_index=target_version - 1, key=key, target_version=target_version,
            base_version=base_version, total_bytes=len(payload), chunk_count=len(chunks), chunk_size=chunk_size,
            payload_sha256=digest or payload_digest(payload), published_at=time.time(),
        )
        await self.control.publish(self.topics.manifest, manifest.to_json(), qos=1, retain=True)
        for index, chunk in enumerate(chunks):
            await self.control.publish(self.topics.update_chunk(key, index), chunk, qos=1)

    async def reply(self, timeout_s: float = 10.0) -> tuple[str, dict[str, Any]]:
        return await asyncio.wait_for(self.replies.get(), timeout_s)


@pytest.fixture
async def harness(mosquitto: tuple[str, int], trained: tuple[UpdateServer, list[Any]]) -> AsyncIterator[Harness]:
    server, _ = trained
    host, port = mosquitto
    topics = Topics(f"agent-{time.monotonic_ns()}")
    endpoint = MqttEndpoint(host, port)
    inference = TorchInference(server.build_device_model(), server.device_test_split(0))
    config = DeviceConfig("dev-a", get_device_profile("rpi4"), 50_000.0, 50_000.0, init_seed=SCENARIO.seed)
    agent = DeviceAgent(config, topics, endpoint, inference)
    async with endpoint.client(f"{topics.run_id}-control") as control:
        await control.subscribe(topics.devices("report"), qos=1)
        await control.subscribe(topics.devices("nack"), qos=1)
        h = Harness(agent, control, topics)

        async def pump() -> None:
            async for message in control.messages:
                kind = topics.parse_device_topic(str(message.topic))
                assert kind is not None
                await h.replies.put((kind[1], json.loads(bytes(message.payload))))

        tasks = [asyncio.create_task(agent.run()), asyncio.create_task(pump())]
        await asyncio.wait_for(agent.connected.wait(), 10)
        try:
            yield h
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_full_then_sparse_update_apply_and_report(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, second) = trained
    await harness.publish_update(encode_full_model(first.weights, 1), 1, None)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1
    assert report["weights_hash"] == weights_hash(first.weights).hex()
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["energy_joules"] > 0 and set(report["energy_joules_by_phase"]) == {"receive", "transmit", "compute", "idle"}
    await harness.publish_update(encode_update(first.weights, second.weights, 1, 2), 2, 1)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 2
    assert report["weights_hash"] == weights_hash(second.weights).hex()
    assert harness.agent.state.version == 2


async def test_update_for_another_base_is_refused_and_nothing_changes(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, second) = trained
    before = {name: array.copy() for name, array in harness.agent.state.weights.items()}
    await harness.publish_update(encode_update(first.weights, second.weights, 1, 2), 2, 1)
    kind, nack = await harness.reply()
    assert kind == "nack" and nack["version"] == 0 and "version 1" in nack["reason"]
    assert harness.agent.state.version == 0
    assert all(np.array_equal(before[name], harness.agent.state.weights[name]) for name in before)


async def test_corrupted_payload_with_matching_digest_is_refused_whole(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, _) = trained
    payload = bytearray(encode_full_model(first.weights, 1))
    payload[HEADER_BYTES + 40] ^= 0xFF  # a value byte: the wire's payload hash no longer matches
    before = weights_hash(harness.agent.state.weights)
    await harness.publish_update(bytes(payload), 1, None)
    kind, nack = await harness.reply()
    assert kind == "nack" and "hash" in nack["reason"].lower()
    assert harness.agent.state.version == 0 and weights_hash(harness.agent.state.weights) == before
    assert harness.agent.state.rejected_updates == 1
    # The device still takes the good update afterwards.
    await harness.publish_update(encode_full_model(first.weights, 1), 1, None, key="1-retry")
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1


async def test_chunks_not_matching_the_manifest_digest_are_refused(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, _) = trained
    payload = encode_full_model(first.weights, 1)
    await harness.publish_update(payload, 1, None, digest="0" * 64)
    kind, nack = await harness.reply()
    assert kind == "nack" and "SHA-256" in nack["reason"]
    assert harness.agent.state.version == 0


async def test_garbage_manifest_is_refused(harness: Harness) -> None:
    await harness.control.publish(harness.topics.manifest, b"{not json", qos=1, retain=True)
    kind, nack = await harness.reply()
    assert kind == "nack" and "manifest" in nack["reason"]
    assert harness.agent.state.version == 0


async def test_publisher_catch_up_brings_a_lagging_device_to_the_latest(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, second) = trained
    publisher = UpdatePublisher(harness.control, harness.topics, chunk_size=512)
    publisher.versions[1] = first.weights
    publisher.versions[2] = second.weights
    publisher.latest_version = 2
    published = await publisher.publish_catch_up(1, "dev-a", device_version=0)
    assert published.manifest.base_version is None  # the device holds nothing: a full snapshot
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 2
    assert report["weights_hash"] == weights_hash(second.weights).hex()


async def test_device_regenerates_w0_and_applies_updates_relative_to_it(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    server, (first, second) = trained
    assert weights_hash(harness.agent.receiver.initial_weights) == weights_hash(server.initial_weights)
    await harness.publish_update(encode_full_model(first.weights, 1), 1, None)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1
    # A re-initialisation round: a sparse update relative to w⁰ (version 0) while the device holds v1.
    target = {name: array.copy() for name, array in server.initial_weights.items()}
    first_partial = next(name for name, array in target.items() if array.ndim > 1)
    target[first_partial].flat[:5] += 1.0
    await harness.publish_update(encode_update(server.initial_weights, target, 0, 2), 2, 0)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 2
    assert report["weights_hash"] == weights_hash(target).hex()
