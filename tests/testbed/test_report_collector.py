"""Device messages off a real Mosquitto broker into typed queues; a round's collection of reports and catch-ups."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import pytest

from testbed.core.messages import DeviceNack, DeviceReport, DeviceStatus
from testbed.core.mqtt import MqttEndpoint
from testbed.core.topics import Topics
from testbed.control_connection import ControlConnection
from testbed.report_collector import MAX_CATCH_UPS_PER_ROUND, DeviceMessages, ReportCollector
from testbed.run_summary import RunError

PROFILES = {"dev-a": "rpi4", "dev-b": "jetson-nano"}


def report(device: str, version: int) -> DeviceReport:
    phases = {"receive": 0.1, "transmit": 0.1, "compute": 0.1, "idle": 0.1}
    return DeviceReport(device=device, profile=PROFILES.get(device, "rpi4"), round=version - 1, version=version,
                        weights_hash="00" * 32, accuracy=0.5, update_bytes=10, received_bytes=20,
                        transmitted_bytes=5, total_received_bytes=20, delivery_seconds=0.2, apply_seconds=0.01,
                        evaluate_seconds=0.01, energy_joules=0.4, energy_joules_by_phase=phases, phase_seconds=phases,
                        total_energy_joules=0.4, rejected_updates=0)


@dataclass
class Wiring:
    topics: Topics
    device: aiomqtt.Client
    messages: DeviceMessages
    pump: asyncio.Task[None]
    statuses: list[tuple[str, DeviceStatus]] = field(default_factory=list)

    async def send(self, device_id: str, kind: str, payload: bytes) -> None:
        await self.device.publish(self.topics.device(device_id, kind), payload, qos=1)


@pytest.fixture
async def wiring(mosquitto: tuple[str, int]) -> AsyncIterator[Wiring]:
    endpoint = MqttEndpoint(*mosquitto)
    topics = Topics(f"collector-{time.monotonic_ns()}")
    statuses: list[tuple[str, DeviceStatus]] = []
    async with endpoint.client(f"{topics.run_id}-device") as device:
        messages = DeviceMessages(topics, lambda device_id, status: statuses.append((device_id, status)))
        # the run's own session, as the runner wires it (testbed.run_assembly.control_connection)
        control = ControlConnection(endpoint, f"{topics.run_id}-server", messages.subscriptions, messages.take)
        pump = await control.start()
        try:
            yield Wiring(topics, device, messages, pump, statuses)
        finally:
            pump.cancel()
            await asyncio.gather(pump, return_exceptions=True)


async def test_messages_are_typed_the_topic_names_the_sender_and_malformed_ones_are_dropped(wiring: Wiring) -> None:
    await wiring.send("dev-a", "report", b"{not json")
    await wiring.send("dev-a", "report", b'{"device": "dev-a", "version": 1}')  # fields missing
    await wiring.send("dev-a", "nack", b'{"device": "dev-a", "version": true, "reason": "r"}')
    await wiring.send("dev-a", "status", b'{"online": "yes"}')
    await wiring.send("dev-a", "report", report("someone-else", 1).encode())
    await wiring.send("dev-b", "nack", DeviceNack(device="dev-b", version=0, reason="bad hash").encode())
    await wiring.send("dev-b", "status", DeviceStatus(online=True).encode())
    received = await asyncio.wait_for(wiring.messages.reports.get(), 10)
    assert received.device == "dev-a" and received.version == 1
    nack = await asyncio.wait_for(wiring.messages.nacks.get(), 10)
    assert nack == DeviceNack(device="dev-b", version=0, reason="bad hash")
    for _ in range(100):
        if wiring.statuses:
            break
        await asyncio.sleep(0.05)
    assert wiring.statuses == [("dev-b", DeviceStatus(online=True))]
    assert wiring.messages.reports.empty() and wiring.messages.nacks.empty()


async def test_an_error_handling_one_message_costs_only_that_message(wiring: Wiring) -> None:
    calls: list[str] = []

    def on_status(device_id: str, status: DeviceStatus) -> None:
        calls.append(device_id)
        if len(calls) == 1:
            raise RuntimeError("a bug met by this one message")

    wiring.messages.on_status = on_status
    await wiring.send("dev-a", "status", DeviceStatus(online=True).encode())
    await wiring.send("dev-b", "nack", b"\xff" * 70_000)  # over the size bound: malformed, not fatal
    await wiring.send("dev-" + "x" * 2000, "report", report("dev-a", 1).encode())  # topic past the bound: ignored
    await wiring.send("dev-a", "report", report("dev-a", 2).encode())
    received = await asyncio.wait_for(wiring.messages.reports.get(), 10)
    assert received.version == 2 and not wiring.pump.done()
    assert (wiring.messages.failed_messages, wiring.messages.malformed_messages) == (1, 1)


@dataclass
class CatchUp:
    payload_bytes: int


@dataclass
class FakePublisher:
    """Records the catch-ups asked for (the real publisher is tested against a broker in tests/devices)."""

    catch_ups: list[tuple[int, str, int]] = field(default_factory=list)

    async def publish_catch_up(self, round_index: int, device_id: str, device_version: int) -> CatchUp:
        self.catch_ups.append((round_index, device_id, device_version))
        return CatchUp(100)


class FakeMetrics:
    def __init__(self) -> None:
        self.nacks: list[str] = []
        self.published: list[int] = []

    def record_nack(self, device_id: str, profile: str) -> None:
        self.nacks.append(device_id)

    def record_published(self, payload_bytes: int) -> None:
        self.published.append(payload_bytes)


class HealthyFleet:
    def raise_if_failed(self) -> None:
        pass


def collector(wiring: Wiring, publisher: FakePublisher, events: list[tuple[str, dict[str, Any]]],
              held: dict[str, int] | None = None, timeout_s: float = 10.0) -> ReportCollector:
    held = held or {}
    return ReportCollector(wiring.messages, wiring.pump, HealthyFleet(), publisher, FakeMetrics(),  # type: ignore[arg-type]
                           PROFILES, lambda device_id: held.get(device_id, 0), timeout_s,
                           lambda event, data: events.append((event, data)))


async def test_collects_the_version_sent_from_every_device(wiring: Wiring) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    await wiring.send("dev-a", "report", report("dev-a", 1).encode())  # an older version: not this round's
    await wiring.send("dev-a", "report", report("dev-a", 2).encode())
    await wiring.send("dev-b", "report", report("dev-b", 2).encode())
    await wiring.send("stranger", "report", report("stranger", 2).encode())
    reports = await collector(wiring, FakePublisher(), events).collect(1, 2)
    assert reports == {"dev-a": report("dev-a", 2), "dev-b": report("dev-b", 2)}
    assert [data["report"]["device"] for event, data in events if event == "device"] == ["dev-a", "dev-b"]


async def test_nacks_for_the_same_version_and_connection_coalesce_into_one_catch_up(wiring: Wiring) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    publisher = FakePublisher()
    wait = collector(wiring, publisher, events, held={"dev-a": 1, "dev-b": 1}, timeout_s=3.0)
    collecting = asyncio.create_task(wait.collect(2, 3))  # nacks queued before the round's wait are stale
    await asyncio.sleep(0)
    await wiring.send("dev-a", "nack", DeviceNack(device="dev-a", version=3, reason="already there").encode())
    await wiring.send("dev-a", "nack", DeviceNack(device="dev-a", version=0, reason="older than held").encode())
    for _ in range(5):  # a device nacking the same thing again, or a third party nacking in its name
        await wiring.send("dev-a", "nack", DeviceNack(device="dev-a", version=1, reason="bad hash", session=0).encode())
        await wiring.send("dev-a", "nack", DeviceNack(device="dev-a", version=1, reason="no session").encode())
    await wiring.send("dev-b", "nack", DeviceNack(device="dev-b", version=1, reason="bad hash", session=0).encode())
    reports = await asyncio.wait_for(collecting, 30)
    assert reports == {}  # nobody reported: the round timed out
    assert publisher.catch_ups == [(2, "dev-a", 1), (2, "dev-b", 1)]
    assert wait.coalesced_nacks == 9


async def test_a_reconnected_device_gets_a_new_catch_up_up_to_the_bound(wiring: Wiring) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    publisher = FakePublisher()
    collecting = asyncio.create_task(collector(wiring, publisher, events, held={"dev-a": 1}, timeout_s=3.0).collect(2, 3))
    await asyncio.sleep(0)
    for session in range(MAX_CATCH_UPS_PER_ROUND + 2):  # each connection lost the catch-up in flight
        await wiring.send("dev-a", "nack", DeviceNack(device="dev-a", version=1, reason="reconnected",
                                                      session=session).encode())
    reports = await asyncio.wait_for(collecting, 30)
    assert reports == {}
    assert publisher.catch_ups == [(2, "dev-a", 1)] * MAX_CATCH_UPS_PER_ROUND
    assert [data["reason"] for event, data in events if event == "catch-up"] == ["reconnected"] * MAX_CATCH_UPS_PER_ROUND


async def test_a_repair_asked_again_gets_another_catch_up_on_the_same_connection_up_to_the_bound(
        wiring: Wiring) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    publisher = FakePublisher()
    wait = collector(wiring, publisher, events, held={"dev-a": 1}, timeout_s=3.0)
    collecting = asyncio.create_task(wait.collect(2, 3))
    await asyncio.sleep(0)
    # its broadcast came damaged (repair 1), then each catch-up too (repairs 2, 3, 4); every nack twice
    for repair in (1, 1, 2, 2, 3, 3, 4):
        await wiring.send("dev-a", "nack", DeviceNack(device="dev-a", version=1, reason="a chunk failed its digest",
                                                      session=0, repair=repair).encode())
    await wiring.send("dev-a", "nack", DeviceNack(device="dev-a", version=1, reason="no repair count",
                                                  session=0).encode())  # a device that does not count: as before
    assert await asyncio.wait_for(collecting, 30) == {}
    assert publisher.catch_ups == [(2, "dev-a", 1)] * MAX_CATCH_UPS_PER_ROUND
    assert wait.coalesced_nacks == 4  # the second nack of repairs 1-3, and the one without a count


def test_a_nack_says_its_repair_count_only_when_it_has_one() -> None:
    assert b"repair" not in DeviceNack(device="d", version=1, reason="r", session=0).encode()
    nack = DeviceNack(device="d", version=1, reason="r", session=0, repair=2)
    assert DeviceNack.decode(nack.encode()) == nack and b'"repair": 2' in nack.encode()


async def test_nacks_queued_before_the_round_are_answered_by_its_broadcast_not_a_catch_up(wiring: Wiring) -> None:
    publisher = FakePublisher()
    await wiring.send("dev-a", "nack", DeviceNack(device="dev-a", version=1, reason="reconnected", session=1).encode())
    await wiring.send("dev-a", "status", DeviceStatus(online=True).encode())  # a marker: the nack is queued by now
    for _ in range(100):
        if wiring.statuses:
            break
        await asyncio.sleep(0.05)
    wait = collector(wiring, publisher, [], held={"dev-a": 1}, timeout_s=1.0)
    assert await wait.collect(2, 3) == {}
    assert publisher.catch_ups == [] and wait.stale_nacks == 1


async def test_a_stop_ends_the_wait_with_the_reports_so_far(wiring: Wiring) -> None:
    stop = asyncio.Event()
    wait = ReportCollector(wiring.messages, wiring.pump, HealthyFleet(), FakePublisher(), FakeMetrics(),  # type: ignore[arg-type]
                           PROFILES, lambda device_id: 0, 60.0, lambda event, data: None, stop=stop)
    await wiring.send("dev-a", "report", report("dev-a", 1).encode())
    collecting = asyncio.create_task(wait.collect(0, 1))
    await asyncio.sleep(0.5)
    stop.set()
    started = time.monotonic()
    reports = await asyncio.wait_for(collecting, 30)  # the round's own timeout is 60 s
    assert time.monotonic() - started < 10  # the wait wakes at least once a second to look
    assert list(reports) == ["dev-a"]


@dataclass
class Departures:
    """Who is out of the run, as the run's DeviceDowntime answers it (a device that left and has not joined)."""

    away: set[str]

    def out_of_run(self, device_id: str, until_s: float) -> bool:
        return device_id in self.away


