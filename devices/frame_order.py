"""The reliable serial link's pure bookkeeping: a bounded reorder buffer, the send window, ACK/NACK and sessions.

No I/O and no clock of its own (every call takes `now`); devices.reliable_serial runs it over a SerialLink
and describes the protocol.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from devices.errors import DeviceError
from devices.serial_framing import (
    MAX_SEQUENCE,
    Ack,
    Frame,
    MessageType,
    SerialFrameError,
    framing_overhead_bytes,
    parse_session_payload,
    session_payload,
)
from devices.serial_link import SerialLinkError

SEQUENCE_SPACE = MAX_SEQUENCE + 1
HALF_SPACE = SEQUENCE_SPACE // 2
DEFAULT_REORDER_FRAMES = 64
CONTROL_TYPES = frozenset({MessageType.ACK, MessageType.NACK})
ABANDONED_KEPT = 256  # unacknowledged messages of ended sessions kept for `take_abandoned`


class FrameGapTooLarge(DeviceError):
    """More frames went missing than the reorder buffer can wait for; the stream must restart."""


class FrameReorder:
    """Delivers frames in sequence order; frames after a gap wait until the missing ones are sent again.

    Pure and bounded: it holds at most `capacity` frames. A sequence at or up to half the 16-bit space
    behind the next expected one is a duplicate (a frame sent again after it had arrived) and is dropped.
    """

    def __init__(self, capacity: int = DEFAULT_REORDER_FRAMES) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.expected: int | None = None
        self._held: dict[int, Frame] = {}
        self.duplicates = 0

    def reset(self, next_sequence: int | None = None) -> None:
        """Forget everything; the next frame accepted (or `next_sequence`) starts the stream."""
        self.expected = next_sequence
        self._held.clear()

    @property
    def held_frames(self) -> int:
        return len(self._held)

    @property
    def missing(self) -> list[int]:
        """Sequences awaited before the held frames can be delivered, in order."""
        if self.expected is None or not self._held:
            return []
        furthest = max((sequence - self.expected) % SEQUENCE_SPACE for sequence in self._held)
        candidates = ((self.expected + offset) % SEQUENCE_SPACE for offset in range(furthest))
        return [sequence for sequence in candidates if sequence not in self._held]

    def accept(self, frame: Frame) -> list[Frame]:
        """The frames deliverable now, in order (empty while a gap is open); FrameGapTooLarge on overflow."""
        if self.expected is None:
            self.expected = frame.sequence
        offset = (frame.sequence - self.expected) % SEQUENCE_SPACE
        if offset >= HALF_SPACE or frame.sequence in self._held:
            self.duplicates += 1
            return []
        if offset > 0:
            if offset > self.capacity or len(self._held) >= self.capacity:
                raise FrameGapTooLarge(
                    f"{offset} frames missing before sequence {frame.sequence} (the buffer waits for at most "
                    f"{self.capacity})")
            self._held[frame.sequence] = frame
            return []
        delivered = [frame]
        self.expected = (frame.sequence + 1) % SEQUENCE_SPACE
        while self.expected in self._held:
            delivered.append(self._held.pop(self.expected))
            self.expected = (self.expected + 1) % SEQUENCE_SPACE
        return delivered


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
