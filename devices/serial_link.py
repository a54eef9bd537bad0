"""Serial link: framed messages over a byte stream (tty or pty via pyserial, or socket://), paced at the line rate."""

from __future__ import annotations

import asyncio
import errno
import os
import termios
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol
from urllib.parse import urlsplit

import serial

from devices.serial_framing import (
    DEFAULT_MAX_FRAME_BYTES,
    MAX_SEQUENCE,
    Frame,
    FrameDecoder,
    MessageType,
    encode_frame,
    framing_overhead_bytes,
)
from devices.errors import DeviceError

BITS_PER_BYTE_8N1 = 10  # start bit + 8 data bits + stop bit
READ_BYTES = 65536
RECEIVE_QUEUE_FRAMES = 256  # beyond this the link stops reading and the kernel buffer pushes back
URL_READ_TIMEOUT_S = 0.1  # a URL port's reader thread returns this often, so closing never waits longer
PACING_SLACK_S = 0.02  # lateness of the sender still counted as a busy line (like a UART FIFO)


class SerialLinkError(DeviceError):
    """The port cannot be opened, or the link closed or failed."""


class SerialLinkTimeout(SerialLinkError, TimeoutError):
    """No frame arrived within the timeout."""


def line_rate_bytes_per_s(baud: int) -> float:
    """Bytes per second a serial line carries at `baud` with 8N1 framing."""
    return baud / BITS_PER_BYTE_8N1


class ByteTransport(Protocol):
    async def read(self) -> bytes:
        """Some bytes as they arrive; b"" at end of stream."""
        ...

    async def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class FdTransport:
    """A non-blocking file descriptor (tty, pty master or slave) watched by the event loop."""

    def __init__(self, fd: int, timeout_s: float = 10.0, owner: serial.Serial | None = None,
                 close_fd: bool = True) -> None:
        os.set_blocking(fd, False)
        if os.isatty(fd):
            # VMIN=1: an idle tty then says EAGAIN (VMIN=0, pyserial's choice, reads 0 bytes, which means hang-up)
            attributes = termios.tcgetattr(fd)
            attributes[6][termios.VMIN], attributes[6][termios.VTIME] = 1, 0
            termios.tcsetattr(fd, termios.TCSANOW, attributes)
        self.fd = fd
        self.timeout_s = timeout_s
        self._owner = owner
        self._close_fd = close_fd
        self._closed = False

    async def _ready(self, add: str, remove: str) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        getattr(loop, add)(self.fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            getattr(loop, remove)(self.fd)

    async def read(self) -> bytes:
        while True:
            try:
                return os.read(self.fd, READ_BYTES)
            except BlockingIOError:
                await self._ready("add_reader", "remove_reader")
            except OSError as error:
                if error.errno == errno.EIO:  # the other side of a pty hung up
                    return b""
                raise

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view):]
            except BlockingIOError:  # the other side does not read: give up after timeout_s
                await asyncio.wait_for(self._ready("add_writer", "remove_writer"), self.timeout_s)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owner is not None:
            self._owner.close()
        elif self._close_fd:
            os.close(self.fd)


