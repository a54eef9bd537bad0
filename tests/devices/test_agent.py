"""The device agent against a real Mosquitto broker: good updates apply, bad ones are refused whole."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiomqtt
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devices.agent import DeviceAgent, DeviceConfig
from devices.profiles import get_device_profile
from server.update_server import UpdateServer
from testbed.inference import TorchInference
from testbed.core.manifest import RejectReason, UpdateManifest
from testbed.core.mqtt import MqttEndpoint
from testbed.core.signing import SigningKey
from testbed.publisher import UpdatePublisher
from testbed.core.scenario import parse_scenario
from testbed.core.topics import Topics
from testbed.core.wire import HEADER_BYTES, decode_header, encode_full_model, encode_update, split_chunks, weights_hash

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


KEY = SigningKey.generate()
"""The run's signing key in these tests; the agent trusts its public half."""


class Harness:
    """One agent plus a control client that publishes raw messages and reads the device's replies."""

    def __init__(self, agent: DeviceAgent, control: aiomqtt.Client, topics: Topics) -> None:
        self.agent = agent
        self.control = control
        self.topics = topics
        self.replies: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()

    def manifest(self, payload: bytes, base_version: int | None, key: str | None = None, chunk_size: int = 200,
                 **changes: Any) -> UpdateManifest:
        """The signed manifest the server would publish for `payload`, with `changes` made before signing."""
        target = decode_header(payload).target_version
        unsigned = UpdateManifest.for_payload(
            payload, run_id=self.topics.run_id, round_index=target - 1, key=key or str(target),
            base_version=base_version, chunk_size=chunk_size, published_at=time.time())
        return dataclasses.replace(unsigned, **changes).signed(KEY)

    async def publish_update(self, payload: bytes, target_version: int, base_version: int | None,
                             key: str | None = None, chunk_size: int = 200,
                             manifest: UpdateManifest | None = None) -> None:
        manifest = manifest or self.manifest(payload, base_version, key, chunk_size)
        await self.control.publish(self.topics.manifest, manifest.to_json(), qos=1, retain=True)
        for index, chunk in enumerate(split_chunks(payload, manifest.chunk_size)):
            await self.control.publish(self.topics.update_chunk(manifest.key, index), chunk, qos=1)

    async def reply(self, timeout_s: float = 10.0) -> tuple[str, dict[str, Any]]:
        return await asyncio.wait_for(self.replies.get(), timeout_s)


def make_agent(mosquitto: tuple[str, int], server: UpdateServer) -> tuple[DeviceAgent, Topics, MqttEndpoint]:
    host, port = mosquitto
    topics = Topics(f"agent-{time.monotonic_ns()}")
    endpoint = MqttEndpoint(host, port)
    inference = TorchInference(server.build_device_model(), server.device_test_split(0))
    config = DeviceConfig("dev-a", get_device_profile("rpi4"), 50_000.0, 50_000.0, init_seed=SCENARIO.seed)
    return DeviceAgent(config, topics, endpoint, inference, KEY.trusted_key), topics, endpoint


@asynccontextmanager
async def running(agent: DeviceAgent, topics: Topics, endpoint: MqttEndpoint) -> AsyncIterator[Harness]:
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


@pytest.fixture
async def harness(mosquitto: tuple[str, int], trained: tuple[UpdateServer, list[Any]]) -> AsyncIterator[Harness]:
    async with running(*make_agent(mosquitto, trained[0])) as h:
        yield h


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
    assert nack["reason"].startswith("wrong_base") and nack["session"] == 0
    assert harness.agent.state.version == 0
    assert all(np.array_equal(before[name], harness.agent.state.weights[name]) for name in before)


