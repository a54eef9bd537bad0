"""The board agent: runs on a physical board, takes updates over a serial link, verifies, swaps, evaluates, measures energy."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from devices.agent import InferenceModel
from devices.board_energy import BoardEnergy
from devices.board_state import BoardStateStore
from devices.energy_meters import EnergyMeter, PhaseEnergy
from devices.profiles import DeviceProfile
from devices.frame_order import LinkSettings
from devices.reliable_serial import ReliableSerialLink
from devices.serial_framing import (
    DEFAULT_MAX_FRAME_BYTES,
    FLAG_MORE,
    Frame,
    Hello,
    MessageType,
    SerialFrameError,
    UpdateChunk,
    json_payload,
    log_payload,
)
from devices.serial_link import SerialLink, SerialLinkError, SerialLinkTimeout
from devices.task_groups import run_together
from devices.update_receiver import CompletedUpdate, UpdateReceiver, UpdateTrust
from testbed.core.manifest import RejectReason, UpdateRejected
from testbed.core.messages import MAX_CONFIG_MESSAGE_BYTES, BoardConfig, DeviceNack, DeviceReport, MessageError
from testbed.core.signing import SigningKeyError, TrustedKey
from testbed.core.wire import weights_hash

logger = logging.getLogger("devices.board")

REOPEN_DELAY_S = 1.0
RECEIVE_POLL_S = 5.0  # the session loop wakes this often while nothing arrives (the link itself keeps time)
RESULT_TYPES = (MessageType.REPORT, MessageType.APPLY_RESULT)  # carried over when the host never acknowledged them
MAX_PIECES_IN_FLIGHT = 64  # chunks split over several frames and not yet whole


def board_config_payload(config: BoardConfig) -> bytes:
    """A CONFIG frame's payload: the message, zlib-compressed so that a scenario with many devices still fits a frame."""
    return zlib.compress(config.encode(), 9)


def board_config_from_payload(payload: bytes) -> BoardConfig:
    """The BoardConfig in a CONFIG frame's payload; SerialFrameError saying what is wrong otherwise."""
    inflater = zlib.decompressobj()
    try:
        # Bounded: a small frame must not inflate to more than a config may hold.
        data = inflater.decompress(payload, MAX_CONFIG_MESSAGE_BYTES + 1)
    except zlib.error as error:
        raise SerialFrameError(f"config is not zlib-compressed JSON: {error}") from None
    if len(data) > MAX_CONFIG_MESSAGE_BYTES or inflater.unconsumed_tail:
        raise SerialFrameError(f"config inflates beyond the {MAX_CONFIG_MESSAGE_BYTES}-byte limit")
    if not inflater.eof:
        raise SerialFrameError("config is not zlib-compressed JSON: the stream is truncated")
    try:
        return BoardConfig.decode(data)
    except MessageError as error:
        raise SerialFrameError(str(error)) from None


BoardSetup = Callable[[BoardConfig], InferenceModel]
"""Builds the model and the local test split a board runs (testbed.inference.device_inference)."""


@dataclass
class _Deployment:
    """A configured board: its run, its model and what it holds."""

    config: BoardConfig
    inference: InferenceModel
    receiver: UpdateReceiver


