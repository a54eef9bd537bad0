"""Chunk faults on a serial board's bridge: what a real broker delivers to the bridge is corrupted, duplicated or
reordered on its way to the serial line (a pty cable, the test playing the board), held chunks released on time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiomqtt
import numpy as np
import pytest

from devices.chunk_faults import REORDER_HOLD_MIN_S, TapsChunks
from devices.frame_order import LinkSettings
from devices.pty_cable import PtyCable
from devices.reliable_serial import ReliableSerialLink
from devices.serial_bridge import SerialBridge
from devices.serial_framing import FLAG_MORE, Hello, MessageType, UpdateChunk, json_payload
from devices.serial_link import SerialLink
from testbed.core.messages import BoardConfig
from testbed.core.mqtt import MqttEndpoint
from testbed.core.topics import Topics

BOARD = "bench-pi"
RUN = "bridge-chunk-faults"
KEY = "7"
LINK = LinkSettings(window=8, ack_timeout_s=0.5, max_sends=6)
LINE_BAUD = 1_000_000
MAX_FRAME = 256  # the bridge's config fits one frame; a chunk does not
CHUNKS = [bytes([index]) * 300 + bytes(range(index, index + 100)) for index in range(6)]
"""Six distinct 400-byte chunks of update KEY."""
WAIT_S = 10.0


@dataclass
class BridgeOnCable:
    """A bridge to a board on a pty cable, the test holding the board's end and an MQTT client publishing chunks."""

    bridge: SerialBridge
    board: ReliableSerialLink
    client: aiomqtt.Client
    topics: Topics

    async def publish(self, indexes: list[int]) -> None:
        for index in indexes:
            await self.client.publish(self.topics.update_chunk(KEY, index), CHUNKS[index], qos=1)

    async def chunks_on_the_line(self, count: int) -> list[tuple[int, bytes]]:
        """The next `count` chunks the board receives, (index, data) in the order they came, pieces joined."""
        received: list[tuple[int, bytes]] = []
        data = b""
        async with asyncio.timeout(WAIT_S):
            while len(received) < count:
                frame = await self.board.receive(timeout_s=WAIT_S)
                if frame.message_type != MessageType.UPDATE_CHUNK:
                    continue  # pings
                chunk = UpdateChunk.from_payload(frame.payload)
                data += chunk.data
                if not frame.flags & FLAG_MORE:
                    assert chunk.key == KEY
                    received.append((chunk.index, data))
                    data = b""
        return received

    async def nothing_on_the_line(self, for_s: float) -> None:
        """No chunk reaches the board for `for_s` seconds."""
        deadline = time.monotonic() + for_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                frame = await self.board.receive(timeout_s=left)
            except TimeoutError:
                return
            assert frame.message_type != MessageType.UPDATE_CHUNK, UpdateChunk.from_payload(frame.payload)


@pytest.fixture
async def cable_bridge(mosquitto: tuple[str, int]) -> AsyncIterator[BridgeOnCable]:
    topics = Topics(RUN)
    config = BoardConfig(run=RUN, device=BOARD, device_index=0, init_seed=1, public_key="ed25519:" + "A" * 43 + "=",
                         scenario={})
    cable = PtyCable()
    bridge = SerialBridge(BOARD, "rpi4", cable.host_path, topics, MqttEndpoint(*mosquitto), config,
                          link_settings=LINK, max_frame_bytes=MAX_FRAME, silence_timeout_s=60.0,
                          open_link=lambda: SerialLink.open(cable.host_path, LINE_BAUD, max_frame_bytes=MAX_FRAME,
                                                            pace=False))
    bridge_task = asyncio.create_task(bridge.run())
    try:
        board_end = await SerialLink.open(cable.board_path, LINE_BAUD, max_frame_bytes=MAX_FRAME, pace=False)
        async with aiomqtt.Client(*mosquitto) as client, ReliableSerialLink(board_end, LINK) as board:
            await board.send(MessageType.HELLO, Hello(BOARD, "rpi4").to_payload(), timeout_s=WAIT_S)
            async with asyncio.timeout(WAIT_S):
                while (await board.receive(timeout_s=WAIT_S)).message_type != MessageType.CONFIG:
                    pass
            await board.send(MessageType.READY, json_payload({"device": BOARD, "run": RUN, "version": 0,
                                                              "error": None}))
            await asyncio.wait_for(bridge.connected.wait(), WAIT_S)
            yield BridgeOnCable(bridge, board, client, topics)
    finally:
        bridge_task.cancel()
        await asyncio.gather(bridge_task, return_exceptions=True)
        cable.close()


