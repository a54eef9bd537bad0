"""Serial framing between host bridge and board agent: COBS frames with a CRC32, decoded by a resyncing stream reader.

On the wire every frame is ``0x00 COBS(body) 0x00``. ``body`` is (little-endian)::

    u8 message type | u8 flags | u16 sequence | u32 session | payload | u32 CRC32 (zlib.crc32 of type..payload)

``session`` names the sender's numbered stream the sequence belongs to (devices.reliable_serial; 0 for
frames outside one), so a frame left over from an ended session is never taken for one of the next.

The leading delimiter ends whatever garbage preceded the frame (a board's boot chatter, line noise), so a
frame after any noise decodes; two delimiters in a row are an empty frame and ignored. Payloads by type:

===============  ==========================================================================
HELLO            JSON ``{"board", "profile", "capabilities": [...], "version", "run"}`` (`Hello`)
UPDATE_CHUNK     binary ``u16 key length | key (UTF-8) | u32 chunk index | chunk bytes`` (`UpdateChunk`);
                 flag FLAG_MORE: more pieces of the same chunk follow (chunks above the frame size)
ACK, NACK        binary ``u16 sequence | u32 session | reason (UTF-8, empty for ACK)`` (`Ack`): link control,
                 outside the numbered stream (devices.reliable_serial); ACK: every frame of `session` up to
                 `sequence` arrived; NACK: `sequence` of `session` is missing (session 0: "I hold no
                 session of yours", the sender starts a new one)
APPLY_RESULT     JSON (update key, version, ok, reason)
REPORT           JSON (the device report: accuracy, energy, timings)
LOG              one UTF-8 log line
PING, PONG       opaque bytes, echoed by PONG
MANIFEST         the update manifest's JSON, as published on MQTT (testbed.core.manifest)
CONFIG           zlib-compressed JSON: what the run asks of the board (run id, device, the scenario)
READY            JSON ``{"device", "run", "version"}``: the board is configured and holds `version`
SYNC             binary ``u32 session | u32 known``: the first frame of a sender's numbered stream; `known` is
                 the receiver's own session as the sender last heard it (0: none) (devices.reliable_serial)
===============  ==========================================================================
"""

from __future__ import annotations

import json
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any
from devices.errors import DeviceError

DEFAULT_MAX_FRAME_BYTES = 4096
HEADER = struct.Struct("<BBHI")  # type, flags, sequence, session
CRC = struct.Struct("<I")
DELIMITER = b"\x00"
DELIMITER_BYTES = 2  # one before and one after every frame
FRAME_OVERHEAD_DECODED = HEADER.size + CRC.size
MAX_SEQUENCE = 0xFFFF
COBS_BLOCK = 254  # longest run of non-zero bytes one COBS code byte can cover


class SerialFrameError(DeviceError):
    """A frame or payload that cannot be encoded or parsed (misuse, or a malformed payload)."""


class MessageType(IntEnum):
    """What a frame carries; the value is the type byte on the wire."""

    HELLO = 1
    UPDATE_CHUNK = 2
    ACK = 3
    NACK = 4
    APPLY_RESULT = 5
    REPORT = 6
    LOG = 7
    PING = 8
    PONG = 9
    MANIFEST = 10
    CONFIG = 11
    READY = 12
    SYNC = 13


FLAG_MORE = 0x01  # UPDATE_CHUNK: the chunk continues in the next frame


class DecodeError(str, Enum):
    """Why the decoder dropped bytes; the keys of `FrameDecoder.errors`."""

    BAD_COBS = "bad_cobs"
    TOO_SHORT = "too_short"
    BAD_CRC = "bad_crc"
    UNKNOWN_TYPE = "unknown_type"
    OVERSIZE = "oversize"


@dataclass(frozen=True)
class Frame:
    """One decoded frame."""

    message_type: MessageType
    sequence: int
    payload: bytes
    flags: int = 0
    session: int = 0


# --- COBS ---------------------------------------------------------------------------------------------

def cobs_encode(data: bytes) -> bytes:
    """COBS-encode `data` (no 0x00 in the result; no trailing code byte after a full 254-byte block)."""
    out = bytearray()
    start = 0
    length = len(data)
    while True:
        zero = data.find(0, start, start + COBS_BLOCK)
        if zero >= 0:
            out.append(zero - start + 1)
            out += data[start:zero]
            start = zero + 1
            continue
        end = min(start + COBS_BLOCK, length)
        if end - start == COBS_BLOCK:
            out.append(0xFF)
            out += data[start:end]
            start = end
            if start == length:
                return bytes(out)
            continue
        out.append(end - start + 1)
        out += data[start:end]
        return bytes(out)