async def test_a_device_out_of_the_run_does_not_hold_the_round_and_one_that_joins_is_waited_for(
        wiring: Wiring) -> None:
    presence = Departures({"dev-b"})
    wait = ReportCollector(wiring.messages, wiring.pump, HealthyFleet(), FakePublisher(), FakeMetrics(),  # type: ignore[arg-type]
                           PROFILES, lambda device_id: 0, 60.0, lambda event, data: None, presence=presence)
    await wiring.send("dev-a", "report", report("dev-a", 1).encode())
    started = time.monotonic()
    reports = await asyncio.wait_for(wait.collect(0, 1), 50)  # the round's own timeout is 60 s
    assert list(reports) == ["dev-a"] and time.monotonic() - started < 50
    assert wait.not_waited_for == {0: {"dev-b"}}
    collecting = asyncio.create_task(wait.collect(1, 2))
    presence.away.clear()  # dev-b joins before dev-a reports: the round waits for both from now on
    await wiring.send("dev-a", "report", report("dev-a", 2).encode())
    await asyncio.sleep(1.5)  # more than the wait's one-second look: it would have ended with dev-a alone
    assert not collecting.done()
    await wiring.send("dev-b", "report", report("dev-b", 2).encode())
    reports = await asyncio.wait_for(collecting, 50)
    assert sorted(reports) == ["dev-a", "dev-b"] and 1 not in wait.not_waited_for


async def test_a_lost_broker_connection_ends_the_round_with_run_error(wiring: Wiring) -> None:
    async def lost() -> None:
        raise aiomqtt.MqttError("connection lost")

    wiring.pump.cancel()
    wiring.pump = asyncio.create_task(lost())
    with pytest.raises(RunError, match="lost the connection to the broker"):
        await collector(wiring, FakePublisher(), []).collect(0, 1)
