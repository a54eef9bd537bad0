"""Serial link over real ptys (os.openpty) and a real socket: frames both ways, resync, hang-up, line-rate pacing."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import tty

import pytest
import serial
import serial.rfc2217

pytestmark = pytest.mark.timeout(30)

from devices.serial_framing import (
    Frame,
    Hello,
    MessageType,
    UpdateChunk,
    encode_frame,
    framing_overhead_bytes,
)
from devices.serial_link import (
    SerialLink,
    SerialLinkError,
    SerialLinkTimeout,
    line_rate_bytes_per_s,
    measure_paced_throughput,
)


@pytest.fixture
def pty_pair():
    """(master fd, slave path); the slave is opened by the test through pyserial like a real port."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    yield master, path, slave
    for fd in (slave,):
        try:
            os.close(fd)
        except OSError:
            pass


async def test_frames_both_ways_over_a_pty(pty_pair):
    master, path, _ = pty_pair
    async with SerialLink.from_fd(master, baud=1_000_000) as host, await SerialLink.open(path, baud=1_000_000) as board:
        hello = await board.send_message(MessageType.HELLO, Hello("bench-pi", "rpi4", ("energy:model",)).to_payload())
        received = await host.receive(timeout_s=5)
        assert received == hello and Hello.from_payload(received.payload).board == "bench-pi"
        chunks = [UpdateChunk("r1-v1", index, os.urandom(3000)) for index in range(5)]
        for chunk in chunks:
            await host.send_message(MessageType.UPDATE_CHUNK, chunk.to_payload())
        got = [UpdateChunk.from_payload((await board.receive(timeout_s=5)).payload) for _ in chunks]
        assert got == chunks
        ping = await host.send_message(MessageType.PING, b"\x00\x01t=12.5")
        assert await board.receive(timeout_s=5) == ping
        await board.send(Frame(MessageType.PONG, ping.sequence, ping.payload))
        assert (await host.receive(timeout_s=5)).message_type is MessageType.PONG
        assert host.decoder.errors == {} and board.decoder.errors == {}


async def test_resyncs_after_line_noise(pty_pair):
    master, path, _ = pty_pair
    async with await SerialLink.open(path, baud=1_000_000) as board:
        noise = b"U-Boot 2023.01 \xff\xfe\x00\x13garbage\r\n" + os.urandom(500)
        frame = encode_frame(MessageType.LOG, 3, b"after the noise")
        os.write(master, noise + frame[:5])
        await asyncio.sleep(0.05)
        os.write(master, frame[5:])
        received = await board.receive(timeout_s=5)
        assert received == Frame(MessageType.LOG, 3, b"after the noise")
        assert sum(board.decoder.errors.values()) >= 1
    os.close(master)


async def test_a_silent_board_times_out_and_a_hang_up_ends_the_stream(pty_pair):
    master, path, slave = pty_pair
    host = SerialLink.from_fd(master, baud=115200)
    with pytest.raises(SerialLinkTimeout, match="no frame within 0.2 s"):
        await host.receive(timeout_s=0.2)
    board = await SerialLink.open(path, baud=1_000_000)
    await board.send_message(MessageType.LOG, b"last words")
    await asyncio.sleep(0.05)
    await board.close()
    os.close(slave)  # every slave fd closed: the master reads EIO, the end of the stream
    assert [frame.payload async for frame in host.frames()] == [b"last words"]
    with pytest.raises(SerialLinkError, match="closed"):
        await host.receive(timeout_s=1)
    await host.close()


async def test_socket_url_link():
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, await SerialLink.open(f"socket://127.0.0.1:{port}", baud=1_000_000) as link:
        sent = await link.send_message(MessageType.REPORT, b'{"accuracy":0.91}')
        assert await link.receive(timeout_s=5) == sent


async def test_open_errors():
    with pytest.raises(SerialLinkError, match="cannot open serial port /dev/does-not-exist"):
        await SerialLink.open("/dev/does-not-exist")
    with pytest.raises(SerialLinkError, match="cannot open serial URL rfc2217://127.0.0.1:1"):
        await SerialLink.open("rfc2217://127.0.0.1:1", timeout_s=5)
    with pytest.raises(SerialLinkError, match="cannot open serial URL nosuch://"):
        await SerialLink.open("nosuch://x")


class PtySerial(serial.Serial):
    """A pty through pyserial, minus modem lines (DTR/RTS/CTS...), which ptys have no ioctls for."""

    def _update_dtr_state(self) -> None:
        pass

    def _update_rts_state(self) -> None:
        pass

    @property
    def cts(self) -> bool:
        return True

    @property
    def dsr(self) -> bool:
        return True

    @property
    def ri(self) -> bool:
        return False

    @property
    def cd(self) -> bool:
        return True


class Rfc2217Server:
    """pyserial's RFC 2217 PortManager in front of a pty, on 127.0.0.1: what ser2net's telnet mode offers."""

    def __init__(self, port_path: str) -> None:
        self.serial = PtySerial(port_path, 115200, timeout=0.05)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        connection.settimeout(0.05)
        manager = serial.rfc2217.PortManager(self.serial, connection_writer(connection))

        def to_network() -> None:
            while not self.stop.is_set():
                data = self.serial.read(4096)
                if data:
                    connection.sendall(b"".join(manager.escape(data)))

        threading.Thread(target=to_network, daemon=True).start()
        while not self.stop.is_set():
            try:
                data = connection.recv(4096)
            except TimeoutError:
                continue
            if not data:
                break
            self.serial.write(b"".join(manager.filter(data)))
        connection.close()

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


class connection_writer:  # noqa: N801 — the object PortManager writes its telnet replies to
    def __init__(self, connection: socket.socket) -> None:
        self.connection = connection

    def write(self, data: bytes) -> None:
        self.connection.sendall(data)


async def test_rfc2217_url_link_carries_frames_both_ways(pty_pair):
    master, path, _ = pty_pair
    server = Rfc2217Server(path)
    try:
        async with await SerialLink.open(f"rfc2217://127.0.0.1:{server.port}", pace=False) as host:
            board = SerialLink.from_fd(master, close_fd=False, pace=False)
            payload = bytes(range(256)) * 8  # 0xFF is telnet's IAC: it must come through escaped and back
            sent = await host.send_message(MessageType.UPDATE_CHUNK, payload)
            assert await board.receive(10) == sent
            reply = await board.send_message(MessageType.REPORT, b"\xff\xff report \x00")
            assert await host.receive(10) == reply
            await board.close()
    finally:
        server.close()


async def test_paced_throughput_at_115200_is_the_line_rate_net_of_framing(pty_pair):
    master, path, _ = pty_pair
    async with SerialLink.from_fd(master, baud=115200) as host, await SerialLink.open(path, baud=115200) as board:
        measured = await measure_paced_throughput(host, board, payload_bytes=1024, count=24)  # ~2.2 s of line
    print(f"\n115200 baud 8N1, 1024-byte payloads: net line rate {measured.net_line_rate:.0f} B/s; "
          f"sender {measured.sender:.0f} B/s ({measured.sender / measured.net_line_rate:.3f}), "
          f"receiver {measured.receiver:.0f} B/s ({measured.receiver / measured.net_line_rate:.3f})")
    expected = line_rate_bytes_per_s(115200) * 1024 / (1024 + framing_overhead_bytes(1024))
    assert measured.net_line_rate == pytest.approx(expected)
    assert measured.sender == pytest.approx(expected, rel=0.05)
    assert measured.receiver == pytest.approx(expected, rel=0.05)