async def test_corrupted_payload_with_matching_digest_is_refused_whole(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, _) = trained
    payload = bytearray(encode_full_model(first.weights, 1))
    payload[HEADER_BYTES + 40] ^= 0xFF  # a value byte: the wire's payload hash no longer matches
    before = weights_hash(harness.agent.state.weights)
    await harness.publish_update(bytes(payload), 1, None)
    kind, nack = await harness.reply()
    assert kind == "nack" and "hash" in nack["reason"].lower() and nack["reason"].startswith("bad_update")
    assert harness.agent.state.version == 0 and weights_hash(harness.agent.state.weights) == before
    assert harness.agent.receiver.rejections == {RejectReason.BAD_UPDATE: 1}
    # The device still takes the good update afterwards.
    await harness.publish_update(encode_full_model(first.weights, 1), 1, None, key="1-from-0")
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1


async def test_injected_chunks_are_refused_silently_and_the_genuine_update_applies(
        harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, _) = trained
    payload = encode_full_model(first.weights, 1)
    manifest = harness.manifest(payload, None)
    await harness.control.publish(harness.topics.manifest, manifest.to_json(), qos=1, retain=True)
    chunks = split_chunks(payload, manifest.chunk_size)
    for index, chunk in enumerate(chunks):
        # a third party races every genuine chunk with a forged one of the same length
        await harness.control.publish(harness.topics.update_chunk("1", index), bytes(len(chunk)), qos=1)
        await harness.control.publish(harness.topics.update_chunk("1", index), chunk, qos=1)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1  # no nack came first: forged chunks get no answer
    assert report["rejected_by_reason"] == {"bad_chunk": len(chunks)}


