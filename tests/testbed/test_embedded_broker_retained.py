"""The embedded broker sends each subscriber exactly the retained messages its own filters match, as Mosquitto does."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from testbed.broker import (AMQTT_RELEASE_CORRECTED, BrokerError, EmbeddedBroker, _RunBroker, check_amqtt_release,
                            retained_delivery_qos)
from testbed.broker_access import BrokerAccess, Identity
from testbed.core.mqtt import MqttEndpoint

WAIT_S = 15.0
"""Longest wait for one subscriber's retained messages (they come at once; a busy machine can take seconds)."""

Delivery = tuple[str, bytes, int]
"""What a subscriber received: topic, payload, QoS (every one must carry the RETAIN flag)."""


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a topic name matches a (valid) topic filter, by MQTT 3.1.1 section 4.7.

    `+` matches exactly one level (also an empty one), `#` as the last level matches any number of levels
    including none ("a/#" matches "a"), and a filter starting with a wildcard matches no topic that starts
    with `$` [MQTT-4.7.2-1].
    """
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


def retained_payload(topic: str) -> bytes:
    """Each topic's own payload, so that a topic delivered with another's payload shows."""
    return f"retained on {topic!r}".encode()


@dataclass(frozen=True)
class RetainedCase:
    """Retained messages (topic → QoS they were published at) and subscribers (each: its filters and their QoS),
    which connect one after another and stay connected."""

    retained: dict[str, int]
    subscribers: list[dict[str, int]]

    def expected(self, subscriber: int) -> Counter[Delivery]:
        """One delivery per retained message per own subscription that matches it (MQTT-3.3.1-6), at the lower
        of the two QoS (MQTT 3.1.1 section 3.8.4)."""
        return Counter((topic, retained_payload(topic), min(filter_qos, topic_qos))
                       for topic_filter, filter_qos in self.subscribers[subscriber].items()
                       for topic, topic_qos in self.retained.items() if topic_matches(topic_filter, topic))


def topic_names(first_levels: tuple[str, ...]) -> st.SearchStrategy[str]:
    levels = st.sampled_from(("a", "b", ""))  # "" is an empty level: "a//b", "/a"
    return st.builds(lambda first, rest: "/".join((first, *rest)), st.sampled_from(first_levels),
                     st.lists(levels, max_size=2)).filter(bool)


def topic_filters(first_levels: tuple[str, ...]) -> st.SearchStrategy[str]:
    levels = st.sampled_from(("a", "b", "", "+"))
    single_level = st.builds(lambda first, rest: [first, *rest], st.sampled_from((*first_levels, "+")),
                             st.lists(levels, max_size=2))
    levels_then_hash = st.builds(lambda head: [*head, "#"], st.lists(levels, max_size=2))
    return st.one_of(single_level, levels_then_hash).map("/".join).filter(bool)


def retained_cases(first_levels: tuple[str, ...]) -> st.SearchStrategy[RetainedCase]:
    qos = st.integers(0, 2)
    return st.builds(RetainedCase,
                     st.dictionaries(topic_names(first_levels), qos, min_size=1, max_size=8),
                     st.lists(st.dictionaries(topic_filters(first_levels), qos, min_size=1, max_size=3),
                              min_size=1, max_size=4))


async def _received_until(client: aiomqtt.Client, expected: Counter[Delivery]) -> Counter[Delivery]:
    """What `client` received once it has all of `expected` (or WAIT_S passed), plus whatever else is queued."""
    received: Counter[Delivery] = Counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while (expected - received or len(client.messages)) and loop.time() < deadline:
        try:
            message = await asyncio.wait_for(anext(client.messages), deadline - loop.time())
        except asyncio.TimeoutError:
            break
        assert message.retain, f"{message.topic} came without the RETAIN flag"
        received[(str(message.topic), bytes(message.payload), message.qos)] += 1
    return received


async def deliveries(endpoint: MqttEndpoint, case: RetainedCase, name: str) -> list[Counter[Delivery]]:
    """Publish the case's retained messages, connect its subscribers one after another (each staying connected
    while the next connects and subscribes), and return what each received; then clear the retained messages.

    A broker handles one client's packets in order, so after a SUBSCRIBE round trip on a filter no retained
    topic matches (`barrier/...`), the messages published before it are stored and those sent for the
    subscriptions before it are on their way or read.
    """
    async with endpoint.client(f"{name}-publisher") as publisher:
        for topic, qos in case.retained.items():
            await publisher.publish(topic, retained_payload(topic), qos=qos, retain=True)
        await publisher.subscribe("barrier/publisher")
    received: list[Counter[Delivery]] = []
    async with AsyncExitStack() as subscribers:
        for index, filters in enumerate(case.subscribers):
            subscriber = await subscribers.enter_async_context(endpoint.client(f"{name}-subscriber-{index}"))
            for topic_filter, qos in filters.items():
                await subscriber.subscribe(topic_filter, qos=qos)
            await subscriber.subscribe(f"barrier/{index}")
            received.append(await _received_until(subscriber, case.expected(index)))
    async with endpoint.client(f"{name}-cleaner") as cleaner:
        for topic in case.retained:
            await cleaner.publish(topic, b"", qos=1, retain=True)
        await cleaner.subscribe("barrier/cleaner")
    return received


def embedded_deliveries(case: RetainedCase, name: str) -> list[Counter[Delivery]]:
    """`deliveries` on a fresh embedded broker."""
    async def scenario() -> list[Counter[Delivery]]:
        async with EmbeddedBroker() as broker:
            return await deliveries(MqttEndpoint(broker.host, broker.port), case, name)

    return asyncio.run(asyncio.wait_for(scenario(), 120))


def assert_exact(case: RetainedCase, received: list[Counter[Delivery]]) -> None:
    for index, got in enumerate(received):
        expected = case.expected(index)
        assert got == expected, (f"subscriber {index} with {case.subscribers[index]} of retained {case.retained}: "
                                 f"missing {dict(expected - got)}, not matching its filters {dict(got - expected)}")


def run_cases(check: Callable[[RetainedCase], None], first_levels: tuple[str, ...]) -> None:
    settings(max_examples=25, deadline=None)(given(retained_cases(first_levels))(check))()


def test_the_embedded_broker_sends_each_subscriber_only_what_its_own_filters_match() -> None:
    def check(case: RetainedCase) -> None:
        assert_exact(case, embedded_deliveries(case, "embedded"))

    run_cases(check, ("a", "b", ""))


def test_mosquitto_sends_each_subscriber_what_the_spec_model_says(
        start_mosquitto: Callable[[str], int]) -> None:
    """The reference: the model above is what Mosquitto does, `$` topics included (amqtt refuses a client's
    PUBLISH on a `$` topic, so the embedded broker's `$` rule is checked on its matcher below)."""
    endpoint = MqttEndpoint("127.0.0.1", start_mosquitto("allow_anonymous true"))

    def check(case: RetainedCase) -> None:
        assert_exact(case, asyncio.run(asyncio.wait_for(deliveries(endpoint, case, "mosquitto"), 120)))

    run_cases(check, ("a", "b", "", "$x"))


def test_the_embedded_brokers_matcher_follows_the_spec_with_dollar_topics() -> None:
    first_levels = ("a", "", "$x", "$SYS")

    async def build() -> _RunBroker:  # amqtt's Broker is built in a running loop; its matcher is pure
        return _RunBroker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:0"}}})

    broker = asyncio.run(build())

    @settings(max_examples=400)
    @given(topic_names(first_levels), topic_filters(first_levels))
    def check(topic: str, topic_filter: str) -> None:
        assert broker._matches(topic, topic_filter) == topic_matches(topic_filter, topic)

    check()


def test_a_new_client_gets_no_retained_status_for_another_clients_subscription() -> None:
    """The case that was seen: `testbed device` read its run config and got `device/rpi4-0/status` instead,
    because the run's own client held `device/+/status` (amqtt 0.12.1 sent a connecting client the retained
    messages of every filter any client held)."""
    async def scenario() -> None:
        async with EmbeddedBroker() as broker:
            endpoint = MqttEndpoint(broker.host, broker.port)
            status: Delivery = ("testbed/r/device/rpi4-0/status", b"online", 1)
            config: Delivery = ("testbed/r/config", b"config", 1)
            async with endpoint.client("run") as run:
                await run.publish(status[0], status[1], qos=1, retain=True)
                await run.publish(config[0], config[1], qos=1, retain=True)
                await run.subscribe("testbed/r/device/+/status", qos=1)
                await run.subscribe("barrier/run")
                assert await _received_until(run, Counter([status])) == Counter([status])
                async with endpoint.client("attach") as attach:
                    await attach.subscribe(config[0], qos=1)
                    await attach.subscribe("barrier/attach")
                    assert await _received_until(attach, Counter([config])) == Counter([config])

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_device_identity_gets_no_retained_message_its_topic_rules_deny() -> None:
    """With device identities, the leak also crossed the ACLs: rpi4-1 received rpi4-0's retained status because
    the server's identity held `testbed/+/device/#` (the retained path asks no topic plugin; its own filters were)."""
    access = BrokerAccess(Identity("server", "s"),
                          {"rpi4-0": Identity("rpi4-0", "0"), "rpi4-1": Identity("rpi4-1", "1")})
    status: Delivery = ("testbed/r/device/rpi4-0/status", b"online", 1)
    config: Delivery = ("testbed/r/config", b"config", 1)

    async def scenario() -> None:
        async with EmbeddedBroker(access=access) as broker:
            endpoint = MqttEndpoint(broker.host, broker.port)
            async with endpoint.with_credentials("rpi4-0", "0").client("rpi4-0") as device:
                await device.publish(status[0], status[1], qos=1, retain=True)
                await device.subscribe("testbed/r/manifest", qos=1)  # a round trip: the status is stored
            async with endpoint.with_credentials("server", "s").client("server") as server:
                await server.publish(config[0], config[1], qos=1, retain=True)
                await server.subscribe("testbed/+/device/#", qos=1)
                assert await _received_until(server, Counter([status])) == Counter([status])
                async with endpoint.with_credentials("rpi4-1", "1").client("rpi4-1") as other:
                    await other.subscribe(config[0], qos=1)
                    await other.subscribe("testbed/r/manifest", qos=1)
                    assert await _received_until(other, Counter([config])) == Counter([config])

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_message_retained_at_qos_0_reaches_a_qos_2_subscriber_at_qos_0() -> None:
    """amqtt 0.12.1 sent it at the subscription's QoS (`retained.qos or qos` takes 0 for missing)."""
    case = RetainedCase({"a/0": 0, "a/1": 1, "a/2": 2}, [{"a/#": 2}, {"+/+": 1}])
    received = embedded_deliveries(case, "qos")
    assert [sorted(qos for _topic, _payload, qos in got.elements()) for got in received] == [[0, 1, 2], [0, 1, 1]]


def test_retained_messages_go_at_the_lower_qos() -> None:
    assert [retained_delivery_qos(granted, 1) for granted in (0, 1, 2)] == [0, 1, 1]
    assert retained_delivery_qos(2, 0) == 0
    assert retained_delivery_qos(1, None) == 1


def test_another_amqtt_release_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    check_amqtt_release(AMQTT_RELEASE_CORRECTED)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.13.0")

    async def scenario() -> None:
        async with EmbeddedBroker():
            pass

    with pytest.raises(BrokerError) as refused:
        asyncio.run(scenario())
    assert str(refused.value) == (
        "the embedded broker needs amqtt 0.12.1 (testbed.broker corrects how that release delivers retained "
        "messages), but amqtt 0.13.0 is installed: pip install 'amqtt==0.12.1', or use broker: mosquitto")