def differing_bits(one: bytes, other: bytes) -> int:
    assert len(one) == len(other)
    return sum(bin(a ^ b).count("1") for a, b in zip(one, other))


def test_the_bridge_exposes_its_chunk_faults_as_an_agent_does() -> None:
    config = BoardConfig(run=RUN, device=BOARD, device_index=0, init_seed=1, public_key="ed25519:" + "A" * 43 + "=",
                         scenario={})
    bridge = SerialBridge(BOARD, "rpi4", "/dev/null", Topics(RUN), MqttEndpoint("127.0.0.1", 1), config,
                          downlink_rate_bps=8000.0)
    assert isinstance(bridge, TapsChunks) and bridge.chunk_faults.downlink_rate_bps == 8000.0


async def test_corrupted_chunks_reach_the_board_with_bits_flipped_in_frames_of_their_own(
        cable_bridge: BridgeOnCable) -> None:
    cable_bridge.bridge.chunk_faults.corrupt(2, 3, np.random.default_rng(1))
    await cable_bridge.publish([0, 1, 2, 3])
    received = await cable_bridge.chunks_on_the_line(4)
    assert [index for index, _ in received] == [0, 1, 2, 3]
    # each chunk (400 B) crossed in two frames of at most 256 B, damaged before it was cut: the line's CRC is good
    assert [differing_bits(data, CHUNKS[index]) for index, data in received] == [3, 3, 0, 0]
    assert cable_bridge.bridge.chunk_faults.corrupted == 2


async def test_duplicated_chunks_reach_the_board_twice_in_a_row(cable_bridge: BridgeOnCable) -> None:
    cable_bridge.bridge.chunk_faults.duplicate(2)
    await cable_bridge.publish([0, 1, 2])
    received = await cable_bridge.chunks_on_the_line(5)
    assert received == [(0, CHUNKS[0]), (0, CHUNKS[0]), (1, CHUNKS[1]), (1, CHUNKS[1]), (2, CHUNKS[2])]
    assert cable_bridge.bridge.chunk_faults.duplicated == 2


async def test_a_reordered_group_reaches_the_board_shuffled_and_a_short_one_on_the_bridges_timer(
        cable_bridge: BridgeOnCable) -> None:
    faults = cable_bridge.bridge.chunk_faults
    faults.reorder(4, np.random.default_rng(2))
    await cable_bridge.publish([0, 1, 2, 3])
    whole = await cable_bridge.chunks_on_the_line(4)
    assert sorted(whole) == [(index, CHUNKS[index]) for index in range(4)] and [i for i, _ in whole] != [0, 1, 2, 3]

    faults.reorder(5, np.random.default_rng(3))  # only 2 more chunks come: released by the bridge's timer
    published = time.monotonic()  # the bridge takes the chunks after now
    await cable_bridge.publish([4, 5])
    await cable_bridge.nothing_on_the_line(REORDER_HOLD_MIN_S / 2)
    short = await cable_bridge.chunks_on_the_line(2)
    assert time.monotonic() - published >= REORDER_HOLD_MIN_S  # held until no chunk came for the hold time
    assert short == [(5, CHUNKS[5]), (4, CHUNKS[4])]  # never their own order
    assert faults.reordered == 6 and faults.next_release_s() is None


async def test_chunks_for_a_board_that_is_not_there_do_not_use_up_the_faults(cable_bridge: BridgeOnCable) -> None:
    bridge = cable_bridge.bridge
    bridge.chunk_faults.corrupt(1, 1, np.random.default_rng(4))
    bridge.board_ready.clear()  # as while the line is down: nothing goes to the board
    await cable_bridge.publish([0])
    async with asyncio.timeout(WAIT_S):
        while bridge.dropped_while_offline < 1:
            await asyncio.sleep(0.05)
    assert bridge.chunk_faults.corrupted == 0 and bridge.chunk_faults.armed
    bridge.board_ready.set()
    await cable_bridge.publish([1])
    [(index, data)] = await cable_bridge.chunks_on_the_line(1)
    assert index == 1 and differing_bits(data, CHUNKS[1]) == 1