class StreamTransport:
    """An asyncio stream pair (socket://, e.g. ser2net in raw mode)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float) -> None:
        self.reader, self.writer, self.timeout_s = reader, writer, timeout_s

    async def read(self) -> bytes:
        return await self.reader.read(READ_BYTES)

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), self.timeout_s)

    def close(self) -> None:
        self.writer.close()


class ThreadedSerialTransport:
    """A pyserial URL port (rfc2217://, loop://) with blocking I/O, read and written from worker threads."""

    def __init__(self, device: serial.SerialBase) -> None:
        self.device = device
        self._closed = False

    async def read(self) -> bytes:
        while not self._closed:
            try:
                data = await asyncio.to_thread(self.device.read, READ_BYTES)
            except (serial.SerialException, OSError) as error:
                if self._closed:
                    break
                raise SerialLinkError(f"{self.device.port}: {error}") from None
            if data:
                return data
        return b""

    async def write(self, data: bytes) -> None:
        try:
            await asyncio.to_thread(self.device.write, data)
        except (serial.SerialException, OSError) as error:
            raise SerialLinkError(f"{self.device.port}: {error}") from None

    def close(self) -> None:
        self._closed = True
        self.device.close()


class SerialLink:
    """Frames both ways over one byte stream. Use `async with await SerialLink.open(port) as link:`.

    `send` returns once the line would have carried the frame at `baud` (8N1), so a sender can never
    outrun a real UART even over a pty or a socket; `frames()` yields valid frames as they arrive and
    `decoder.errors` counts what was dropped.
    """

    def __init__(self, transport: ByteTransport, baud: int = 115200, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 pace: bool = True, name: str = "serial") -> None:
        if baud <= 0:
            raise SerialLinkError(f"baud must be positive, got {baud}")
        self.transport = transport
        self.baud = baud
        self.name = name
        self.pace = pace
        self.max_frame_bytes = max_frame_bytes
        self.decoder = FrameDecoder(max_frame_bytes)
        self.bytes_sent = 0
        self.bytes_received = 0
        self._sequence = 0
        self._line_free_at = 0.0
        self._send_lock = asyncio.Lock()
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue(RECEIVE_QUEUE_FRAMES)
        self._failure: BaseException | None = None
        self._closed = False
        self._pump = asyncio.get_running_loop().create_task(self._receive_loop(), name=f"{name}-receive")

    @classmethod
    async def open(cls, port: str, baud: int = 115200, *, timeout_s: float = 10.0,
                   max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, pace: bool = True) -> SerialLink:
        """A device path (/dev/ttyUSB0, /dev/pts/N), socket://host:port, or any pyserial URL (rfc2217://host:port)."""
        if port.startswith("socket://"):
            address = urlsplit(port)
            if address.hostname is None or address.port is None:
                raise SerialLinkError(f"{port!r}: expected socket://host:port")
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(address.hostname, address.port), timeout_s)
            except (OSError, asyncio.TimeoutError) as error:
                raise SerialLinkError(f"cannot connect to {port}: {error or 'timed out'}") from None
            return cls(StreamTransport(reader, writer, timeout_s), baud, max_frame_bytes=max_frame_bytes, pace=pace, name=port)
        if "://" in port:  # rfc2217:// (ser2net telnet mode, RFC 2217 servers), loop://, spy://, ...
            try:
                device = await asyncio.wait_for(asyncio.to_thread(
                    serial.serial_for_url, port, baudrate=baud, timeout=URL_READ_TIMEOUT_S), timeout_s)
            except (serial.SerialException, ValueError, OSError, asyncio.TimeoutError) as error:
                raise SerialLinkError(f"cannot open serial URL {port}: {error or 'timed out'}") from None
            return cls(ThreadedSerialTransport(device), baud, max_frame_bytes=max_frame_bytes, pace=pace, name=port)
        try:
            device = serial.Serial(port, baudrate=baud, timeout=0)
            device.reset_input_buffer()  # bytes from before we opened it (boot chatter, a dead session) are stale
        except (serial.SerialException, ValueError, OSError) as error:
            raise SerialLinkError(f"cannot open serial port {port}: {error}") from None
        return cls(FdTransport(device.fileno(), timeout_s, owner=device), baud, max_frame_bytes=max_frame_bytes, pace=pace, name=port)

    @classmethod
    def from_fd(cls, fd: int, baud: int = 115200, *, close_fd: bool = True, timeout_s: float = 10.0,
                **options: object) -> SerialLink:
        """A link over an already open descriptor (a pty master); it closes the fd unless `close_fd=False`."""
        return cls(FdTransport(fd, timeout_s, close_fd=close_fd), baud, **options)  # type: ignore[arg-type]

    async def __aenter__(self) -> SerialLink:  # noqa: PYI034 — the project's convention
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.close()

    @property
    def line_rate_bytes_per_s(self) -> float:
        return line_rate_bytes_per_s(self.baud)

    def next_sequence(self) -> int:
        sequence = self._sequence
        self._sequence = (self._sequence + 1) % (MAX_SEQUENCE + 1)
        return sequence

    async def send_message(self, message_type: MessageType, payload: bytes, *, flags: int = 0) -> Frame:
        """Send `payload` under the next sequence number; returns the frame sent."""
        frame = Frame(message_type, self.next_sequence(), bytes(payload), flags)
        await self.send(frame)
        return frame

    async def send(self, frame: Frame) -> None:
        """Write one frame; returns when the line has carried it (at `baud`, 8N1).

        Paced, the bytes are released when a UART would have finished sending them (after the frame's
        line time), so over a pty, a socket or USB serial the receiver sees each frame complete when a
        real line at `baud` would have delivered it, never earlier.
        """
        data = encode_frame(frame.message_type, frame.sequence, frame.payload, flags=frame.flags,
                            session=frame.session, max_frame_bytes=self.max_frame_bytes)
        if self._closed:
            raise SerialLinkError(f"{self.name}: link is closed")
        loop = asyncio.get_running_loop()
        async with self._send_lock:
            now = loop.time()
            start = self._line_free_at if now - self._line_free_at <= PACING_SLACK_S else now
            end = start + len(data) / self.line_rate_bytes_per_s
            if self.pace and end > now:
                await asyncio.sleep(end - now)
            try:
                await self.transport.write(data)
            except (OSError, asyncio.TimeoutError) as error:
                raise SerialLinkError(f"{self.name}: write failed: {error or 'timed out'}") from None
            self.bytes_sent += len(data)
            self._line_free_at = end

    async def receive(self, timeout_s: float) -> Frame:
        """The next frame; SerialLinkTimeout if none within `timeout_s`, SerialLinkError once closed."""
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that coincides with a frame
        # arriving, and the cancelled caller then waits on forever.
        getter = asyncio.ensure_future(self._queue.get())
        try:
            await asyncio.wait({getter}, timeout=timeout_s)
        finally:
            if not getter.done():
                getter.cancel()  # Queue.get gives up cleanly: the frame stays queued for the next reader
        if not getter.done() or getter.cancelled():
            raise SerialLinkTimeout(f"{self.name}: no frame within {timeout_s} s")
        frame = getter.result()
        if frame is None:
            self._queue.put_nowait(None)  # keep the end marker for later readers
            raise self._end_error()
        return frame

    async def frames(self) -> AsyncIterator[Frame]:
        """Frames as they arrive, until the other side hangs up (then SerialLinkError if the read failed)."""
        while True:
            frame = await self._queue.get()
            if frame is None:
                self._queue.put_nowait(None)
                if self._failure is not None:
                    raise self._end_error()
                return
            yield frame

    def _end_error(self) -> SerialLinkError:
        if self._failure is not None:
            return SerialLinkError(f"{self.name}: read failed: {self._failure}")
        return SerialLinkError(f"{self.name}: link closed")

    async def _receive_loop(self) -> None:
        try:
            while True:
                data = await self.transport.read()
                if not data:
                    break
                self.bytes_received += len(data)
                for frame in self.decoder.feed(data):
                    await self._queue.put(frame)
        except Exception as error:  # noqa: BLE001 — surfaced to every reader by _end_error, never dropped
            self._failure = error
        await self._queue.put(None)  # end of stream: waits for room, so no frame read before it is lost

    def _finish_queue(self) -> None:
        while True:
            try:
                self._queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()  # closing: the oldest unread frame gives way to the end marker

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pump.cancel()
        await asyncio.wait([self._pump])
        self.transport.close()
        self._finish_queue()


