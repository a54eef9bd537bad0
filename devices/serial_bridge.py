"""The host bridge: a serial-attached board joins a run as an MQTT device; updates go down as frames, reports come up."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import aiomqtt

from devices.agent import device_client
from devices.board_agent import board_config_payload
from devices.chunk_faults import ChunkFaults, ReceivedMessage
from devices.frame_order import LinkSettings
from devices.latest_report import LatestReport
from devices.reliable_serial import ReliableSerialLink
from devices.serial_framing import (
    DEFAULT_MAX_FRAME_BYTES,
    FLAG_MORE,
    Ack,
    Frame,
    Hello,
    MessageType,
    SerialFrameError,
    UpdateChunk,
    encode_frame,
    parse_json_payload,
    parse_log_payload,
    parse_session_payload,
)
from devices.serial_link import (
    SerialLink,
    SerialLinkError,
    SerialLinkTimeout,
    line_rate_bytes_per_s,
)
from devices.task_groups import run_together
from testbed.core.manifest import ManifestError, UpdateManifest, UpdateRejected, verify_manifest
from testbed.core.messages import BoardConfig, DeviceHello, DeviceNack, DeviceReport, DeviceStatus, Message, MessageError
from testbed.core.mqtt import MqttEndpoint, keep_session, publish_until_disconnected
from testbed.core.signing import TrustedKey
from testbed.core.topics import Topics
from devices.errors import DeviceError

logger = logging.getLogger("devices.bridge")

PING_INTERVAL_S = 2.0
SILENCE_TIMEOUT_S = 8.0  # no frame for this long (pings unanswered): the board is offline
HANDSHAKE_TIMEOUT_S = 120.0  # hello -> ready: the board builds its model and test split meanwhile
REOPEN_DELAY_S = 1.0
CHUNK_PIECE_HEADROOM = 16  # frame bytes kept free for the chunk header beyond the key


class BridgeError(DeviceError):
    """The board cannot take part in the run (it failed to set up, or its configuration is unknown)."""


class SerialLog:
    """Every frame across the serial line, one timestamped line each, with its direction."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._file: IO[str] | None = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 — closed by close()

    def observe(self, outgoing: bool, frame: Frame, note: str) -> None:
        """A ReliableSerialLink observer: every frame on the line, link control and resends included."""
        self.write("host>board" if outgoing else "board>host", frame, f"{note} {_describe(frame)}".strip())

    def write(self, direction: str, frame: Frame | None, text: str = "") -> None:
        if self._file is None:
            return
        stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        what = "" if frame is None else f"{frame.message_type.name} seq={frame.sequence} len={len(frame.payload)}"
        self._file.write(f"{stamp} {direction} {what} {text}".rstrip() + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class SerialBridge:
    """One serial-attached board as a device of the run. `await bridge.run()` serves until cancelled.

    MQTT side: subscribes like an emulated device and publishes the board's hello, status (online while
    the board answers), reports and nacks; its latest report again after a reconnect and when the run asks. Serial side: hello -> config -> ready handshake, then manifests
    and chunks forwarded as frames paced at the line rate, pings every PING_INTERVAL_S; a board silent
    for SILENCE_TIMEOUT_S, a lost port or a board that says hello again (it rebooted) is marked offline,
    and when it is ready again the bridge asks the run for a catch-up from the version the board holds.

    Chunks pass `chunk_faults` between MQTT and the serial line (the run arms corrupt, duplicate, reorder there):
    the board gets what they make of them, the channel and the broker never see it. `downlink_rate_bps` (the
    device's channel downlink) sets how long a short reordered group is held.
    """

    def __init__(self, device_id: str, profile_name: str, port: str, topics: Topics, endpoint: MqttEndpoint,
                 config: BoardConfig, *, baud: int = 115200, log_path: Path | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 open_link: Callable[[], Awaitable[SerialLink]] | None = None,
                 silence_timeout_s: float = SILENCE_TIMEOUT_S, link_settings: LinkSettings | None = None,
                 downlink_rate_bps: float | None = None) -> None:
        self.device_id = device_id
        self.profile_name = profile_name
        self.port = port
        self.topics = topics
        self.endpoint = endpoint
        self.config = config
        self.baud = baud
        self.max_frame_bytes = max_frame_bytes
        self.silence_timeout_s = silence_timeout_s
        self.link_settings = link_settings
        self._open_link = open_link or (lambda: SerialLink.open(port, baud, max_frame_bytes=max_frame_bytes))
        self.serial_log = SerialLog(log_path)
        self.connected = asyncio.Event()  # MQTT subscribed and the board ready: what the run waits for
        self.mqtt_ready = asyncio.Event()
        self.board_ready = asyncio.Event()
        self.board_hello: Hello | None = None
        self.board_version = 0
        self.latest_target_version = 0  # newest version announced on MQTT (by a manifest the run signed)
        self.trusted_key = TrustedKey.from_text(config.public_key)
        self.refused_manifests = 0  # not the run's: not worth the serial line (the board would refuse them too)
        self.failed_messages = 0
        self.offline_periods = 0
        self.dropped_while_offline = 0
        self.frames_forwarded = 0
        self._outbox: asyncio.Queue[tuple[str, Message, bool]] = asyncio.Queue()
        self._unsent: tuple[str, Message, bool] | None = None
        self.latest_report = LatestReport()  # sent again on a reconnect and when the run asks (devices.latest_report)
        self._to_board: asyncio.Queue[tuple[MessageType, bytes, int]] = asyncio.Queue()
        self.frames_sent_again = 0  # by the links of earlier sessions and the current one
        self.line_drops = 0
        self._drop_line = asyncio.Event()
        self._closed_until = 0.0  # loop time before which the line stays closed (drop_line's closed_for_s)
        self.chunk_faults = ChunkFaults(downlink_rate_bps)
        """Faults the run arms on the chunks to the board (after the channel, before the serial line)."""
        self._chunks_held = asyncio.Event()  # chunk_faults took a chunk: its release time may have changed

    def drop_line(self, closed_for_s: float = 0.0) -> None:
        """Close the serial line now, as a board reset or an unplugged cable would; it is opened again after
        REOPEN_DELAY_S, or `closed_for_s` if longer (a cable pulled out that long), and the board, once ready, gets a
        catch-up. While the line is closed nothing more is dropped; a longer `closed_for_s` keeps it closed longer."""
        loop = asyncio.get_running_loop()
        self._closed_until = max(self._closed_until, loop.time() + closed_for_s)
        self._drop_line.set()

    # --- lifetime -------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await run_together(self._mqtt_loop(), self._serial_loop())
        finally:
            self.serial_log.close()

    def _update_connected(self) -> None:
        if self.mqtt_ready.is_set() and self.board_ready.is_set():
            self.connected.set()
        else:
            self.connected.clear()

    # --- MQTT side ------------------------------------------------------------------------------------

    async def _mqtt_loop(self) -> None:
        await keep_session(self._mqtt_session, self.device_id, self.mqtt_ready.is_set, self._mqtt_lost,
                           f"bridge {self.device_id}")

    def _mqtt_lost(self, error: aiomqtt.MqttError) -> None:
        self.mqtt_ready.clear()
        self._update_connected()

    async def _mqtt_session(self) -> None:
        async with device_client(self.endpoint, self.topics, self.device_id) as client:
            for topic in self.topics.device_subscriptions(self.device_id):
                await client.subscribe(topic, qos=1)
            await client.publish(self.topics.device(self.device_id, "status"),
                                 DeviceStatus(online=self.board_ready.is_set()).encode(), qos=1, retain=True)
            reconnected = self.mqtt_ready.is_set() or self._unsent is not None
            self.mqtt_ready.set()
            self._update_connected()
            latest = self.latest_report.on_reconnect() if reconnected else None
            if latest is not None and (self._unsent is None or self._unsent[1] is not latest):
                self._publish("report", latest)  # the run may have missed it though the broker took it
            if reconnected:
                self.chunk_faults.drop_held()  # held back to reorder, they came on the connection that was lost
                if self.board_ready.is_set():
                    self._ask_catch_up("bridge reconnected to the broker; updates in flight were lost")
            await run_together(self._drain_outbox(client), self._receive_mqtt(client), self._release_held_chunks())

    async def _drain_outbox(self, client: aiomqtt.Client) -> None:
        while True:
            message = self._unsent or await self._outbox.get()
            self._unsent = message
            topic, body, retain = message
            await publish_until_disconnected(client, topic, body.encode(), qos=1, retain=retain, timeout=60.0)
            self._unsent = None

    async def _receive_mqtt(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            topic, payload = str(message.topic), bytes(message.payload)
            try:
                if self.topics.parse_update_chunk(topic) is not None:
                    self._forward_chunk(ReceivedMessage(topic, payload, message.qos))
                elif topic == self.topics.report_request:
                    report = self.latest_report.answer(payload)
                    if report is not None:
                        self._publish("report", report)
                elif topic in (self.topics.manifest, self.topics.device(self.device_id, "manifest")):
                    self._forward_manifest(payload)
            except Exception:  # noqa: BLE001 — one message the bridge cannot handle must not end the bridge
                self.failed_messages += 1
                logger.exception("bridge %s: dropped a message on %.200s that failed to be handled",
                                 self.device_id, topic)

    def _publish(self, kind: str, body: Message, retain: bool = False) -> None:
        self._outbox.put_nowait((self.topics.device(self.device_id, kind), body, retain))

    def _ask_catch_up(self, reason: str) -> None:
        self._publish("nack", DeviceNack(device=self.device_id, version=self.board_version, reason=reason))

    # --- MQTT -> board --------------------------------------------------------------------------------

    def _forward_manifest(self, payload: bytes) -> None:
        """Forward a manifest the run signed; anything else would cost serial airtime only to be refused."""
        try:
            manifest = UpdateManifest.from_json(payload)
            verify_manifest(manifest, trusted_key=self.trusted_key, run_id=self.config.run, model_fingerprint=None,
                            now=time.time())
        except (ManifestError, UpdateRejected) as error:
            self.refused_manifests += 1
            logger.info("bridge %s: not forwarding a manifest: %s", self.device_id, error)
            return
        self.latest_target_version = max(self.latest_target_version, manifest.target_version)
        self._enqueue(MessageType.MANIFEST, payload)

    def _forward_chunk(self, chunk: ReceivedMessage) -> None:
        """A chunk from MQTT through `chunk_faults` to the board: what they deliver now (damaged, twice, a held group
        in a shuffled order, or nothing while it is held). Faults act only on chunks the board is there to get."""
        if not self.board_ready.is_set():
            self.dropped_while_offline += 1  # the board asks for a catch-up when it is back
            return
        for delivered in self.chunk_faults.receive(chunk, asyncio.get_running_loop().time()):
            self._send_chunk(delivered)
        self._chunks_held.set()

    async def _release_held_chunks(self) -> None:
        """Send the chunks `chunk_faults` held to reorder once their group is due, though the rest never came."""
        loop = asyncio.get_running_loop()
        while True:
            self._chunks_held.clear()
            due = self.chunk_faults.next_release_s()
            try:
                await asyncio.wait_for(self._chunks_held.wait(), None if due is None else max(0.0, due - loop.time()))
            except asyncio.TimeoutError:
                for delivered in self.chunk_faults.release_due(loop.time()):
                    self._send_chunk(delivered)

    def _send_chunk(self, chunk: ReceivedMessage) -> None:
        """One chunk to the board, in frames of at most max_frame_bytes (FLAG_MORE on all but the last)."""
        parsed = self.topics.parse_update_chunk(chunk.topic)
        assert parsed is not None, chunk.topic  # only chunk topics pass chunk_faults
        key, index = parsed
        data = chunk.payload
        room = self.max_frame_bytes - 8 - len(key.encode("utf-8")) - CHUNK_PIECE_HEADROOM
        pieces = [data[start:start + room] for start in range(0, len(data), room)] or [b""]
        for number, piece in enumerate(pieces):
            flags = FLAG_MORE if number < len(pieces) - 1 else 0
            self._enqueue(MessageType.UPDATE_CHUNK, UpdateChunk(key, index, piece).to_payload(), flags)

    def _enqueue(self, message_type: MessageType, payload: bytes, flags: int = 0) -> None:
        if not self.board_ready.is_set():
            self.dropped_while_offline += 1  # the board asks for a catch-up when it is back
            return
        self._to_board.put_nowait((message_type, payload, flags))

    # --- serial side ----------------------------------------------------------------------------------

    async def _serial_loop(self) -> None:
        reported_failure = False
        while True:
            try:
                link = await self._open_link()
            except SerialLinkError as error:
                if not reported_failure:
                    logger.warning("bridge %s: %s; retrying every %.0f s", self.device_id, error, REOPEN_DELAY_S)
                    self.serial_log.write("--", None, f"cannot open {self.port}: {error}")
                    reported_failure = True
                await asyncio.sleep(REOPEN_DELAY_S)
                continue
            reported_failure = False
            self.serial_log.write("--", None, f"opened {self.port} at {self.baud} baud")
            async with link:
                try:
                    await self._serial_session(link)
                except (SerialLinkError, asyncio.TimeoutError) as error:
                    logger.warning("bridge %s: board link lost: %s", self.device_id, error)
                    self.serial_log.write("--", None, f"link lost: {error}")
                finally:
                    self._board_offline()
            await asyncio.sleep(max(REOPEN_DELAY_S, self._closed_until - asyncio.get_running_loop().time()))

    async def _serial_session(self, link: SerialLink) -> None:
        self._drop_line.clear()  # a drop asked for while the line was closed has nothing to drop
        async with ReliableSerialLink(link, self.link_settings, observer=self.serial_log.observe) as reliable:
            try:
                await run_together(self._read_board(reliable), self._ping(reliable), self._write_board(reliable),
                                   self._until_line_dropped())
            finally:
                self.frames_sent_again += reliable.protocol.frames_resent

    async def _until_line_dropped(self) -> None:
        await self._drop_line.wait()
        self.line_drops += 1
        raise SerialLinkError("line dropped (board reset)")

    async def _send(self, link: ReliableSerialLink, message_type: MessageType, payload: bytes, flags: int = 0) -> None:
        await link.send(message_type, payload, flags=flags)

    async def _write_board(self, link: ReliableSerialLink) -> None:
        while True:
            message_type, payload, flags = await self._to_board.get()
            await self._send(link, message_type, payload, flags)
            self.frames_forwarded += 1

    async def _ping(self, link: ReliableSerialLink) -> None:
        """Ask who is there until the board is ready (it answers with its hello), then ping it."""
        while True:
            if self.board_ready.is_set():
                await self._send(link, MessageType.PING, str(time.monotonic()).encode())
            else:
                await self._send(link, MessageType.HELLO, b"")
            await asyncio.sleep(PING_INTERVAL_S)

    async def _read_board(self, link: ReliableSerialLink) -> None:
        handshake_deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while True:
            timeout = self.silence_timeout_s
            if not self.board_ready.is_set():
                timeout = max(timeout, handshake_deadline - time.monotonic())
            try:
                frame = await link.receive(timeout)
            except SerialLinkTimeout:
                raise SerialLinkError(f"board silent for {timeout:.0f} s") from None
            if frame.message_type == MessageType.HELLO:
                handshake_deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
                await self._on_hello(link, frame)
            elif frame.message_type == MessageType.READY:
                self._on_ready(frame)
            elif frame.message_type == MessageType.REPORT:
                self._on_report(frame, link)
            elif frame.message_type == MessageType.APPLY_RESULT:
                self._on_apply_result(frame)

    async def _on_hello(self, link: ReliableSerialLink, frame: Frame) -> None:
        try:
            hello = Hello.from_payload(frame.payload)
        except SerialFrameError as error:
            logger.warning("bridge %s: bad hello from the board: %s", self.device_id, error)
            return
        if self.board_ready.is_set():
            if hello.run == self.config.run:
                return  # a configured board answering our hello: nothing changed
            self._board_offline()  # an unconfigured board where a ready one was: it rebooted
        self.board_hello = hello
        await self._send(link, MessageType.CONFIG, board_config_payload(self.config))

    def _board_message(self, frame: Frame) -> dict[str, Any] | None:
        """A JSON frame from the board, or None (logged) when it does not parse."""
        try:
            return parse_json_payload(frame.payload)
        except SerialFrameError as error:
            logger.warning("bridge %s: bad %s from the board: %s", self.device_id, frame.message_type.name, error)
            return None

    def _on_ready(self, frame: Frame) -> None:
        ready = self._board_message(frame)
        if ready is None:
            return
        if ready.get("error"):
            raise BridgeError(f"board on {self.port} cannot take part as {self.device_id}: {ready['error']}")
        version = _version_in(ready)
        if ready.get("run") != self.config.run or ready.get("device") != self.device_id or version is None:
            logger.warning("bridge %s: ready for another run or device: %s", self.device_id, ready)
            return
        if self.board_ready.is_set() and version == self.board_version:
            return  # the answer to a repeated config
        first = self.offline_periods == 0 and not self.board_ready.is_set() and version == 0
        self.board_version = version
        self.board_ready.set()
        self._update_connected()
        hello = self.board_hello
        self._publish("status", DeviceStatus(online=True), retain=True)
        self._publish("hello", DeviceHello(device=self.device_id, profile=self.profile_name, version=version,
                                           kind_of_device="serial", port=self.port,
                                           board=hello.board if hello else None,
                                           capabilities=list(hello.capabilities) if hello else []))
        if not first or version < self.latest_target_version:
            self._ask_catch_up(f"board ready at version {version} after (re)connecting")

    def _on_report(self, frame: Frame, link: ReliableSerialLink) -> None:
        try:
            report = DeviceReport.decode(frame.payload)
        except MessageError as error:
            logger.warning("bridge %s: bad REPORT from the board: %s", self.device_id, error)
            return
        self.board_version = report.version
        # Delivery on the host's clock (the board's may differ): when the report arrived, less its time on
        # the line and the time the board spent between completing the update and sending the report.
        line_s = len(encode_frame(frame.message_type, frame.sequence, frame.payload, flags=frame.flags,
                                  session=frame.session, max_frame_bytes=link.max_frame_bytes)) / line_rate_bytes_per_s(link.baud)
        delivery_s = 0.0
        if report.published_at is not None and report.report_delay_seconds is not None:
            delivery_s = max(0.0, time.time() - line_s - report.report_delay_seconds - report.published_at)
        report = report.model_copy(update={"device": self.device_id, "delivery_seconds": delivery_s})
        self.latest_report.keep(report)
        self._publish("report", report)

    def _on_apply_result(self, frame: Frame) -> None:
        """The board rejected an update (or lost one in transfer): the run's nack, from the version it holds."""
        try:
            nack = DeviceNack.decode(frame.payload)
        except MessageError as error:
            logger.warning("bridge %s: bad APPLY_RESULT from the board: %s", self.device_id, error)
            return
        self.board_version = nack.version
        self._publish("nack", nack.model_copy(update={"device": self.device_id}))

    def _board_offline(self) -> None:
        if self.board_ready.is_set():
            self.board_ready.clear()
            self.offline_periods += 1
            self._update_connected()
            self._publish("status", DeviceStatus(online=False), retain=True)
        self.chunk_faults.drop_held()  # a board going offline loses what was on its way to it
        while not self._to_board.empty():  # what was queued for the board is lost with it
            self._to_board.get_nowait()
            self.dropped_while_offline += 1


def _version_in(message: dict[str, Any], default: int | None = None) -> int | None:
    """The model version a board message states, or `default` when it states none."""
    version = message.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else default


def _describe(frame: Frame) -> str:
    """What a log line shows of a frame's payload: text for text frames, key/index for chunks."""
    if frame.message_type == MessageType.UPDATE_CHUNK:
        try:
            chunk = UpdateChunk.from_payload(frame.payload)
        except SerialFrameError:
            return "(malformed chunk)"
        more = " more" if frame.flags & FLAG_MORE else ""
        return f"key={chunk.key} index={chunk.index} bytes={len(chunk.data)}{more}"
    if frame.message_type in (MessageType.PING, MessageType.PONG):
        return ""
    if frame.message_type in (MessageType.ACK, MessageType.NACK):
        try:
            ack = Ack.from_payload(frame.payload)
        except SerialFrameError:
            return "(malformed)"
        return f"of seq={ack.sequence} session={ack.session:08x} {ack.reason}".rstrip()
    if frame.message_type == MessageType.CONFIG:
        return "(run configuration)"
    if frame.message_type == MessageType.SYNC:
        try:
            session, known = parse_session_payload(frame.payload)
            return f"session={session:08x} knows={known:08x}"
        except SerialFrameError:
            return "(malformed)"
    text = parse_log_payload(frame.payload)
    return text if len(text) <= 400 else text[:400] + "…"
