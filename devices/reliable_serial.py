"""One reliable serial link for both ends: numbered frames, ACK/NACK, bounded resend, in-order exactly-once delivery.

Both the host bridge and the board agent talk through `ReliableSerialLink`, which sits on a `SerialLink`
(COBS + CRC32 frames, paced at the line rate). The protocol is pure (`LinkProtocol`, driven by a clock the
caller passes in) and the asyncio class only moves its frames:

* Each end numbers what it sends in a *session*: a random non-zero u32 chosen when it starts, carried in
  every frame's header, so a receiver drops a frame of an ended session instead of taking it. The first
  frame of a session is SYNC (sequence 0, payload the session); nothing else is sent until it is
  acknowledged, so a receiver never mistakes a new session's frames for an old one's.
* The receiver delivers frames in sequence order through a bounded reorder buffer (devices.frame_order),
  each once: duplicates are recognised by their sequence number, never by their payload, so a message
  sent twice on purpose is delivered twice. It acknowledges cumulatively (ACK of the last in-order
  sequence, with the session) after every frame and asks for each gap once per round (NACK).
* The sender keeps at most `window` frames unacknowledged (no more than the reorder buffer holds) and
  sends one again when the peer asks (NACK) or when its ACK is `ack_timeout_s` late. A frame sent
  `max_sends` times without an ACK, or a gap asked for `max_sends` times in vain, ends the link with
  `PeerUnresponsive` (a SerialLinkError): the peer stopped answering.
* A new peer session whose SYNC does not know our session and is not the one that acknowledged it (the
  peer restarted), or a NACK of session 0 ("I hold no session of yours"), ends our session: ours
  starts again with a new SYNC and the frames it had in flight are handed back (`take_abandoned`) for
  the caller to send again or drop. A SYNC says which session of ours its sender knows and an ACK's
  header names the acknowledging session, so two ends never restart each other in turn.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

from devices.frame_order import HALF_SPACE, SEQUENCE_SPACE, FrameGapTooLarge, FrameReorder
from devices.serial_framing import (
    Ack,
    Frame,
    MessageType,
    SerialFrameError,
    framing_overhead_bytes,
    parse_session_payload,
    session_payload,
)
from devices.serial_link import SerialLink, SerialLinkError, SerialLinkTimeout

logger = logging.getLogger("devices.serial")

CONTROL_TYPES = frozenset({MessageType.ACK, MessageType.NACK})
DELIVERED_QUEUE_FRAMES = 256  # delivered but unread; beyond this the link stops reading (and acknowledging)
ABANDONED_KEPT = 256  # unacknowledged messages of ended sessions kept for `take_abandoned`
MIN_WAIT_S = 0.005  # never wait 0 s: Python 3.11's wait with timeout 0 can lose a cancellation


class PeerUnresponsive(SerialLinkError):
    """The peer stopped acknowledging frames (or never sent the ones it owes); the link is finished."""


@dataclass(frozen=True)
class LinkSettings:
    """How patient the link is: frames in flight, time to wait for an ACK, sends before giving up."""

    window: int = 32
    ack_timeout_s: float = 1.0
    max_sends: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.window < HALF_SPACE:
            raise SerialLinkError(f"window must be in 1..{HALF_SPACE - 1} frames, got {self.window}")
        if not self.ack_timeout_s > 0 or self.max_sends < 1:
            raise SerialLinkError(f"ack_timeout_s must be > 0 and max_sends >= 1, got {self.ack_timeout_s}, "
                                  f"{self.max_sends}")

    @classmethod
    def for_line(cls, baud: int, max_frame_bytes: int, **overrides: float) -> LinkSettings:
        """Settings whose ACK timeout covers a full frame each way at `baud` (8N1) with a second to spare."""
        line_s = (max_frame_bytes + framing_overhead_bytes(max_frame_bytes)) * 10 / baud
        settings = {"ack_timeout_s": 1.0 + 2 * line_s, **overrides}
        return cls(**settings)  # type: ignore[arg-type]

    @property
    def give_up_after_s(self) -> float:
        return self.ack_timeout_s * self.max_sends


@dataclass
class _InFlight:
    frame: Frame
    sends: int
    due: float


@dataclass
class Step:
    """What the protocol wants done after an event: frames to put on the line, frames for the application."""

    transmit: list[Frame] = field(default_factory=list)
    deliver: list[Frame] = field(default_factory=list)


def _after(sequence: int, offset: int) -> int:
    return (sequence + offset) % SEQUENCE_SPACE


def control_frame(message_type: MessageType, sequence: int, session: int, reason: str = "", *,
                  sender_session: int = 0) -> Frame:
    """An ACK or NACK of `sequence` in `session` (outside the numbered stream: its sequence field is 0).

    Its header carries the sender's own session, so the peer knows which of our sessions holds its own.
    """
    return Frame(message_type, 0, Ack(sequence, session, reason).to_payload(), session=sender_session)


class LinkProtocol:
    """Pure bookkeeping of one end of the link; every method takes `now` (seconds, any monotonic clock).

    Call `start` once, then `on_frame` for every frame that arrives, `on_timer` when `next_deadline` passes,
    and `send` while `window_open`. Each returns the frames to write; `on_frame` also the frames to deliver.
    """

    def __init__(self, settings: LinkSettings, new_session: Callable[[], int]) -> None:
        self.settings = settings
        self._new_session = new_session
        self.session = 0
        self.synced = False  # our SYNC was acknowledged: data may flow
        self.acknowledged_by = 0  # the peer's session whose end acknowledged our SYNC (its receiver holds ours)
        self.peer_session: int | None = None
        self._next_sequence = 0
        self._in_flight: OrderedDict[int, _InFlight] = OrderedDict()
        self._order = FrameReorder(settings.window)
        self._nack_rounds = 0
        self._nack_due = math.inf
        self._abandoned: list[Frame] = []
        self.sessions_started = 0
        self.peer_restarts = 0
        self.frames_resent = 0
        self.stale_frames = 0  # beyond any window the peer may have in flight: leftovers of an older session

    # --- sending --------------------------------------------------------------------------------------

    def start(self, now: float) -> list[Frame]:
        """Begin a new session: frames still in flight are abandoned, SYNC goes first."""
        self._abandoned += [entry.frame for entry in self._in_flight.values()
                            if entry.frame.message_type != MessageType.SYNC]
        del self._abandoned[:-ABANDONED_KEPT]  # nobody collects them: the newest are kept
        self._in_flight.clear()
        self.session = self._new_session()
        self.synced = False
        self.acknowledged_by = 0
        self._next_sequence = 0
        self.sessions_started += 1
        return [self._number(MessageType.SYNC, session_payload(self.session, self.peer_session or 0), 0, now)]

    @property
    def window_open(self) -> bool:
        return self.synced and len(self._in_flight) < self.settings.window

    @property
    def in_flight(self) -> list[Frame]:
        return [entry.frame for entry in self._in_flight.values()]

    def send(self, message_type: MessageType, payload: bytes, flags: int, now: float) -> Frame:
        """Number a message for sending; SerialLinkError unless `window_open`."""
        if message_type in CONTROL_TYPES or message_type == MessageType.SYNC:
            raise SerialLinkError(f"{message_type.name} frames belong to the link itself")
        if not self.window_open:
            raise SerialLinkError("the send window is closed (not synchronised yet, or full)")
        return self._number(message_type, bytes(payload), flags, now)

    def sent(self, frame: Frame, now: float) -> None:
        """The line has carried `frame` at `now`: its ACK is due from then."""
        entry = self._in_flight.get(frame.sequence)
        if entry is not None and entry.frame is frame:
            entry.due = now + self.settings.ack_timeout_s

    def sends_of(self, frame: Frame) -> int:
        """How often `frame` (one this end numbered and has in flight) was handed out to send; 0 otherwise."""
        entry = self._in_flight.get(frame.sequence)
        return entry.sends if entry is not None and entry.frame is frame else 0

    def take_abandoned(self) -> list[Frame]:
        """Messages (not SYNCs) dropped unacknowledged when a session ended, oldest first; forgotten here."""
        abandoned, self._abandoned = self._abandoned, []
        return abandoned

    def _number(self, message_type: MessageType, payload: bytes, flags: int, now: float) -> Frame:
        frame = Frame(message_type, self._next_sequence, payload, flags, self.session)
        self._next_sequence = _after(self._next_sequence, 1)
        self._in_flight[frame.sequence] = _InFlight(frame, 1, now + self.settings.ack_timeout_s)
        return frame

    def _resend(self, entry: _InFlight, now: float) -> Frame:
        if entry.sends >= self.settings.max_sends:
            raise PeerUnresponsive(
                f"peer silent for {entry.sends * self.settings.ack_timeout_s:.1f} s: {entry.frame.message_type.name} "
                f"seq={entry.frame.sequence} sent {entry.sends} times, never acknowledged")
        entry.sends += 1
        entry.due = now + self.settings.ack_timeout_s
        self.frames_resent += 1
        if entry.frame.message_type == MessageType.SYNC:  # says which of the peer's sessions we know by now
            entry.frame = Frame(MessageType.SYNC, entry.frame.sequence,
                                session_payload(self.session, self.peer_session or 0), session=self.session)
        return entry.frame

    def _on_ack(self, ack: Ack, sender_session: int) -> None:
        if ack.session != self.session:
            return  # an older session's ACK
        for sequence in list(self._in_flight):
            if (ack.sequence - sequence) % SEQUENCE_SPACE >= HALF_SPACE:
                break  # in flight in order: everything after this is not acknowledged either
            if self._in_flight.pop(sequence).frame.message_type == MessageType.SYNC:
                self.synced, self.acknowledged_by = True, sender_session

    def _on_nack(self, nack: Ack, now: float) -> list[Frame]:
        if nack.session == 0:  # "I hold no session of yours": the peer restarted after our SYNC
            return self.start(now) if self.synced else []
        entry = self._in_flight.get(nack.sequence)
        if nack.session != self.session or entry is None:
            return []
        return [self._resend(entry, now)]

    # --- receiving ------------------------------------------------------------------------------------

    def on_frame(self, frame: Frame, now: float) -> Step:
        """Account for one frame from the line."""
        if frame.message_type in CONTROL_TYPES:
            try:
                control = Ack.from_payload(frame.payload)
            except SerialFrameError:
                self.stale_frames += 1
                return Step()
            if frame.message_type == MessageType.ACK:
                self._on_ack(control, frame.session)
                return Step()
            return Step(transmit=self._on_nack(control, now))
        step = Step()
        if frame.message_type == MessageType.SYNC:
            try:
                session, known = parse_session_payload(frame.payload)
            except SerialFrameError:
                self.stale_frames += 1
                return step
            if session != self.peer_session:
                self.peer_restarts += self.peer_session is not None
                self.peer_session = session
                if self.synced and known != self.session and session != self.acknowledged_by:
                    step.transmit += self.start(now)  # our session lived in a receiver that is gone: start over
                self._order.reset(frame.sequence)
                self._nack_rounds, self._nack_due = 0, math.inf
        elif self.peer_session is None:
            step.transmit.append(control_frame(MessageType.NACK, frame.sequence, 0, "no session",
                                               sender_session=self.session))
            return step
        elif frame.session != self.peer_session:
            self.stale_frames += 1  # a leftover of an ended session (its SYNC came before ours was acknowledged)
            return step
        had_gap = bool(self._order.missing)
        try:
            ready = self._order.accept(frame)
        except FrameGapTooLarge:
            self.stale_frames += 1
            return step
        step.deliver = [item for item in ready if item.message_type != MessageType.SYNC]
        assert self._order.expected is not None
        step.transmit.append(control_frame(MessageType.ACK, _after(self._order.expected, -1), self.peer_session,
                                           sender_session=self.session))
        if not self._order.missing:
            self._nack_rounds, self._nack_due = 0, math.inf
        elif not had_gap:
            step.transmit += self._ask_for_missing(now)
        return step

    @property
    def duplicates(self) -> int:
        return self._order.duplicates

    def _ask_for_missing(self, now: float) -> list[Frame]:
        missing = self._order.missing
        if self._nack_rounds >= self.settings.max_sends:
            raise PeerUnresponsive(f"peer silent: frames {missing[0]}..{missing[-1]} asked for "
                                   f"{self._nack_rounds} times, never sent again")
        self._nack_rounds += 1
        self._nack_due = now + self.settings.ack_timeout_s
        assert self.peer_session is not None
        return [control_frame(MessageType.NACK, sequence, self.peer_session, "lost", sender_session=self.session)
                for sequence in missing]

    # --- time -----------------------------------------------------------------------------------------

    @property
    def next_deadline(self) -> float:
        """When `on_timer` has work next (math.inf: nothing pending)."""
        due = min((entry.due for entry in self._in_flight.values()), default=math.inf)
        return min(due, self._nack_due)

    def on_timer(self, now: float) -> list[Frame]:
        """Frames whose ACK is late sent again, gaps asked for again; PeerUnresponsive when out of sends."""
        transmit = [self._resend(entry, now) for entry in list(self._in_flight.values()) if entry.due <= now]
        if self._nack_due <= now:
            if self._order.missing:
                transmit += self._ask_for_missing(now)
            else:
                self._nack_rounds, self._nack_due = 0, math.inf
        return transmit


def new_session_id() -> int:
    """A random non-zero u32 (a restarted end must not reuse its previous session)."""
    return secrets.randbits(32) or 1


class ReliableSerialLink:
    """The reliable link over a SerialLink. `async with ReliableSerialLink(link) as reliable:`.

    `send` returns once the frame is on the line (it waits, at most `give_up_after_s`, for room in the
    window); `receive` returns delivered messages in order. A background task reads the line, answers
    ACK/NACK and resends; its failure (PeerUnresponsive, the port gone) is raised by every later call.
    Closing it closes the SerialLink too.
    """

    def __init__(self, link: SerialLink, settings: LinkSettings | None = None, *,
                 new_session: Callable[[], int] = new_session_id,
                 observer: Callable[[bool, Frame, str], None] | None = None) -> None:
        self.link = link
        self.observer = observer  # (outgoing, frame, note) for every frame on the line: a serial log
        self.name = link.name
        self.settings = settings or LinkSettings.for_line(link.baud, link.max_frame_bytes)
        self.protocol = LinkProtocol(self.settings, new_session)
        self._delivered: asyncio.Queue[Frame | None] = asyncio.Queue(DELIVERED_QUEUE_FRAMES)
        self._changed = asyncio.Event()
        self._failure: SerialLinkError | None = None
        self._pump: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ReliableSerialLink:  # noqa: PYI034 — the project's convention
        self._pump = asyncio.get_running_loop().create_task(self._run(), name=f"{self.name}-reliable")
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    @property
    def max_frame_bytes(self) -> int:
        return self.link.max_frame_bytes

    @property
    def baud(self) -> int:
        return self.link.baud

    @property
    def bytes_sent(self) -> int:
        return self.link.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.link.bytes_received

    @property
    def connected(self) -> bool:
        """Our session is acknowledged by the peer."""
        return self.protocol.synced

    def take_abandoned(self) -> list[Frame]:
        """Messages the peer never acknowledged: dropped by a session restart, or still in flight."""
        return self.protocol.take_abandoned() + [frame for frame in self.protocol.in_flight
                                                 if frame.message_type != MessageType.SYNC]

    async def send(self, message_type: MessageType, payload: bytes, *, flags: int = 0,
                   timeout_s: float | None = None) -> Frame:
        """Send one message; returns the frame once the line carried it. SerialLinkTimeout if the window stays shut."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.settings.give_up_after_s if timeout_s is None else timeout_s)
        while not self.protocol.window_open:
            self._raise_failure()
            left = deadline - loop.time()
            if left <= 0:
                state = "full" if self.protocol.synced else "not synchronised with the peer"
                raise SerialLinkTimeout(f"{self.name}: send window {state} for {timeout_s or self.settings.give_up_after_s:.1f} s")
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({waiter}, timeout=max(MIN_WAIT_S, left))
            finally:
                waiter.cancel()
        self._raise_failure()
        frame = self.protocol.send(message_type, payload, flags, loop.time())
        await self._write([frame])
        return frame

    async def receive(self, timeout_s: float) -> Frame:
        """The next delivered message; SerialLinkTimeout if none within `timeout_s`, the link's failure once it ended."""
        getter = asyncio.ensure_future(self._delivered.get())
        try:
            await asyncio.wait({getter}, timeout=max(MIN_WAIT_S, timeout_s))
        finally:
            if not getter.done():
                getter.cancel()
        if not getter.done() or getter.cancelled():
            raise SerialLinkTimeout(f"{self.name}: no message within {timeout_s} s")
        frame = getter.result()
        if frame is None:
            self._delivered.put_nowait(None)  # the end marker stays for later readers
            self._raise_failure()
            raise SerialLinkError(f"{self.name}: link closed")
        return frame

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def _write(self, frames: list[Frame]) -> None:
        loop = asyncio.get_running_loop()
        for frame in frames:
            await self.link.send(frame)
            self.protocol.sent(frame, loop.time())
            if self.observer is not None:
                self.observer(True, frame, "(sent again)" if self.protocol.sends_of(frame) > 1 else "")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._write(self.protocol.start(loop.time()))
            while True:
                wait = min(self.settings.ack_timeout_s, self.protocol.next_deadline - loop.time())
                try:
                    frame: Frame | None = await self.link.receive(max(MIN_WAIT_S, wait))
                except SerialLinkTimeout:
                    frame = None
                if frame is not None:
                    if self.observer is not None:
                        self.observer(False, frame, "")
                    step = self.protocol.on_frame(frame, loop.time())
                    await self._write(step.transmit)
                    for message in step.deliver:
                        await self._delivered.put(message)
                await self._write(self.protocol.on_timer(loop.time()))
                self._changed.set()
        except SerialLinkError as error:
            self._failure = error if str(error).startswith(self.name) else type(error)(f"{self.name}: {error}")
        except Exception as error:  # noqa: BLE001 — never dropped: every later send/receive raises it
            logger.exception("%s: reliable link failed", self.name)
            self._failure = SerialLinkError(f"{self.name}: link failed: {error!r}")
        finally:
            self._changed.set()
            self._finish_queue()

    def _finish_queue(self) -> None:
        try:
            self._delivered.put_nowait(None)
        except asyncio.QueueFull:
            self._delivered.get_nowait()  # the oldest unread message gives way to the end marker
            self._delivered.put_nowait(None)

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.wait([self._pump])
            self._pump = None
        await self.link.close()
        if self._failure is None:
            self._failure = SerialLinkError(f"{self.name}: link closed")
