"""The reliable serial link: pure properties (devices.frame_order) over lossy, duplicating, reordering wires, then both ends over real ptys."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import tty
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.pty_cable import PtyCable
from devices.frame_order import LinkProtocol, LinkSettings, PeerUnresponsive
from devices.reliable_serial import ReliableSerialLink
from devices.serial_framing import Ack, Frame, MessageType, session_payload
from devices.serial_link import SerialLink, SerialLinkError, SerialLinkTimeout

pytestmark = pytest.mark.timeout(60)

LATENCY_S = 0.01
FAULTS = st.sampled_from(["ok", "ok", "drop", "duplicate", "late", "very-late"])
FIFO_FAULTS = st.sampled_from(["ok", "ok", "drop", "duplicate"])  # a serial line loses and repeats, never reorders
MESSAGES = st.lists(st.tuples(st.sampled_from([MessageType.REPORT, MessageType.UPDATE_CHUNK, MessageType.LOG]),
                              st.sampled_from([b"", b"same", b"same", b"other", b"\x00" * 7])), max_size=60)


def counting_sessions(start: int) -> Iterator[int]:
    return itertools.count(start)


@dataclass
class Wire:
    """Two protocol ends on a virtual clock; the first `faults` frames put on the line meet their fault."""

    a: LinkProtocol
    b: LinkProtocol
    faults: list[str]
    now: float = 0.0
    delivered: dict[str, list[tuple[MessageType, bytes]]] = field(default_factory=lambda: {"a": [], "b": []})
    _events: list[tuple[float, int, str, Frame]] = field(default_factory=list)
    _order: Iterator[int] = field(default_factory=itertools.count)
    cut: bool = False  # every frame is lost (a peer gone silent)

    def put(self, source: str, frames: list[Frame]) -> None:
        target = "b" if source == "a" else "a"
        for frame in frames:
            fault = self.faults.pop(0) if self.faults else "ok"
            if self.cut or fault == "drop":
                continue
            delay = {"late": 0.5, "very-late": 2.5}.get(fault, 0.0) * self.a.settings.ack_timeout_s
            for _ in range(2 if fault == "duplicate" else 1):
                heapq.heappush(self._events, (self.now + LATENCY_S + delay, next(self._order), target, frame))

    def end(self, name: str) -> LinkProtocol:
        return self.a if name == "a" else self.b

    def run(self, outbox: dict[str, list[tuple[MessageType, bytes]]], until_s: float) -> None:
        """Send the outboxes as windows allow and carry frames until both are delivered or `until_s` passes."""
        outbox = {name: list(messages) for name, messages in outbox.items()}
        while self.now <= until_s:
            for name, messages in outbox.items():
                end = self.end(name)
                while messages and end.window_open:
                    message_type, payload = messages.pop(0)
                    self.put(name, [end.send(message_type, payload, 0, self.now)])
            idle = not any(outbox.values()) and not self.a.in_flight and not self.b.in_flight
            if idle and not self._events:
                return
            next_event = min(self._events[0][0] if self._events else math.inf,
                             self.a.next_deadline, self.b.next_deadline)
            if next_event == math.inf:
                return
            self.now = max(self.now, next_event)
            while self._events and self._events[0][0] <= self.now:
                _, _, target, frame = heapq.heappop(self._events)
                step = self.end(target).on_frame(frame, self.now)
                self.put(target, step.transmit)
                self.delivered[target] += [(item.message_type, item.payload) for item in step.deliver]
            for name in ("a", "b"):
                self.put(name, self.end(name).on_timer(self.now))


def started_wire(faults: list[str], link_settings: LinkSettings) -> Wire:
    sessions_a, sessions_b = counting_sessions(100), counting_sessions(200)
    wire = Wire(LinkProtocol(link_settings, lambda: next(sessions_a)),
                LinkProtocol(link_settings, lambda: next(sessions_b)), faults)
    wire.put("a", wire.a.start(0.0))
    wire.put("b", wire.b.start(0.0))
    return wire


PATIENT = LinkSettings(window=8, ack_timeout_s=1.0, max_sends=40)


@settings(max_examples=300, deadline=None)
@given(faults=st.lists(FAULTS, max_size=80), to_b=MESSAGES, to_a=MESSAGES)
def test_every_message_arrives_once_in_order_whatever_the_line_loses_duplicates_or_reorders(faults, to_b, to_a):
    wire = started_wire(faults, PATIENT)
    wire.run({"a": to_b, "b": to_a}, until_s=10_000)
    # equal payloads sent twice arrive twice: duplicates are told apart by sequence, never by content
    assert wire.delivered["b"] == to_b
    assert wire.delivered["a"] == to_a
    assert wire.a.in_flight == [] and wire.b.in_flight == []
    assert wire.a.sessions_started == wire.b.sessions_started == 1


@settings(max_examples=100, deadline=None)
@given(faults=st.lists(FAULTS, max_size=30), sent_before=st.integers(0, 20),
       max_sends=st.integers(1, 10), ack_timeout_s=st.floats(0.05, 5.0))
def test_a_peer_gone_silent_ends_the_link_with_a_typed_error_in_bounded_time(faults, sent_before, max_sends,
                                                                              ack_timeout_s):
    link_settings = LinkSettings(window=8, ack_timeout_s=ack_timeout_s, max_sends=max_sends)
    wire = started_wire(faults, LinkSettings(window=8, ack_timeout_s=ack_timeout_s, max_sends=50))
    wire.run({"a": [(MessageType.LOG, b"x")] * sent_before, "b": []}, until_s=10_000)
    wire.a.settings = link_settings  # the line worked until now; from here on the peer never answers
    wire.cut = True
    cut_at = wire.now
    with pytest.raises(PeerUnresponsive, match="peer silent"):
        wire.run({"a": [(MessageType.REPORT, b"lost")], "b": []}, until_s=math.inf)
    assert wire.now - cut_at <= max_sends * ack_timeout_s + 1e-9


@settings(max_examples=150, deadline=None)
@given(faults=st.lists(FIFO_FAULTS, max_size=40), restarts=st.lists(st.tuples(st.sampled_from("ab"), st.integers(0, 6)),
                                                               max_size=3),
       to_b=MESSAGES, to_a=MESSAGES)
def test_ends_restarting_in_any_order_settle_in_a_few_sessions_and_then_deliver_everything(faults, restarts, to_b,
                                                                                           to_a):
    # FIFO faults only: a SYNC of an ended session overtaken by its successor's (which a serial line cannot do)
    # would take the receiver back to the ended session until PeerUnresponsive ends the link
    wire = started_wire(faults, PATIENT)
    fresh = counting_sessions(1000)
    for name, messages in restarts:  # some traffic, then one end is replaced by a new process (a reboot)
        wire.run({"a": [(MessageType.LOG, b"x")] * messages, "b": [(MessageType.LOG, b"y")] * messages},
                 until_s=wire.now + 0.3)
        end = LinkProtocol(PATIENT, lambda: next(fresh))
        setattr(wire, name, end)
        wire.put(name, end.start(wire.now))
    wire.faults.clear()
    wire.run({"a": [], "b": []}, until_s=wire.now + 100)  # settle
    wire.delivered = {"a": [], "b": []}
    wire.run({"a": to_b, "b": to_a}, until_s=wire.now + 10_000)
    assert wire.delivered["b"] == to_b and wire.delivered["a"] == to_a
    for end in (wire.a, wire.b):  # no two ends restarting each other in turn: one restart each per peer restart
        assert end.sessions_started <= 1 + end.peer_restarts + 1


def test_a_restarted_peer_starts_new_sessions_both_ways_and_the_unacknowledged_messages_come_back() -> None:
    wire = started_wire([], PATIENT)
    wire.run({"a": [(MessageType.LOG, b"1")], "b": []}, until_s=100)
    assert wire.delivered["b"] == [(MessageType.LOG, b"1")]
    wire.cut = True  # b reboots while a sends
    wire.run({"a": [(MessageType.REPORT, b"unacknowledged")], "b": []}, until_s=wire.now + 0.5)
    sessions = counting_sessions(300)
    wire.b = LinkProtocol(PATIENT, lambda: next(sessions))
    wire.cut = False
    wire.put("b", wire.b.start(wire.now))
    wire.run({"a": [], "b": [(MessageType.HELLO, b"back")]}, until_s=wire.now + 100)
    assert wire.a.peer_restarts == 1 and wire.a.sessions_started == 2
    assert wire.a.take_abandoned() == [Frame(MessageType.REPORT, 2, b"unacknowledged", session=100)]  # 0: SYNC
    wire.run({"a": [(MessageType.LOG, b"2")], "b": []}, until_s=wire.now + 100)
    assert wire.delivered["b"] == [(MessageType.LOG, b"1"), (MessageType.LOG, b"2")]
    assert wire.delivered["a"] == [(MessageType.HELLO, b"back")]


def test_frames_of_an_unknown_session_are_answered_with_a_session_zero_nack_and_the_sender_resyncs() -> None:
    sessions = counting_sessions(7)
    end = LinkProtocol(PATIENT, lambda: next(sessions))
    end.start(0.0)
    step = end.on_frame(Frame(MessageType.LOG, 5, b"x"), 0.1)
    assert step.deliver == [] and Ack.from_payload(step.transmit[0].payload) == Ack(5, 0, "no session")
    end.on_frame(Frame(MessageType.ACK, 0, Ack(0, 7).to_payload()), 0.2)
    assert end.synced
    step = end.on_frame(Frame(MessageType.NACK, 0, Ack(3, 0, "no session").to_payload()), 0.3)
    assert [frame.message_type for frame in step.transmit] == [MessageType.SYNC] and end.session == 8
    # a SYNC sent again (its ACK was lost) is a duplicate, not a restart
    end.on_frame(Frame(MessageType.SYNC, 0, session_payload(40)), 0.4)
    step = end.on_frame(Frame(MessageType.SYNC, 0, session_payload(40)), 0.5)
    assert end.peer_restarts == 0 and end.duplicates == 1 and step.deliver == []
    with pytest.raises(SerialLinkError, match="belong to the link"):
        end.send(MessageType.ACK, b"", 0, 0.6)


# --- over real ptys -----------------------------------------------------------------------------------

FAST = LinkSettings(window=16, ack_timeout_s=0.5, max_sends=6)


@pytest.fixture
def cable() -> Iterator[PtyCable]:
    cable = PtyCable()
    yield cable
    cable.close()


async def open_ends(cable: PtyCable, link_settings: LinkSettings = FAST) -> tuple[ReliableSerialLink, ReliableSerialLink]:
    host = ReliableSerialLink(await SerialLink.open(cable.host_path, 1_000_000, max_frame_bytes=1024), link_settings)
    board = ReliableSerialLink(await SerialLink.open(cable.board_path, 1_000_000, max_frame_bytes=1024), link_settings)
    return host, board


async def test_both_ends_over_a_pty_cable_that_corrupts_frames_deliver_everything_once_in_order(cable) -> None:
    corrupted = {"host>board": 0, "board>host": 0}

    def corrupt(direction: str, data: bytes) -> bytes:
        corrupted[direction] += 1
        if corrupted[direction] % 5 == 0:  # a flipped byte: bad CRC, the frame is lost on the line
            middle = len(data) // 2
            return data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:]
        return data

    cable.corrupt = corrupt
    # Six sends 0.5 s apart gave up once in 12 runs beside four CPU hogs (and once in a full suite beside two):
    # the ends' patience is wall clock, so this test, about delivery, gives them twice as long.
    host, board = await open_ends(cable, LinkSettings(window=16, ack_timeout_s=0.5, max_sends=12))
    async with host, board:
        payloads = [bytes([index % 3]) * 600 for index in range(60)]  # equal payloads repeat on purpose
        sender = asyncio.create_task(send_all(host, payloads))
        received = [(await board.receive(timeout_s=10)).payload for _ in payloads]
        await asyncio.wait_for(sender, 10)
        assert received == payloads
        await board.send(MessageType.REPORT, b"done")
        await board.send(MessageType.REPORT, b"done")
        assert [(await host.receive(timeout_s=10)).payload for _ in range(2)] == [b"done", b"done"]
        assert host.protocol.frames_resent + board.protocol.frames_resent > 0
        assert board.link.decoder.errors  # the line really lost frames
        with pytest.raises(SerialLinkTimeout):
            await board.receive(timeout_s=0.2)


async def send_all(link: ReliableSerialLink, payloads: list[bytes]) -> None:
    for payload in payloads:
        await link.send(MessageType.UPDATE_CHUNK, payload)


async def test_a_peer_that_stops_answering_fails_sends_and_receives_with_peer_unresponsive(cable) -> None:
    host, board = await open_ends(cable)
    async with host, board:
        await host.send(MessageType.PING, b"1")
        assert (await board.receive(timeout_s=5)).payload == b"1"
        cable.cut()
        await host.send(MessageType.PING, b"2")
        started = asyncio.get_running_loop().time()
        with pytest.raises(PeerUnresponsive, match="peer silent"):
            while True:  # the failure ends the wait for messages too
                try:
                    await host.receive(timeout_s=1)
                except PeerUnresponsive:
                    raise
                except SerialLinkTimeout:
                    continue
        assert asyncio.get_running_loop().time() - started <= FAST.give_up_after_s + 2
        with pytest.raises(PeerUnresponsive):
            await host.send(MessageType.PING, b"3")


async def test_a_restarted_end_resynchronises_and_gets_back_what_the_old_one_never_acknowledged(cable) -> None:
    host, board = await open_ends(cable)
    async with host:
        async with board:
            await host.send(MessageType.LOG, b"before")
            assert (await board.receive(timeout_s=5)).payload == b"before"
        # the board end is gone (reboot); the host sends into the void, then a new board end opens
        report = await host.send(MessageType.REPORT, b"unacknowledged")
        async with ReliableSerialLink(await SerialLink.open(cable.board_path, 1_000_000, max_frame_bytes=1024),
                                      FAST) as board:
            await board.send(MessageType.HELLO, b"rebooted", timeout_s=5)
            assert (await host.receive(timeout_s=5)).payload == b"rebooted"
            assert host.protocol.peer_restarts == 1
            assert [frame.payload for frame in host.take_abandoned()] == [report.payload]
            await host.send(MessageType.LOG, b"after", timeout_s=5)
            assert (await board.receive(timeout_s=5)).payload == b"after"


async def test_sends_wait_for_the_peer_at_most_their_timeout() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        async with ReliableSerialLink(SerialLink.from_fd(master, close_fd=False, pace=False), FAST) as lonely:
            with pytest.raises(SerialLinkTimeout, match="not synchronised"):
                await lonely.send(MessageType.HELLO, b"anyone?", timeout_s=0.3)
    finally:
        os.close(master)
        os.close(slave)
