"""A report the run missed while its own broker session was down reaches it after all, in either reconnect order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from devices.agent import DeviceAgent
from devices.latest_report import LatestReport
from server.update_server import UpdateServer
from testbed.control_connection import ControlConnection
from testbed.core.messages import DeviceReport, ReportRequest
from testbed.core.mqtt import MqttEndpoint
from testbed.core.topics import Topics
from testbed.core.wire import encode_full_model
from testbed.report_collector import DeviceMessages, ReportCollector
from tests.devices.test_agent import Harness, make_agent, trained  # noqa: F401 — `trained` is a fixture

WAIT_S = 20.0
"""Every wait's bound: a hang fails in seconds, with the step that hung."""


class CuttableRelay:
    """A TCP relay to the broker for one client, whose connection can be cut and kept cut (a network that fails)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.open = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def __aenter__(self) -> CuttableRelay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cut()
        assert self._server is not None
        self._server.close()

    def cut(self) -> None:
        """Close every connection through the relay now, and refuse new ones until `mend`."""
        self.open = False
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    def mend(self) -> None:
        self.open = True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.update({writer, upstream_writer})
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer), return_exceptions=True)
        for each in (writer, upstream_writer):
            self._writers.discard(each)
            each.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.transport.abort()


class HealthyFleet:
    def raise_if_failed(self) -> None:
        pass


class NoCatchUps:
    async def publish_catch_up(self, round_index: int, device_id: str, device_version: int) -> Any:
        raise AssertionError("no device here lacks a version: no catch-up is due")


class QuietMetrics:
    def record_nack(self, device_id: str, profile: str) -> None:
        pass


async def _until(condition: Any, what: str) -> None:
    for _ in range(int(WAIT_S / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {WAIT_S:g} s waiting for {what}")


@contextlib.asynccontextmanager
async def wiring(mosquitto: tuple[str, int], server: UpdateServer, device_through_relay: bool
                 ) -> AsyncIterator[tuple[DeviceAgent, Topics, ControlConnection, ReportCollector, CuttableRelay,
                                          CuttableRelay, Harness]]:
    """An agent, the run's session and a collector as the runner wires them; the run's session (and, if asked, the
    device's) through relays the test can cut; a plain client publishes the signed update."""
    host, port = mosquitto
    agent, topics, _ = make_agent(mosquitto, server)
    async with CuttableRelay(port) as run_relay, CuttableRelay(port) as device_relay:
        agent.endpoint = MqttEndpoint(host, device_relay.port) if device_through_relay else MqttEndpoint(host, port)
        messages = DeviceMessages(topics)
        control = ControlConnection(MqttEndpoint(host, run_relay.port), f"{topics.run_id}-server",
                                    messages.subscriptions, messages.take)
        pump = await control.start()
        collector = ReportCollector(messages, pump, HealthyFleet(), NoCatchUps(), QuietMetrics(),  # type: ignore[arg-type]
                                    {"dev-a": "rpi4"}, lambda device_id: 0, WAIT_S, lambda event, data: None,
                                    control=control)
        device = asyncio.create_task(agent.run())
        try:
            await asyncio.wait_for(agent.connected.wait(), WAIT_S)
            async with MqttEndpoint(host, port).client(f"{topics.run_id}-publisher") as publisher:
                yield agent, topics, control, collector, run_relay, device_relay, Harness(agent, publisher, topics)
        finally:
            for task in (device, pump):
                task.cancel()
            await asyncio.gather(device, pump, return_exceptions=True)


async def _report_while_the_run_is_away(agent: DeviceAgent, harness: Harness, run_relay: CuttableRelay,
                                        control: ControlConnection, first: Any) -> DeviceReport:
    """Cut the run's session, let the device apply version 1 and report it to a broker the run is not on."""
    run_relay.cut()
    await _until(lambda: control.connections == 1 and not control.connected, "the run's session to drop")
    await harness.publish_update(encode_full_model(first.weights, 1), 1, None)
    await _until(lambda: agent.latest_report.report is not None and not agent.report_in_flight,
                 "the device's report of version 1 to be acknowledged by the broker")
    assert agent.latest_report.report is not None
    return agent.latest_report.report


async def test_the_run_asks_again_for_a_report_sent_while_its_session_was_down(
        mosquitto: tuple[str, int], trained: tuple[UpdateServer, list[Any]]) -> None:  # noqa: F811
    server, (first, _) = trained
    async with wiring(mosquitto, server, device_through_relay=False) as (agent, _, control, collector, run_relay, _, h):
        sent = await _report_while_the_run_is_away(agent, h, run_relay, control, first)
        run_relay.mend()  # the run's session comes back (after its backoff); the broker dropped the report
        reports = await collector.collect(0, 1)
        assert reports == {"dev-a": sent}
        assert (collector.report_requests, agent.latest_report.answered_requests) == (1, 1)
        assert control.connections == 2


async def test_a_device_back_after_the_runs_request_sends_its_report_on_reconnecting(
        mosquitto: tuple[str, int], trained: tuple[UpdateServer, list[Any]]) -> None:  # noqa: F811
    server, (first, _) = trained
    async with wiring(mosquitto, server, device_through_relay=True) as (agent, _, control, collector, run_relay,
                                                                         device_relay, h):
        sent = await _report_while_the_run_is_away(agent, h, run_relay, control, first)
        device_relay.cut()
        await _until(lambda: not agent.connected.is_set(), "the device's connection to drop")
        run_relay.mend()
        collecting = asyncio.create_task(collector.collect(0, 1))
        await _until(lambda: collector.report_requests == 1, "the run to ask for the reports again")
        assert not collecting.done()  # the device was away: the request could not reach it
        device_relay.mend()
        reports = await asyncio.wait_for(collecting, WAIT_S)
        assert reports == {"dev-a": sent}
        assert agent.latest_report.answered_requests == 0 and agent.reconnects >= 1


@pytest.mark.parametrize("version, answered", [(1, True), (2, False)])
def test_a_request_is_answered_with_the_latest_report_of_that_version_only(version: int, answered: bool) -> None:
    clock = [100.0]
    latest = LatestReport(clock=lambda: clock[0])
    assert latest.answer(ReportRequest(round=0, version=1).encode()) is None  # nothing reported yet
    report = DeviceReport.model_construct(version=1)
    latest.keep(report)
    assert (latest.answer(ReportRequest(round=0, version=version).encode()) is report) == answered
    assert latest.answer(b"{not a request") is None
    clock[0] += 0.5
    assert latest.answer(ReportRequest(round=0, version=1).encode()) is (report if not answered else None)
    clock[0] += 1.0
    assert latest.answer(ReportRequest(round=0, version=1).encode()) is report  # a second later: again