class BoardAgent:
    """The device side of a serial-attached board; `await agent.run()` serves until cancelled.

    Takes the same verify-then-swap rule as the emulated agent (devices.update_receiver) and measures
    energy with `meter`, integrated over the phases receive, apply, evaluate, transmit and idle. Frames
    travel over a ReliableSerialLink (in order, once, sent again when lost); a host that stops answering
    ends the link, which is reopened every second, and transfers in flight are dropped (the run sends a
    catch-up). Reports and rejections the host never acknowledged are sent again once it configures the
    board again. The model held is saved after every apply (`state`), so a rebooted board resumes from
    its version.

    Updates must be signed by the run's key, which the host's config frame names; `trusted_key` pins it
    (`testbed board --trust`), so a host that is not the run's server cannot make the board apply anything:
    a config naming another key is refused.
    """

    def __init__(self, port: str, *, board_name: str, profile: DeviceProfile, meter: EnergyMeter, setup: BoardSetup,
                 baud: int = 115200, state: BoardStateStore | None = None,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 open_link: Callable[[], Awaitable[SerialLink]] | None = None,
                 link_settings: LinkSettings | None = None, trusted_key: TrustedKey | None = None) -> None:
        self.port = port
        self.trusted_key = trusted_key
        self.board_name = board_name
        self.profile = profile
        self.meter = meter
        self.setup = setup
        self.baud = baud
        self.state = state
        self.max_frame_bytes = max_frame_bytes
        self.link_settings = link_settings
        self._open_link = open_link or (lambda: SerialLink.open(port, baud, max_frame_bytes=max_frame_bytes))
        self.deployment: _Deployment | None = None
        self.sessions = 0
        self.failed_frames = 0
        self.configured = asyncio.Event()
        self._link: ReliableSerialLink | None = None
        self._pieces: dict[tuple[str, int], bytearray] = {}
        self._pending_results: list[Frame] = []  # reports/rejections of a link that ended unacknowledged
        self._frames_resent_before = 0  # by the links of earlier sessions
        self.energy = BoardEnergy(meter)
        self._bytes_received_before = 0  # serial bytes of earlier sessions
        self._bytes_sent_before = 0
        self._round_received_from = 0
        self._round_sent_from = 0

    @property
    def frames_resent(self) -> int:
        """Frames this board sent again because the line lost them (or their ACK), over all sessions."""
        return self._frames_resent_before + (self._link.protocol.frames_resent if self._link else 0)

    # --- lifetime -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Keep the port open (reopening it after unplugging) and sample power, until cancelled."""
        await run_together(self.energy.run(), self._serve())

    async def _serve(self) -> None:
        reported_failure = False
        while True:
            try:
                link = await self._open_link()
            except SerialLinkError as error:
                if not reported_failure:
                    logger.warning("board %s: %s; retrying every %.0f s", self.board_name, error, REOPEN_DELAY_S)
                    reported_failure = True
                await asyncio.sleep(REOPEN_DELAY_S)
                continue
            reported_failure = False
            self.sessions += 1
            async with ReliableSerialLink(link, self.link_settings) as reliable:
                try:
                    await self._session(reliable)
                except SerialLinkError as error:
                    if reliable.protocol.peer_session is None:
                        logger.info("board %s: no host answering on %s (%s)", self.board_name, self.port, error)
                    else:
                        logger.warning("board %s: serial link lost (%s)", self.board_name, error)
                finally:
                    self._bytes_received_before += link.bytes_received
                    self._bytes_sent_before += link.bytes_sent
                    self._frames_resent_before += reliable.protocol.frames_resent
                    self._keep_results(reliable)
                    self._link = None
            self._drop_transfers()
            await asyncio.sleep(REOPEN_DELAY_S)

    async def _session(self, link: ReliableSerialLink) -> None:
        self._link = link
        logger.info("board %s: port %s open at %d baud", self.board_name, self.port, self.baud)
        await self._send(MessageType.HELLO, self._hello().to_payload())
        while True:
            try:
                frame = await link.receive(RECEIVE_POLL_S)
            except SerialLinkTimeout:
                continue
            try:
                await self._handle(frame)
            except (SerialLinkError, asyncio.CancelledError):
                raise
            except Exception:  # noqa: BLE001 — one frame the board cannot handle must not end the board
                self.failed_frames += 1
                logger.exception("board %s: dropped a %s frame that failed to be handled", self.board_name,
                                 frame.message_type.name)

    @property
    def rejected_updates(self) -> int:
        return self.deployment.receiver.rejected_updates if self.deployment else 0

    def _keep_results(self, link: ReliableSerialLink) -> None:
        """Reports and rejections the host did not acknowledge: sent again after the next config."""
        self._pending_results += [frame for frame in link.take_abandoned() if frame.message_type in RESULT_TYPES]

    def _hello(self) -> Hello:
        deployment = self.deployment
        return Hello(self.board_name, self.profile.name, (f"energy:{self.meter.name}", f"serial:{self.baud}"),
                     version=deployment.receiver.version if deployment else 0,
                     run=deployment.config.run if deployment else "")

    # --- frames ---------------------------------------------------------------------------------------

    async def _handle(self, frame: Frame) -> None:
        if frame.message_type == MessageType.CONFIG:
            await self._configure(frame.payload)
            return
        if frame.message_type == MessageType.PING:
            await self._send(MessageType.PONG, frame.payload)
        elif frame.message_type == MessageType.HELLO:  # the host (re)opened the port and asks who is there
            await self._send(MessageType.HELLO, self._hello().to_payload())
        elif frame.message_type in (MessageType.MANIFEST, MessageType.UPDATE_CHUNK):
            if self.deployment is None:
                await self._log(f"ignoring a {frame.message_type.name} frame: not configured yet")
                return
            await self._update_frame(self.deployment, frame)
        else:
            await self._log(f"ignoring an unexpected {frame.message_type.name} frame")

    async def _configure(self, payload: bytes) -> None:
        try:
            config = board_config_from_payload(payload)
            run_key = TrustedKey.from_text(config.public_key)
        except (SerialFrameError, SigningKeyError) as error:
            await self._send(MessageType.READY, json_payload({"error": f"bad config: {error}"}))
            return
        if self.trusted_key is not None and run_key != self.trusted_key:
            await self._send(MessageType.READY, json_payload({
                "error": f"run {config.run} signs its updates with key {run_key.key_id}…, but this board trusts "
                         f"only {self.trusted_key.key_id}… (testbed board --trust); give the run that key's "
                         "signing key (testbed run --signing-key)"}))
            return
        current = self.deployment
        if current is None or (current.config.run, current.config.device, current.config.public_key) != (
                config.run, config.device, config.public_key):
            self.configured.clear()
            self._pending_results.clear()  # reports of another run
            try:
                inference = await asyncio.to_thread(self.setup, config)
                receiver = UpdateReceiver(inference.initial_weights(), config.init_seed,
                                          UpdateTrust(config.run, run_key))
                saved = self.state.load(config.run, config.device) if self.state else None
                if saved is not None:
                    receiver.restore(saved.version, saved.weights)
                await asyncio.to_thread(inference.load_weights, receiver.weights)
            except Exception as error:  # noqa: BLE001 — any setup failure is reported to the host, which stops the run
                logger.exception("board %s: cannot set up for %s", self.board_name, config.device)
                await self._send(MessageType.READY, json_payload({"error": f"board cannot set up: {error!r}"}))
                return
            self.deployment = _Deployment(config, inference, receiver)
            if saved is not None:
                await self._log(f"resumed {config.device} of run {config.run} at version {saved.version}")
        self._drop_transfers()
        deployment = self.deployment
        assert deployment is not None
        self.configured.set()
        await self._send(MessageType.READY, json_payload({
            "device": deployment.config.device, "run": deployment.config.run,
            "version": deployment.receiver.version, "error": None,
        }))
        # Reports the host did not acknowledge before its session ended: sent again, under new sequence numbers.
        if self._link is not None:  # a host session that ended within this link (frames still in flight stay there)
            self._pending_results += [frame for frame in self._link.protocol.take_abandoned()
                                      if frame.message_type in RESULT_TYPES]
        pending, self._pending_results = self._pending_results, []
        for frame in pending:
            await self._send(frame.message_type, frame.payload)

    async def _update_frame(self, deployment: _Deployment, frame: Frame) -> None:
        receiver = deployment.receiver
        if self.energy.phase == "idle":
            self.energy.begin_phase("receive")
        try:
            if frame.message_type == MessageType.MANIFEST:
                completed = receiver.add_manifest_payload(frame.payload)
            else:
                try:
                    piece = UpdateChunk.from_payload(frame.payload)
                except SerialFrameError as error:
                    raise receiver.reject(RejectReason.BAD_CHUNK, str(error)) from None
                completed = self._add_chunk_piece(receiver, piece, frame.flags)
        except UpdateRejected as error:
            # Counted by the receiver; only a genuine update the board could not use asks for a catch-up.
            if error.reason.asks_for_repair:
                self._drop_transfers()
                await self._reject(deployment, f"rejected: {error}")
            else:
                await self._log(f"refused a {frame.message_type.name} frame: {str(error)[:200]}")
            if not receiver.transfers_in_flight and not self._pieces:
                self.energy.begin_phase("idle")
            return
        if completed is not None:
            await self._apply_and_report(deployment, completed)
        elif not receiver.transfers_in_flight and not self._pieces:
            self.energy.begin_phase("idle")

    def _add_chunk_piece(self, receiver: UpdateReceiver, piece: UpdateChunk, flags: int) -> CompletedUpdate | None:
        if (piece.key, piece.index) not in self._pieces and len(self._pieces) >= MAX_PIECES_IN_FLIGHT:
            raise receiver.reject(RejectReason.BAD_CHUNK, f"more than {MAX_PIECES_IN_FLIGHT} chunks arriving at once")
        held = self._pieces.setdefault((piece.key, piece.index), bytearray())
        held += piece.data
        if len(held) > receiver.assembler.max_update_bytes:
            del self._pieces[(piece.key, piece.index)]
            raise receiver.reject(RejectReason.BAD_CHUNK,
                                  f"chunk {piece.index} of update {piece.key} grows beyond the update size limit")
        if flags & FLAG_MORE:
            return None
        return receiver.add_chunk(piece.key, piece.index, bytes(self._pieces.pop((piece.key, piece.index))))

    async def _apply_and_report(self, deployment: _Deployment, completed: CompletedUpdate) -> None:
        completed_at = time.monotonic()
        receiver = deployment.receiver
        self.energy.begin_phase("apply")
        try:
            version, weights = await asyncio.to_thread(receiver.verify, completed)
        except UpdateRejected as error:
            await self._reject(deployment, f"update {completed.manifest.key} rejected: {error}")
            return
        await asyncio.to_thread(deployment.inference.load_weights, weights)
        receiver.commit(version, weights)
        if self.state is not None:
            await asyncio.to_thread(self.state.save, deployment.config.run, deployment.config.device,
                                    version, weights)
        apply_s = time.monotonic() - completed_at
        self.energy.begin_phase("evaluate")
        started = time.monotonic()
        accuracy = await asyncio.to_thread(deployment.inference.accuracy)
        evaluate_s = time.monotonic() - started
        self.energy.begin_phase("transmit")
        energy = self.energy.close_round()
        report = self._report(deployment, completed, accuracy, apply_s, evaluate_s, energy,
                              report_delay_s=time.monotonic() - completed_at)
        await self._send(MessageType.REPORT, report.encode())
        await self._log(f"applied {completed.manifest.key}: version {version}, accuracy {accuracy:.4f}, "
                        f"{energy.total_joules:.3f} J since the last report")
        self.energy.begin_phase("idle")

    async def _reject(self, deployment: _Deployment, reason: str) -> None:
        logger.warning("board %s: %s", self.board_name, reason)
        self.energy.begin_phase("transmit")
        nack = DeviceNack(device=deployment.config.device, version=deployment.receiver.version, reason=reason[:1024],
                          session=self.sessions)
        await self._send(MessageType.APPLY_RESULT, nack.encode())
        self.energy.begin_phase("idle")

    def _drop_transfers(self) -> None:
        self._pieces.clear()
        if self.deployment is not None:
            self.deployment.receiver.drop_transfers()
        if self.energy.phase == "receive":
            self.energy.begin_phase("idle")

    async def _send(self, message_type: MessageType, payload: bytes) -> Frame:
        link = self._link
        if link is None:
            raise SerialLinkError(f"{self.port}: not open")
        return await link.send(message_type, payload)

    async def _log(self, line: str) -> None:
        """A log line to the host (it lands in the run's serial log) and to the local log."""
        logger.info("board %s: %s", self.board_name, line)
        await self._send(MessageType.LOG, log_payload(line)[: self.max_frame_bytes - 64])

    def _report(self, deployment: _Deployment, completed: CompletedUpdate, accuracy: float, apply_s: float,
                evaluate_s: float, energy: PhaseEnergy, report_delay_s: float) -> DeviceReport:
        link = self._link
        received_total = self._bytes_received_before + (link.bytes_received if link else 0)
        sent_total = self._bytes_sent_before + (link.bytes_sent if link else 0)
        report = DeviceReport(
            device=deployment.config.device,
            profile=self.profile.name,
            kind_of_device="serial",
            round=completed.manifest.round_index,
            version=deployment.receiver.version,
            weights_hash=weights_hash(deployment.receiver.weights).hex(),
            accuracy=float(accuracy),
            update_bytes=len(completed.payload),
            received_bytes=received_total - self._round_received_from,
            transmitted_bytes=sent_total - self._round_sent_from,
            total_received_bytes=received_total,
            published_at=completed.manifest.published_at,
            report_delay_seconds=report_delay_s,
            apply_seconds=apply_s,
            evaluate_seconds=evaluate_s,
            **self.energy.report_fields(energy),
            rejected_updates=self.rejected_updates,
            rejected_by_reason=deployment.receiver.rejected_by_reason,
            serial_frames_lost=self.frames_resent,  # lost on the line (or their ACK was) and sent again
        )
        self._round_received_from, self._round_sent_from = received_total, sent_total
        return report