def cobs_decode(encoded: bytes) -> bytes:
    """Inverse of `cobs_encode`; SerialFrameError on a 0x00 byte or a code that runs past the end."""
    out = bytearray()
    position = 0
    length = len(encoded)
    if length == 0:
        raise SerialFrameError("empty COBS block")
    while position < length:
        code = encoded[position]
        if code == 0:
            raise SerialFrameError(f"0x00 inside a COBS block at offset {position}")
        block = encoded[position + 1:position + code]
        if len(block) != code - 1 or 0 in block:
            raise SerialFrameError(f"COBS code {code} at offset {position} runs past the block or over a 0x00")
        out += block
        position += code
        if code != 0xFF and position < length:
            out.append(0)
    return bytes(out)


def cobs_max_encoded_length(length: int) -> int:
    """Longest COBS encoding of `length` bytes (reached when none of them is 0x00)."""
    if length < 0:
        raise SerialFrameError(f"length must not be negative, got {length}")
    return length + max(1, -(-length // COBS_BLOCK))


def framing_overhead_bytes(payload_len: int) -> int:
    """Bytes on the wire beyond the payload, worst case: header + CRC + COBS codes + 2 delimiters.

    Exact for frames whose body holds no 0x00 byte; every other frame is shorter (each 0x00 in the body
    turns into a COBS code byte it would have needed anyway).
    """
    body = payload_len + FRAME_OVERHEAD_DECODED
    return cobs_max_encoded_length(body) - payload_len + DELIMITER_BYTES


def max_payload_bytes(max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> int:
    """Largest payload a frame of `max_frame_bytes` decoded bytes carries."""
    return max_frame_bytes - FRAME_OVERHEAD_DECODED


# --- frames -------------------------------------------------------------------------------------------

def encode_frame(
    message_type: MessageType | int, sequence: int, payload: bytes, *,
    flags: int = 0, session: int = 0, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
) -> bytes:
    """The wire bytes of one frame (delimiters included); SerialFrameError on a value it cannot carry."""
    try:
        message_type = MessageType(message_type)
    except ValueError:
        raise SerialFrameError(f"unknown message type {message_type!r}; known: {[t.name for t in MessageType]}") from None
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence <= MAX_SEQUENCE:
        raise SerialFrameError(f"sequence must be an int in 0..{MAX_SEQUENCE}, got {sequence!r}")
    if isinstance(flags, bool) or not isinstance(flags, int) or not 0 <= flags <= 0xFF:
        raise SerialFrameError(f"flags must be an int in 0..255, got {flags!r}")
    if isinstance(session, bool) or not isinstance(session, int) or not 0 <= session <= 0xFFFFFFFF:
        raise SerialFrameError(f"session must be an int in 0..2**32-1, got {session!r}")
    payload = bytes(payload)
    if len(payload) > max_payload_bytes(max_frame_bytes):
        raise SerialFrameError(
            f"payload of {len(payload)} bytes exceeds the frame limit: at most {max_payload_bytes(max_frame_bytes)} "
            f"bytes fit a {max_frame_bytes}-byte frame; split it (testbed.core.wire.split_chunks)"
        )
    body = HEADER.pack(message_type, flags, sequence, session) + payload
    body += CRC.pack(zlib.crc32(body))
    return DELIMITER + cobs_encode(body) + DELIMITER


def parse_frame_body(body: bytes) -> Frame | DecodeError:
    """A decoded (un-COBSed) body as a Frame, or the reason it is not one."""
    if len(body) < FRAME_OVERHEAD_DECODED:
        return DecodeError.TOO_SHORT
    (crc,) = CRC.unpack_from(body, len(body) - CRC.size)
    if zlib.crc32(body[:-CRC.size]) != crc:
        return DecodeError.BAD_CRC
    type_byte, flags, sequence, session = HEADER.unpack_from(body)
    try:
        message_type = MessageType(type_byte)
    except ValueError:
        return DecodeError.UNKNOWN_TYPE
    return Frame(message_type, sequence, bytes(body[HEADER.size:-CRC.size]), flags, session)


class FrameDecoder:
    """Streaming decoder: feed it bytes as they arrive, get the complete valid frames back.

    Never raises on input. Garbage, truncated frames, bad COBS, bad CRCs, unknown types and frames over
    `max_frame_bytes` are dropped up to the next delimiter and counted in `errors` by `DecodeError`.
    COBS is undone as bytes arrive, so at most `max_frame_bytes` of an unfinished frame are held.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        if isinstance(max_frame_bytes, bool) or not isinstance(max_frame_bytes, int) \
                or max_frame_bytes < FRAME_OVERHEAD_DECODED:
            raise SerialFrameError(f"max_frame_bytes must be an int >= {FRAME_OVERHEAD_DECODED}, got {max_frame_bytes!r}")
        self.max_frame_bytes = max_frame_bytes
        self.errors: Counter[str] = Counter()
        self.frames_decoded = 0
        self._body = bytearray()
        self._block_left = 0  # data bytes still owed to the current COBS block
        self._zero_pending = False  # the current block (code < 0xFF) ends in an implied 0x00
        self._started = False  # bytes of a frame seen since the last delimiter
        self._discarding = False  # dropping an oversize frame up to its delimiter

    @property
    def buffered_bytes(self) -> int:
        """Decoded bytes of the unfinished frame held now (never above max_frame_bytes)."""
        return len(self._body)

    def feed(self, data: bytes) -> list[Frame]:
        """Consume `data`; return the frames it completed, in order."""
        frames: list[Frame] = []
        data = bytes(data)
        position, length = 0, len(data)
        while position < length:
            if self._discarding:
                delimiter = data.find(0, position)
                if delimiter < 0:
                    return frames
                position = delimiter + 1
                self._reset()
                continue
            if self._block_left == 0:
                code = data[position]
                position += 1
                if code == 0:
                    self._finish(frames)
                    continue
                self._started = True
                if self._zero_pending and not self._append(b"\x00"):
                    continue
                self._block_left = code - 1
                self._zero_pending = code != 0xFF
                continue
            block = data[position:position + self._block_left]
            zero = block.find(0)
            if zero >= 0:  # delimiter inside a block: the frame was cut short
                self.errors[DecodeError.BAD_COBS.value] += 1
                self._reset()
                position += zero + 1
                continue
            position += len(block)
            self._block_left -= len(block)
            self._append(block)
        return frames

    def _append(self, chunk: bytes) -> bool:
        if len(self._body) + len(chunk) > self.max_frame_bytes:
            self.errors[DecodeError.OVERSIZE.value] += 1
            self._reset()
            self._discarding = True
            return False
        self._body += chunk
        return True

    def _finish(self, frames: list[Frame]) -> None:
        if self._started:
            result = parse_frame_body(bytes(self._body))
            if isinstance(result, Frame):
                frames.append(result)
                self.frames_decoded += 1
            else:
                self.errors[result.value] += 1
        self._reset()

    def _reset(self) -> None:
        self._body.clear()
        self._block_left = 0
        self._zero_pending = False
        self._started = False
        self._discarding = False


# --- payloads -----------------------------------------------------------------------------------------

UPDATE_CHUNK_KEY = struct.Struct("<H")
UPDATE_CHUNK_INDEX = struct.Struct("<I")
ACK_HEADER = struct.Struct("<HI")  # sequence, session
SESSION = struct.Struct("<II")  # session, the peer's session known


@dataclass(frozen=True)
class UpdateChunk:
    """One chunk of an encoded update (the same key and index as the MQTT chunk topic)."""

    key: str
    index: int
    data: bytes

    def to_payload(self) -> bytes:
        key = self.key.encode("utf-8")
        if len(key) > 0xFFFF:
            raise SerialFrameError(f"update key of {len(key)} bytes is longer than 65535")
        if not 0 <= self.index <= 0xFFFFFFFF:
            raise SerialFrameError(f"chunk index must be in 0..2**32-1, got {self.index}")
        return UPDATE_CHUNK_KEY.pack(len(key)) + key + UPDATE_CHUNK_INDEX.pack(self.index) + bytes(self.data)

    @classmethod
    def from_payload(cls, payload: bytes) -> UpdateChunk:
        if len(payload) < UPDATE_CHUNK_KEY.size:
            raise SerialFrameError(f"update chunk payload of {len(payload)} bytes has no key length")
        (key_length,) = UPDATE_CHUNK_KEY.unpack_from(payload)
        index_at = UPDATE_CHUNK_KEY.size + key_length
        if len(payload) < index_at + UPDATE_CHUNK_INDEX.size:
            raise SerialFrameError(f"update chunk payload of {len(payload)} bytes is shorter than its {key_length}-byte key + index")
        try:
            key = payload[UPDATE_CHUNK_KEY.size:index_at].decode("utf-8")
        except UnicodeDecodeError as error:
            raise SerialFrameError(f"update chunk key is not UTF-8: {error}") from None
        (index,) = UPDATE_CHUNK_INDEX.unpack_from(payload, index_at)
        return cls(key, index, bytes(payload[index_at + UPDATE_CHUNK_INDEX.size:]))


@dataclass(frozen=True)
class Ack:
    """ACK or NACK of the frame with `sequence` in the sender's stream `session`; a NACK says why."""

    sequence: int
    session: int = 0
    reason: str = ""

    def to_payload(self) -> bytes:
        if not 0 <= self.sequence <= MAX_SEQUENCE:
            raise SerialFrameError(f"acknowledged sequence must be in 0..{MAX_SEQUENCE}, got {self.sequence}")
        if not 0 <= self.session <= 0xFFFFFFFF:
            raise SerialFrameError(f"session must be in 0..2**32-1, got {self.session}")
        return ACK_HEADER.pack(self.sequence, self.session) + self.reason.encode("utf-8")

    @classmethod
    def from_payload(cls, payload: bytes) -> Ack:
        if len(payload) < ACK_HEADER.size:
            raise SerialFrameError(f"ack payload of {len(payload)} bytes has no sequence and session")
        sequence, session = ACK_HEADER.unpack_from(payload)
        return cls(sequence, session, payload[ACK_HEADER.size:].decode("utf-8", errors="replace"))


def session_payload(session: int, known: int = 0) -> bytes:
    """A SYNC payload: the session a sender's numbered stream starts, and the receiver's session it knows (0: none)."""
    if not 0 < session <= 0xFFFFFFFF or not 0 <= known <= 0xFFFFFFFF:
        raise SerialFrameError(f"session must be in 1..2**32-1 and known in 0..2**32-1, got {session}, {known}")
    return SESSION.pack(session, known)


def parse_session_payload(payload: bytes) -> tuple[int, int]:
    """(session, known) of a SYNC payload; SerialFrameError unless it is two u32 and the session is not 0."""
    if len(payload) != SESSION.size:
        raise SerialFrameError(f"SYNC payload must be {SESSION.size} bytes, got {len(payload)}")
    session, known = SESSION.unpack(payload)
    if session == 0:
        raise SerialFrameError("SYNC session must not be 0")
    return session, known


@dataclass(frozen=True)
class Hello:
    """A board introducing itself: its id, device profile, what it can do, and the model version it holds.

    `run` is the run its `version` belongs to ("" for a board that has not been configured yet).
    """

    board: str
    profile: str
    capabilities: tuple[str, ...] = ()
    version: int = 0
    run: str = ""

    def to_payload(self) -> bytes:
        return json_payload({"board": self.board, "profile": self.profile, "capabilities": list(self.capabilities),
                             "version": self.version, "run": self.run})

    @classmethod
    def from_payload(cls, payload: bytes) -> Hello:
        data = parse_json_payload(payload)
        required, optional = {"board", "profile", "capabilities"}, {"version", "run"}
        if not required <= set(data) <= required | optional:
            raise SerialFrameError(f"hello fields must be board, profile, capabilities[, version, run]; got {sorted(data)}")
        capabilities = data["capabilities"]
        version, run = data.get("version", 0), data.get("run", "")
        if not isinstance(data["board"], str) or not isinstance(data["profile"], str) \
                or not isinstance(capabilities, list) or not all(isinstance(item, str) for item in capabilities) \
                or isinstance(version, bool) or not isinstance(version, int) or version < 0 or not isinstance(run, str):
            raise SerialFrameError(f"hello has a field of the wrong type: {data!r}")
        return cls(data["board"], data["profile"], tuple(capabilities), version, run)


def json_payload(message: dict[str, Any]) -> bytes:
    """A JSON object as a frame payload (HELLO, APPLY_RESULT, REPORT)."""
    return json.dumps(message, separators=(",", ":"), sort_keys=True).encode("utf-8")


def parse_json_payload(payload: bytes) -> dict[str, Any]:
    """A frame payload that must be a JSON object; SerialFrameError otherwise."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as error:  # ValueError covers UnicodeDecodeError and JSONDecodeError
        raise SerialFrameError(f"payload is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise SerialFrameError(f"payload must be a JSON object, got {type(data).__name__}")
    return data


def log_payload(line: str) -> bytes:
    """A log line as a LOG payload (no trailing newline)."""
    return line.rstrip("\r\n").encode("utf-8")


def parse_log_payload(payload: bytes) -> str:
    """A LOG payload as text; undecodable bytes become U+FFFD rather than losing the line."""
    return payload.decode("utf-8", errors="replace")