@dataclass(frozen=True)
class PacedThroughput:
    """Payload bytes per second a paced transfer reached, next to the line rate net of framing."""

    net_line_rate: float
    sender: float
    receiver: float


async def measure_paced_throughput(host: SerialLink, board: SerialLink, payload_bytes: int,
                                   count: int) -> PacedThroughput:
    """Send `count` update-chunk frames from `host` to `board` (two ends of one line) and time both sides.

    The sender rate counts from the first send to the last; the receiver rate from the first arrival to
    the last, so it does not depend on when the receiver started listening.
    """
    if count < 2:
        raise SerialLinkError(f"count={count} is too small: the receiver rate needs at least two frames")
    payload = bytes(1 + index % 255 for index in range(payload_bytes))
    net_line_rate = (line_rate_bytes_per_s(host.baud) * payload_bytes
                     / (payload_bytes + framing_overhead_bytes(payload_bytes)))
    arrivals: list[float] = []

    async def receive_all() -> None:
        async for frame in board.frames():
            if frame.payload != payload:
                raise SerialLinkError(f"frame {len(arrivals)} arrived changed")
            arrivals.append(time.perf_counter())
            if len(arrivals) == count:
                return

    receiver = asyncio.create_task(receive_all())
    started = time.perf_counter()
    for _ in range(count):
        await host.send_message(MessageType.UPDATE_CHUNK, payload)
    sender_seconds = time.perf_counter() - started
    line_seconds = count * (payload_bytes + framing_overhead_bytes(payload_bytes)) / line_rate_bytes_per_s(host.baud)
    await asyncio.wait_for(receiver, 10 + 2 * line_seconds)
    return PacedThroughput(
        net_line_rate=net_line_rate,
        sender=count * payload_bytes / sender_seconds,
        receiver=(count - 1) * payload_bytes / (arrivals[-1] - arrivals[0]),
    )

