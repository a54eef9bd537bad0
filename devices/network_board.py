"""The network board: a Linux board joins a run as a named device over MQTT, through the link the run emulates for it."""

from __future__ import annotations

import asyncio
import logging
import time

import aiomqtt

from devices.agent import PUBACK_BYTES, device_client
from devices.board_updates import BoardUpdates
from devices.latest_report import LatestReport
from devices.task_groups import run_together
from devices.update_receiver import CompletedUpdate
from testbed.core.manifest import UpdateRejected
from testbed.core.messages import BoardConfig, DeviceHello, DeviceStatus, Message
from testbed.core.mqtt import MqttEndpoint, handle_contained, keep_session, publish_until_disconnected
from testbed.core.topics import Topics, mqtt_publish_wire_bytes

logger = logging.getLogger("devices.network_board")

PUBLISH_TIMEOUT_S = 60.0  # a report crossing a slow emulated link


class NetworkBoard:
    """One board as the run's device `config.device`, speaking MQTT to `endpoint` (the run's link for it).

    What it does with an update is the serial board agent's (devices.board_updates: verify against the
    run's key, pinned with `--trust`; apply on a copy, swap, save; evaluate on its local test split;
    measured energy per phase). Like an emulated device it subscribes to the run's update topics, says it
    is online (retained; its will says offline), reconnects with jittered backoff, asks for a catch-up
    after a reconnect or when it resumed a saved version, and sends again a report or nack whose PUBACK
    never came, and its latest report after a reconnect or when the run asks (devices.latest_report). Its byte counts are the MQTT packets it received and sent, as an emulated device counts
    them; its delivery time is the board's clock at completion less the manifest's publication time (keep
    the board's clock synchronised, e.g. NTP).
    """

    def __init__(self, endpoint: MqttEndpoint, config: BoardConfig, updates: BoardUpdates) -> None:
        self.endpoint = endpoint
        self.config = config
        self.updates = updates
        self.topics = Topics(config.run)
        self.connected = asyncio.Event()
        self.sessions = 0
        self.failed_messages = 0
        self.received_bytes = 0  # since the last report
        self.transmitted_bytes = 0
        self.total_received_bytes = 0
        self._unacknowledged: list[tuple[str, Message]] = []  # reports and nacks whose PUBACK never came
        self.latest_report = LatestReport()  # sent again on a reconnect and when the run asks (devices.latest_report)

    @property
    def device_id(self) -> str:
        return self.config.device

    async def run(self) -> None:
        """Deploy the run's model (BoardConfigRefused if the board will not), then serve until cancelled."""
        self.updates.check_trust(self.config)
        await self.updates.deploy(self.config)
        await run_together(self.updates.energy.run(), self._serve())

    async def _serve(self) -> None:
        await keep_session(self._session, self.device_id, self.connected.is_set, self._connection_lost,
                           f"board {self.device_id}")

    def _connection_lost(self, error: aiomqtt.MqttError) -> None:
        self.connected.clear()
        self.updates.drop_transfers()  # chunks in flight are gone with the connection (clean session)

    async def _session(self) -> None:
        async with device_client(self.endpoint, self.topics, self.device_id) as client:
            self.sessions += 1
            for topic in self.topics.device_subscriptions(self.device_id):
                await client.subscribe(topic, qos=1)
            version = self.updates.deployed().receiver.version
            await self._publish(client, "status", DeviceStatus(online=True), retain=True)
            await self._publish(client, "hello", DeviceHello(
                device=self.device_id, profile=self.updates.profile.name, version=version, kind_of_device="network",
                board=self.updates.board_name, capabilities=[f"energy:{self.updates.energy.meter.name}"]))
            pending, self._unacknowledged = self._unacknowledged, []
            latest = self.latest_report.on_reconnect() if self.sessions > 1 else None
            if latest is not None and ("report", latest) not in pending:
                pending.insert(0, ("report", latest))  # the run may have missed it though the broker took it
            for kind, message in pending:
                await self._send(client, kind, message)
            if self.sessions > 1 or version > 0:
                await self._send(client, "nack", self.updates.nack(
                    f"board {'reconnected' if self.sessions > 1 else 'resumed'} at version {version}; "
                    "updates in flight were lost", session=self.sessions))
            self.connected.set()
            async for message in client.messages:
                await self._take_contained(client, str(message.topic), bytes(message.payload), message.qos)

    async def _take_contained(self, client: aiomqtt.Client, topic: str, payload: bytes, qos: int) -> None:
        """Handle one message; whatever it raises costs only that message (the connection's errors excepted)."""
        await handle_contained(self._take(client, topic, payload, qos), self._count_failed_message,
                               f"board {self.device_id}", topic, len(payload), logger)

    def _count_failed_message(self) -> None:
        self.failed_messages += 1

    async def _take(self, client: aiomqtt.Client, topic: str, payload: bytes, qos: int) -> None:
        wire_bytes = mqtt_publish_wire_bytes(topic, len(payload), qos)
        self.received_bytes += wire_bytes
        self.total_received_bytes += wire_bytes
        if qos > 0:
            self.transmitted_bytes += PUBACK_BYTES
        if topic == self.topics.report_request:
            report = self.latest_report.answer(payload)
            if report is not None:
                await self._send(client, "report", report)
            return
        receiver = self.updates.deployed().receiver
        chunk = self.topics.parse_update_chunk(topic)
        if chunk is None and topic not in (self.topics.manifest, self.topics.device(self.device_id, "manifest")):
            return
        self.updates.begin_receiving()
        try:
            completed = (receiver.add_chunk(chunk[0], chunk[1], payload) if chunk is not None
                         else receiver.add_manifest_payload(payload))
        except UpdateRejected as error:
            # Counted by the receiver; only a genuine update the board could not use asks for a catch-up.
            level = logging.WARNING if error.reason.asks_for_repair else logging.INFO
            logger.log(level, "board %s: refused a message on %.200s: %s", self.device_id, topic, error)
            if error.reason.asks_for_repair:
                self.updates.drop_transfers()
                await self._nack(client, f"rejected: {error}")
            self.updates.end_receiving()
            return
        if completed is None:
            self.updates.end_receiving()
            return
        await self._apply_and_report(client, completed)

    async def _apply_and_report(self, client: aiomqtt.Client, completed: CompletedUpdate) -> None:
        delivered_at = time.time()
        try:
            applied = await self.updates.apply(completed)
        except UpdateRejected as error:
            logger.warning("board %s: update %s rejected: %s", self.device_id, completed.manifest.key, error)
            await self._nack(client, f"update {completed.manifest.key} rejected: {error}")
            return
        report = self.updates.report(
            applied, kind="network", received_bytes=self.received_bytes, transmitted_bytes=self.transmitted_bytes,
            total_received_bytes=self.total_received_bytes,
            delivery_seconds=max(0.0, delivered_at - completed.manifest.published_at))
        self.received_bytes = self.transmitted_bytes = 0
        self.latest_report.keep(report)
        await self._send(client, "report", report)
        logger.info("board %s: applied %s: version %d, accuracy %.4f, %.3f J since the last report", self.device_id,
                    completed.manifest.key, report.version, report.accuracy, report.energy_joules)
        self.updates.idle()

    async def _nack(self, client: aiomqtt.Client, reason: str) -> None:
        self.updates.energy.begin_phase("transmit")
        await self._send(client, "nack", self.updates.nack(reason, session=self.sessions))
        self.updates.idle()

    async def _send(self, client: aiomqtt.Client, kind: str, message: Message) -> None:
        """A report or nack, kept to be sent again on the next connection until the broker acknowledges it."""
        self._unacknowledged.append((kind, message))
        await self._publish(client, kind, message)
        self._unacknowledged.remove((kind, message))

    async def _publish(self, client: aiomqtt.Client, kind: str, message: Message, retain: bool = False) -> None:
        topic = self.topics.device(self.device_id, kind)
        payload = message.encode()
        self.transmitted_bytes += mqtt_publish_wire_bytes(topic, len(payload), qos=1)
        await publish_until_disconnected(client, topic, payload, qos=1, retain=retain, timeout=PUBLISH_TIMEOUT_S)
