"""The device agent: receive an update's chunks, verify, apply atomically, evaluate, report energy."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import aiomqtt
import numpy as np

from devices.chunk_faults import ChunkFaults, ReceivedMessage
from devices.chunk_repair import DamagedTransfer
from devices.compute_turns import compute_turns
from devices.energy import energy_by_phase, phase_times, radio_seconds
from devices.latest_report import LatestReport
from devices.profiles import DeviceProfile
from devices.update_receiver import CompletedUpdate, UpdateReceiver, UpdateTrust
from testbed.core.connect_ramp import ConnectRamp, RampSlot
from testbed.core.manifest import RejectReason, UpdateManifest, UpdateRejected
from testbed.core.messages import DeviceHello, DeviceNack, DeviceReport, DeviceStatus, Message
from testbed.core.mqtt import MqttEndpoint, handle_contained, keep_session, publish_until_disconnected
from testbed.core.signing import TrustedKey
from testbed.core.topics import Topics, mqtt_publish_wire_bytes
from testbed.core.wire import weights_hash

logger = logging.getLogger("devices.agent")

PUBACK_BYTES = 4
GOODBYE_TIMEOUT_S = 10.0  # a device leaving the run says it is offline within this, or leaves without a word
# aiomqtt 2.5 does not end a connect whose socket was reset before the CONNACK; it waits for this
# timeout. Short enough to reconnect soon after an outage, long enough for a CONNACK over LoRa SF12.
MQTT_OPERATION_TIMEOUT_S = 10.0


class InferenceModel(Protocol):
    """What a device runs: a model it can load weights into and evaluate on its local test split."""

    def initial_weights(self) -> dict[str, np.ndarray]:
        """Weights of the architecture before any update (shapes and names the updates address)."""
        ...

    def load_weights(self, weights: Mapping[str, np.ndarray]) -> None: ...

    def accuracy(self) -> float:
        """Accuracy on the device's local test split with the loaded weights."""
        ...

    def evaluation_macs(self) -> int:
        """Multiply-accumulates of one evaluation of the local test split (the modelled compute work)."""
        ...


@dataclass(frozen=True)
class DeviceConfig:
    """Identity, profile and link rates of one device."""

    device_id: str
    profile: DeviceProfile
    downlink_rate_bps: float | None
    uplink_rate_bps: float | None
    init_seed: int = 0
    round_period_s: float = 60.0
    """Modelled time between rounds: idle energy is counted over it (never over the host's wall time)."""


@dataclass
class RoundAccounting:
    """The bytes a device received and sent since its last report."""

    received_bytes: int = 0
    transmitted_bytes: int = 0


@dataclass
class DeviceState:
    """The device's deployed model (held by its UpdateReceiver, with its rejection counts) and its counters."""

    receiver: UpdateReceiver
    applied_updates: int = 0
    failed_messages: int = 0
    """Messages whose handling raised something unexpected (logged with the topic, then dropped)."""
    total_received_bytes: int = 0
    total_energy_joules: float = 0.0
    energy_joules_by_phase: dict[str, float] = field(
        default_factory=lambda: {"receive": 0.0, "transmit": 0.0, "compute": 0.0, "idle": 0.0}
    )

    @property
    def version(self) -> int:
        return self.receiver.version

    @property
    def rejected_updates(self) -> int:
        return self.receiver.rejected_updates

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.receiver.weights


def device_client(endpoint: MqttEndpoint, topics: Topics, device_id: str) -> aiomqtt.Client:
    """The MQTT client a device (agent or serial bridge) connects with; its will marks the device offline."""
    will = aiomqtt.Will(topics.device(device_id, "status"), DeviceStatus(online=False).encode(), qos=1, retain=True)
    return endpoint.client(f"{topics.run_id}-{device_id}", will=will, timeout_s=MQTT_OPERATION_TIMEOUT_S)


