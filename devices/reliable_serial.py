"""One reliable serial link for both ends: numbered frames, ACK/NACK, bounded resend, in-order exactly-once delivery.

Both the host bridge and the board agent talk through `ReliableSerialLink`, which sits on a `SerialLink`
(COBS + CRC32 frames, paced at the line rate). The protocol is pure (`LinkProtocol`, driven by a clock the
caller passes in, in devices.frame_order) and the asyncio class here only moves its frames:

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
import secrets
from collections.abc import Callable
from types import TracebackType

from devices.frame_order import LinkProtocol, LinkSettings
from devices.serial_framing import Frame, MessageType
from devices.serial_link import SerialLink, SerialLinkError, SerialLinkTimeout

logger = logging.getLogger("devices.serial")

DELIVERED_QUEUE_FRAMES = 256  # delivered but unread; beyond this the link stops reading (and acknowledging)
MIN_WAIT_S = 0.005  # never wait 0 s: Python 3.11's wait with timeout 0 can lose a cancellation


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
