"""The board agent: runs on a physical board, takes updates over a serial link, verifies, swaps, evaluates, measures energy."""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Awaitable, Callable

from devices.board_energy import BoardEnergy
from devices.board_state import BoardStateStore
from devices.board_updates import AppliedUpdate, BoardConfigRefused, BoardSetup, BoardUpdates, Deployment
from devices.chunk_repair import DamagedTransfer
from devices.energy_meters import EnergyMeter
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
from devices.serial_link import SerialLink, SerialLinkError, SerialLinkTimeout, line_rate_bytes_per_s
from devices.task_groups import run_together
from devices.update_receiver import CompletedUpdate, UpdateReceiver
from testbed.core.manifest import RejectReason, UpdateRejected
from testbed.core.messages import MAX_CONFIG_MESSAGE_BYTES, BoardConfig, DeviceReport, MessageError
from testbed.core.signing import TrustedKey

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


class BoardAgent:
    """The device side of a serial-attached board; `await agent.run()` serves until cancelled.

    Takes the same verify-then-swap rule as the emulated agent (devices.update_receiver) and measures
    energy with `meter`, integrated over the phases receive, apply, evaluate, transmit and idle; what it
    does with an update is devices.board_updates, shared with the network board. Frames
    travel over a ReliableSerialLink (in order, once, sent again when lost); a host that stops answering
    ends the link, which is reopened every second, and transfers in flight are dropped (the run sends a
    catch-up). Reports and rejections the host never acknowledged are sent again once it configures the
    board again. The model held is saved after every apply (`state`), so a rebooted board resumes from
    its version. A chunk refused by its digest (damaged before the serial line) is repaired as on an emulated
    device (devices.chunk_repair): once its update has stopped moving, the board asks for a catch-up.

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
        self.board_name = board_name
        self.profile = profile
        self.meter = meter
        self.baud = baud
        self.updates = BoardUpdates(board_name, profile, meter, setup, state, trusted_key)
        self.max_frame_bytes = max_frame_bytes
        self.link_settings = link_settings
        self._open_link = open_link or (lambda: SerialLink.open(port, baud, max_frame_bytes=max_frame_bytes))
        self.sessions = 0
        self.failed_frames = 0
        self.configured = asyncio.Event()
        self._link: ReliableSerialLink | None = None
        self._pieces: dict[tuple[str, int], bytearray] = {}
        self._pending_results: list[Frame] = []  # reports/rejections of a link that ended unacknowledged
        self._frames_resent_before = 0  # by the links of earlier sessions
        self._bytes_received_before = 0  # serial bytes of earlier sessions
        self._bytes_sent_before = 0
        self._round_received_from = 0
        self._round_sent_from = 0
        self.damage = DamagedTransfer(line_rate_bytes_per_s(baud) * 8)  # chunks come at most at the line's rate

    @property
    def deployment(self) -> Deployment | None:
        return self.updates.deployment

    @property
    def energy(self) -> BoardEnergy:
        return self.updates.energy

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
        loop = asyncio.get_running_loop()
        while True:
            check_s = self.damage.next_check_s()
            try:
                frame = await link.receive(RECEIVE_POLL_S if check_s is None
                                           else min(RECEIVE_POLL_S, check_s - loop.time()))
            except SerialLinkTimeout:
                await self._ask_repair_if_due()
                continue
            try:
                await self._handle(frame)
            except (SerialLinkError, asyncio.CancelledError):
                raise
            except Exception:  # noqa: BLE001 — one frame the board cannot handle must not end the board
                self.failed_frames += 1
                logger.exception("board %s: dropped a %s frame that failed to be handled", self.board_name,
                                 frame.message_type.name)
            await self._ask_repair_if_due()

    async def _ask_repair_if_due(self) -> None:
        """Ask for a catch-up once an update with a chunk refused by its digest has stopped moving (chunk_repair)."""
        deployment = self.deployment
        in_flight = deployment is not None and deployment.receiver.transfers_in_flight
        if self.damage.repair_due(asyncio.get_running_loop().time(), in_flight):
            await self._reject("a chunk failed its digest and its update stopped; repair it")

    @property
    def rejected_updates(self) -> int:
        return self.updates.rejected_updates

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
            self.updates.check_trust(config)
        except SerialFrameError as error:
            await self._send(MessageType.READY, json_payload({"error": f"bad config: {error}"}))
            return
        except BoardConfigRefused as error:
            await self._send(MessageType.READY, json_payload({"error": str(error)}))
            return
        if not self.updates.holds(config):
            self.configured.clear()
            self._pending_results.clear()  # reports of another run
            try:
                await self.updates.deploy(config)
            except BoardConfigRefused as error:
                await self._send(MessageType.READY, json_payload({"error": str(error)}))
                return
            if self.updates.resumed_version is not None:
                await self._log(f"resumed {config.device} of run {config.run} at version {self.updates.resumed_version}")
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

    async def _update_frame(self, deployment: Deployment, frame: Frame) -> None:
        """Take a manifest or a chunk's frame; a chunk refused by its digest is noted as damage (chunk_repair)."""
        receiver = deployment.receiver
        refused = receiver.rejections[RejectReason.BAD_CHUNK]
        try:
            await self._take_update_frame(deployment, frame)
        finally:
            if receiver.rejections[RejectReason.BAD_CHUNK] > refused:
                self.damage.chunk_refused()

    async def _take_update_frame(self, deployment: Deployment, frame: Frame) -> None:
        receiver = deployment.receiver
        self.updates.begin_receiving()
        try:
            if frame.message_type == MessageType.MANIFEST:
                completed = receiver.add_manifest_payload(frame.payload)
            else:
                try:
                    piece = UpdateChunk.from_payload(frame.payload)
                except SerialFrameError as error:
                    raise receiver.reject(RejectReason.BAD_CHUNK, str(error)) from None
                self.damage.chunk_arrived(asyncio.get_running_loop().time(), len(piece.data))
                completed = self._add_chunk_piece(receiver, piece, frame.flags)
        except UpdateRejected as error:
            # Counted by the receiver; only a genuine update the board could not use asks for a catch-up.
            if error.reason.asks_for_repair:
                self._drop_transfers()
                await self._reject(f"rejected: {error}")
            else:
                await self._log(f"refused a {frame.message_type.name} frame: {str(error)[:200]}")
            self.updates.end_receiving(bool(self._pieces))
            return
        if completed is not None:
            await self._apply_and_report(deployment, completed)
        else:
            self.updates.end_receiving(bool(self._pieces))

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

    async def _apply_and_report(self, deployment: Deployment, completed: CompletedUpdate) -> None:
        try:
            applied = await self.updates.apply(completed)
        except UpdateRejected as error:
            await self._reject(f"update {completed.manifest.key} rejected: {error}")
            return
        self.damage.update_applied()
        await self._send(MessageType.REPORT, self._report(applied).encode())
        await self._log(f"applied {completed.manifest.key}: version {deployment.receiver.version}, accuracy "
                        f"{applied.accuracy:.4f}, {applied.energy.total_joules:.3f} J since the last report")
        self.updates.idle()

    async def _reject(self, reason: str) -> None:
        logger.warning("board %s: %s", self.board_name, reason)
        self.energy.begin_phase("transmit")
        nack = self.updates.nack(reason, session=self.sessions)
        # the repairs asked so far (as an emulated device's nack): the run tells a repair asked again from a repeat
        nack = nack.model_copy(update={"repair": self.damage.repairs_asked or None})
        await self._send(MessageType.APPLY_RESULT, nack.encode())
        self.updates.idle()

    def _drop_transfers(self) -> None:
        self._pieces.clear()
        self.updates.drop_transfers()

    async def _send(self, message_type: MessageType, payload: bytes) -> Frame:
        link = self._link
        if link is None:
            raise SerialLinkError(f"{self.port}: not open")
        return await link.send(message_type, payload)

    async def _log(self, line: str) -> None:
        """A log line to the host (it lands in the run's serial log) and to the local log."""
        logger.info("board %s: %s", self.board_name, line)
        await self._send(MessageType.LOG, log_payload(line)[: self.max_frame_bytes - 64])

    def _report(self, applied: AppliedUpdate) -> DeviceReport:
        link = self._link
        received_total = self._bytes_received_before + (link.bytes_received if link else 0)
        sent_total = self._bytes_sent_before + (link.bytes_sent if link else 0)
        report = self.updates.report(
            applied, kind="serial", received_bytes=received_total - self._round_received_from,
            transmitted_bytes=sent_total - self._round_sent_from, total_received_bytes=received_total,
            serial_frames_lost=self.frames_resent,  # lost on the line (or their ACK was) and sent again
        )
        self._round_received_from, self._round_sent_from = received_total, sent_total
        return report