async def test_garbage_manifest_is_refused_without_a_nack(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    await harness.control.publish(harness.topics.manifest, b"{not json", qos=1, retain=True)
    await harness.publish_update(encode_full_model(trained[1][0].weights, 1), 1, None)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1
    assert report["rejected_by_reason"] == {"malformed": 1}


def _forgeries(harness: Harness, payload: bytes) -> dict[str, UpdateManifest]:
    genuine = harness.manifest(payload, None, key="5")
    other_key = SigningKey.generate()
    return {
        "unsigned": dataclasses.replace(genuine, signature=""),
        "bad_signature": dataclasses.replace(genuine, target_version=1000),  # relabelled after signing
        "wrong_run": harness.manifest(payload, None, key="5", run_id="another-run"),
        "expired": harness.manifest(payload, None, key="5", expires_at_ms=int((time.time() - 1) * 1000)),
        "wrong_model": harness.manifest(payload, None, key="5", model_fingerprint="00" * 16),
        "other key": dataclasses.replace(genuine, signature="").signed(other_key),
    }


async def test_forged_relabelled_foreign_and_expired_updates_never_move_the_version(
        harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, second) = trained
    # A well-formed snapshot "v5" of constant weights: every field right but who signed it.
    constant = {name: np.full_like(array, 0.5) for name, array in first.weights.items()}
    forged_payload = encode_full_model(constant, 5)
    for manifest in _forgeries(harness, forged_payload).values():
        await harness.publish_update(forged_payload, 5, None, manifest=manifest)
    await harness.publish_update(encode_full_model(first.weights, 1), 1, None)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1  # no nack and no report of v5 before it
    assert report["weights_hash"] == weights_hash(first.weights).hex()
    assert report["rejected_by_reason"] == {"unsigned": 1, "bad_signature": 2, "wrong_run": 1, "expired": 1,
                                            "wrong_model": 1}
    # The device still follows the server: the next genuine update applies.
    await harness.publish_update(encode_update(first.weights, second.weights, 1, 2), 2, 1)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 2


async def test_replayed_and_rolled_back_updates_are_refused(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, second) = trained
    v1 = encode_full_model(first.weights, 1)
    await harness.publish_update(v1, 1, None)
    await harness.publish_update(encode_update(first.weights, second.weights, 1, 2), 2, 1)
    assert (await harness.reply())[1]["version"] == 1
    assert (await harness.reply())[1]["version"] == 2
    await harness.publish_update(v1, 1, None, key="1-from-0")  # a genuine old update, replayed
    await harness.publish_update(encode_update(first.weights, second.weights, 1, 2), 2, 1)  # and the current one
    await harness.publish_update(encode_full_model(first.weights, 3), 3, None)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 3
    assert report["rejected_by_reason"] == {"not_newer": 2}


@pytest.mark.parametrize("topic_suffix", [
    "update/4/" + "9" * 4301, "update/" + "k" * 5000 + "/0", "update/4/-1", "update/4/0x1", "update/4/١",
    "device/dev-a/update/4/" + "1" * 20, "device/dev-a/manifest", "manifest/extra", "update/4", "update//0",
    "update/4/0/1",
])
async def test_odd_topics_cost_only_their_message(harness: Harness, trained: tuple[UpdateServer, list[Any]],
                                                  topic_suffix: str) -> None:
    await harness.control.publish(harness.topics.prefix + topic_suffix, b"\x00garbage", qos=1)
    await harness.publish_update(encode_full_model(trained[1][0].weights, 1), 1, None)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1
    assert harness.agent.state.failed_messages == 0


async def test_an_unexpected_error_in_one_message_is_contained(harness: Harness, trained: tuple[UpdateServer, list[Any]],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    original = harness.agent.receiver.add_manifest_payload
    calls = []

    def explode_once(payload: bytes) -> Any:
        calls.append(payload)
        if len(calls) == 1:
            raise RuntimeError("a bug in handling this one message")
        return original(payload)

    monkeypatch.setattr(harness.agent.receiver, "add_manifest_payload", explode_once)
    await harness.control.publish(harness.topics.manifest, b"{}", qos=1)
    await harness.publish_update(encode_full_model(trained[1][0].weights, 1), 1, None)
    kind, report = await harness.reply()
    assert kind == "report" and report["version"] == 1
    assert harness.agent.state.failed_messages == 1


async def test_publisher_catch_up_brings_a_lagging_device_to_the_latest(harness: Harness, trained: tuple[UpdateServer, list[Any]]) -> None:
    _, (first, second) = trained
    publisher = UpdatePublisher(harness.control, harness.topics, chunk_size=512, signing_key=KEY)
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


# Brokers disconnect a publisher whose topic holds control characters or surrogates (MQTT 3.1.1 §1.5.3):
# that is the broker protecting itself, not something a device ever sees, so such topics are not drawn.
# Nor are the topics the harness itself reads the device's replies on (device/+/report, device/+/nack): garbage
# there reaches the harness, not the device.
_HARNESS_TOPIC = re.compile(r"device/[^/]*/(report|nack)")
_TOPIC_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Cn", "Co")), max_size=12)
_TOPIC_PARTS = st.sampled_from(["update", "device", "dev-a", "manifest", "nack", "report", "1", "0", "4", "+", "#",
                                "", "1-from-0", "9" * 12]) | _TOPIC_TEXT
_HOSTILE_MESSAGES = st.lists(st.tuples(
    st.lists(_TOPIC_PARTS, min_size=1, max_size=6).map("/".join).filter(
        lambda topic: "+" not in topic and "#" not in topic and "\x00" not in topic
        and not _HARNESS_TOPIC.fullmatch(topic)),
    st.binary(max_size=300) | st.sampled_from([b"{}", b"[]", b"null", b'{"run_id": 1}', b"\xff" * 10])),
    min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_HOSTILE_MESSAGES)
def test_hypothesis_topics_and_payloads_through_a_real_broker_cost_only_themselves(
        mosquitto: tuple[str, int], trained: tuple[UpdateServer, list[Any]],
        messages: list[tuple[str, bytes]]) -> None:
    """Any topic under the run's prefix with any payload: the device refuses or ignores it and still updates."""
    async def scenario() -> None:
        async with running(*make_agent(mosquitto, trained[0])) as harness:
            for suffix, payload in messages:
                await harness.control.publish(harness.topics.prefix + suffix, payload, qos=1)
            await harness.publish_update(encode_full_model(trained[1][0].weights, 1), 1, None)
            kind, report = await harness.reply()
            assert (kind, report["version"]) == ("report", 1)
            assert harness.agent.state.failed_messages == 0

    asyncio.run(asyncio.wait_for(scenario(), 60))