class DeviceAgent:
    """One edge device speaking MQTT: the same logic for emulated devices and board agents."""

    def __init__(
        self,
        config: DeviceConfig,
        topics: Topics,
        endpoint: MqttEndpoint,
        inference: InferenceModel,
        trusted_key: TrustedKey,
        clock: Callable[[], float] = time.time,
        connect_ramp: ConnectRamp | None = None,
    ) -> None:
        self.config = config
        self.connect_ramp = connect_ramp or ConnectRamp(1)
        """Where its connects wait their turn: the process's ramp shared by its fleet (alone: one at a time)."""
        self.topics = topics
        self.endpoint = endpoint
        self.inference = inference
        self.clock = clock
        self.receiver = UpdateReceiver(inference.initial_weights(), config.init_seed,
                                       UpdateTrust(topics.run_id, trusted_key, clock))
        self.state = DeviceState(self.receiver)
        inference.load_weights(self.receiver.weights)
        self.accounting = RoundAccounting()
        self._last_reported_round = -1  # round 0's report covers one round period
        self._apply_operations = sum(int(np.asarray(array).size) for array in self.receiver.initial_weights.values())
        """Modelled work of an apply: one operation per weight of the copy the update is applied to."""
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.latest_report = LatestReport()
        """The last report sent: sent again on each new connection and when the run asks (devices.latest_report)."""
        self.report_in_flight = False
        """A report is being published and its PUBACK has not come yet."""
        self.chunk_faults = ChunkFaults(config.downlink_rate_bps)
        """Faults the run arms on the chunks this device receives (after the channel, before the device)."""
        self.damage = DamagedTransfer(config.downlink_rate_bps)
        self._client: aiomqtt.Client | None = None  # the connection of the latest session (in use while `connected`)
        self.leaving = False
        """Set when the device leaves the run (say_goodbye): it takes no message after that."""

    @property
    def device_id(self) -> str:
        return self.config.device_id

    def rebooted(self) -> DeviceAgent:
        """A new agent for this device after a crash, from what a reboot keeps: the deployed version and weights
        and the refusal counts (its UpdateReceiver, as if in flash), its counters, and its latest report (an outbox
        in flash). Updates in flight are gone; on connecting it nacks for a catch-up."""
        agent = DeviceAgent(self.config, self.topics, self.endpoint, self.inference, self.receiver.trust.trusted_key,
                            self.clock, self.connect_ramp)
        self.receiver.drop_transfers()
        agent.receiver = self.receiver
        agent.state = self.state
        agent.inference.load_weights(self.receiver.weights)
        agent.latest_report = self.latest_report
        agent.chunk_faults = self.chunk_faults  # they are the channel's, not the device's
        agent.reconnects = self.reconnects + 1  # a new connection: ask for what was lost
        return agent

    async def say_goodbye(self) -> None:
        """Leaving the run: take nothing more, and say it is offline (retained, as its will would) before its task
        is stopped; bounded."""
        self.leaving = True
        client = self._client
        if client is None or not self.connected.is_set():
            return
        try:
            await asyncio.wait_for(self._publish(client, self.topics.device(self.device_id, "status"),
                                                 DeviceStatus(online=False), retain=True), GOODBYE_TIMEOUT_S)
        except (aiomqtt.MqttError, asyncio.TimeoutError) as error:
            logger.info("device %s left without saying so (%r)", self.device_id, error)

    async def run(self) -> None:
        """Stay connected (reconnecting with jittered backoff after broker or link failures) until cancelled."""
        await keep_session(self._session, self.device_id, self.connected.is_set, self._connection_lost,
                           f"device {self.device_id}")

    def _connection_lost(self, error: aiomqtt.MqttError) -> None:
        self.connected.clear()
        self.reconnects += 1

    async def _session(self) -> None:
        slot = await self.connect_ramp.acquire()  # connecting, subscribing and saying hello: in turn with the fleet
        try:
            await self._session_in_turn(slot)
        finally:
            slot.release()

    async def _session_in_turn(self, slot: RampSlot) -> None:
        async with device_client(self.endpoint, self.topics, self.device_id) as client:
            self._client = client
            for topic in self.topics.device_subscriptions(self.device_id):
                await client.subscribe(topic, qos=1)
            await self._publish(client, self.topics.device(self.device_id, "status"), DeviceStatus(online=True),
                                retain=True)
            await self._publish(client, self.topics.device(self.device_id, "hello"), self._hello())
            report = self.latest_report.on_reconnect() if self.reconnects > 0 else None
            if report is not None:
                # The run may have missed it (a connection that dropped before the PUBACK, a broker restart
                # before it was forwarded); one it sees twice is still one record.
                await self._publish(client, self.topics.device(self.device_id, "report"), report)
            if self.reconnects > 0:
                # Chunks in flight when the connection dropped are gone (clean session): ask for a
                # catch-up from the version held; the server ignores it if nothing newer exists.
                self.receiver.drop_transfers()
                self.chunk_faults.drop_held()
                await self._publish(client, self.topics.device(self.device_id, "nack"),
                                    self._nack("reconnected; updates in flight were lost"))
            slot.release()
            self.connected.set()
            await self._take_messages(client)

    async def _take_messages(self, client: aiomqtt.Client) -> None:
        """Handle messages in order, chunks through `chunk_faults` first. Between messages: release the chunks held
        to reorder when due, and ask for a repair once an update with a damaged chunk has stopped moving."""
        loop = asyncio.get_running_loop()
        next_message: asyncio.Future[aiomqtt.Message] | None = None
        try:
            while True:
                next_message = next_message or asyncio.ensure_future(anext(client.messages))
                deadlines = [deadline for deadline in (self.chunk_faults.next_release_s(), self.damage.next_check_s())
                             if deadline is not None]
                done, _ = await asyncio.wait([next_message], timeout=max(0.0, min(deadlines) - loop.time())
                                             if deadlines else None)
                arrived: list[ReceivedMessage] = []
                if next_message in done:
                    message, next_message = next_message.result(), None
                    if self.leaving:
                        continue
                    arrived = [ReceivedMessage(str(message.topic), bytes(message.payload), message.qos)]
                    if self.topics.parse_update_chunk(arrived[0].topic) is not None:
                        self.damage.chunk_arrived(loop.time(), len(arrived[0].payload))
                        arrived = self.chunk_faults.receive(arrived[0], loop.time())
                for incoming in arrived + self.chunk_faults.release_due(loop.time()):
                    await self._take(client, incoming)
                if self.damage.repair_due(loop.time(), self.receiver.transfers_in_flight):
                    await self._publish(client, self.topics.device(self.device_id, "nack"),
                                        self._nack("a chunk failed its digest and its update stopped; repair it"))
        finally:
            if next_message is not None:
                next_message.cancel()

    async def _take(self, client: aiomqtt.Client, incoming: ReceivedMessage) -> None:
        """Handle one message, noting a refused chunk (damage) and an applied update (the damage did not matter)."""
        refused, applied = self.receiver.rejections[RejectReason.BAD_CHUNK], self.state.applied_updates
        await self._handle_contained(client, incoming.topic, incoming.payload, incoming.qos)
        if self.state.applied_updates > applied:
            self.damage.update_applied()
        elif self.receiver.rejections[RejectReason.BAD_CHUNK] > refused:
            self.damage.chunk_refused()

    def _hello(self) -> DeviceHello:
        return DeviceHello(device=self.device_id, profile=self.config.profile.name, version=self.state.version,
                           kind="emulated")

    async def _publish(self, client: aiomqtt.Client, topic: str, message: Message, retain: bool = False) -> None:
        payload = message.encode()
        self.accounting.transmitted_bytes += mqtt_publish_wire_bytes(topic, _modelled_size(message, payload), qos=1)
        await publish_until_disconnected(client, topic, payload, qos=1, retain=retain, timeout=60.0)

    async def _handle_contained(self, client: aiomqtt.Client, topic: str, payload: bytes, qos: int) -> None:
        """Handle one message; whatever it raises costs only that message (the connection's errors excepted)."""
        await handle_contained(self._handle(client, topic, payload, qos), self._count_failed_message,
                               f"device {self.device_id}", topic, len(payload), logger)

    def _count_failed_message(self) -> None:
        self.state.failed_messages += 1

    async def _handle(self, client: aiomqtt.Client, topic: str, payload: bytes, qos: int) -> None:
        wire_bytes = mqtt_publish_wire_bytes(topic, len(payload), qos)
        self.accounting.received_bytes += wire_bytes
        self.state.total_received_bytes += wire_bytes
        if qos > 0:
            self.accounting.transmitted_bytes += PUBACK_BYTES
        if topic == self.topics.report_request:
            report = self.latest_report.answer(payload)
            if report is not None:
                await self._publish(client, self.topics.device(self.device_id, "report"), report)
            return
        try:
            if topic == self.topics.manifest or topic == self.topics.device(self.device_id, "manifest"):
                await compute_turns().turn()  # a signature to check: in a turn of its own (devices.compute_turns)
            completed = self._receive(topic, payload)
            if completed is not None:
                delivered_at = self.clock()
                await compute_turns().turn()  # verify, apply, evaluate and report in a turn of their own
                version, new_weights = self.receiver.verify(completed)
        except UpdateRejected as error:
            # Counted by the receiver. Only a genuine update the device could not use asks for a catch-up;
            # anything else (forged, replayed, foreign, a stray chunk) gets no answer, so it costs no traffic.
            level = logging.WARNING if error.reason.asks_for_repair else logging.INFO
            logger.log(level, "device %s: refused a message on %.200s: %s", self.device_id, topic, error)
            if error.reason.asks_for_repair:
                await self._publish(client, self.topics.device(self.device_id, "nack"), self._nack(str(error)))
            return
        if completed is not None:
            await self._apply_and_report(client, completed, version, new_weights, delivered_at)

    def _receive(self, topic: str, payload: bytes) -> CompletedUpdate | None:
        chunk = self.topics.parse_update_chunk(topic)
        if chunk is not None:
            key, index = chunk
            return self.receiver.add_chunk(key, index, payload)
        if topic not in (self.topics.manifest, self.topics.device(self.device_id, "manifest")):
            logger.debug("device %s: ignoring a message on %.200s", self.device_id, topic)
            return None
        return self.receiver.add_manifest_payload(payload)

    def _nack(self, reason: str) -> DeviceNack:
        return DeviceNack(device=self.device_id, version=self.state.version, reason=reason[:1024],
                          session=self.reconnects, repair=self.damage.repairs_asked or None)

    async def _apply_and_report(self, client: aiomqtt.Client, completed: CompletedUpdate, version: int,
                                new_weights: dict[str, np.ndarray], delivered_at: float) -> None:
        """Swap in verified weights, evaluate, report."""
        self.inference.load_weights(new_weights)
        self.receiver.commit(version, new_weights)
        self.state.applied_updates += 1
        accuracy = self.inference.accuracy()
        report = self._report(completed.manifest, accuracy, delivered_at, len(completed.payload))
        self.latest_report.keep(report)
        self.report_in_flight = True
        try:
            await self._publish(client, self.topics.device(self.device_id, "report"), report)
        finally:
            self.report_in_flight = False

    def _report(self, manifest: UpdateManifest, accuracy: float, delivered_at: float, update_bytes: int) -> DeviceReport:
        """The report of an applied update. Its energy comes from the model alone (profile, bytes, the model's
        work, the scenario's round period), so the same scenario and seed give the same joules on any host;
        the host's apply and evaluate times are not used for it."""
        profile = self.config.profile
        apply_s = self._apply_operations / profile.macs_per_s
        evaluate_s = self.inference.evaluation_macs() / profile.macs_per_s
        rounds_covered = max(0, manifest.round_index - self._last_reported_round)
        self._last_reported_round = max(self._last_reported_round, manifest.round_index)
        times = phase_times(
            round_seconds=rounds_covered * self.config.round_period_s,
            receive_s=radio_seconds(self.accounting.received_bytes, self.config.downlink_rate_bps),
            transmit_s=radio_seconds(self.accounting.transmitted_bytes, self.config.uplink_rate_bps),
            compute_s=apply_s + evaluate_s,
        )
        energy = energy_by_phase(profile, times)
        round_energy = sum(energy.values())
        self.state.total_energy_joules += round_energy
        for phase, joules in energy.items():
            self.state.energy_joules_by_phase[phase] += joules
        report = DeviceReport(
            device=self.device_id,
            profile=profile.name,
            round=manifest.round_index,
            version=self.state.version,
            weights_hash=weights_hash(self.state.weights).hex(),
            accuracy=accuracy,
            update_bytes=update_bytes,
            received_bytes=self.accounting.received_bytes,
            transmitted_bytes=self.accounting.transmitted_bytes,
            total_received_bytes=self.state.total_received_bytes,
            delivery_seconds=max(0.0, delivered_at - manifest.published_at),
            apply_seconds=apply_s,
            evaluate_seconds=evaluate_s,
            energy_joules=round_energy,
            energy_joules_by_phase=energy,
            phase_seconds={
                "receive": times.receive_s, "transmit": times.transmit_s,
                "compute": times.compute_s, "idle": times.idle_s,
            },
            total_energy_joules=self.state.total_energy_joules,
            rejected_updates=self.state.rejected_updates,
            rejected_by_reason=self.receiver.rejected_by_reason,
        )
        self.accounting = RoundAccounting()
        return report


def _modelled_size(message: Message, payload: bytes) -> int:
    """The bytes a message is charged for: a report as if its one measured field, the delivery time, were 0.0,
    so that the text of a host measurement (a digit more or less) does not change the modelled uplink."""
    if isinstance(message, DeviceReport):
        return len(message.model_copy(update={"delivery_seconds": 0.0}).encode())
    return len(payload)
