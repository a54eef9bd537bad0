"""Serial framing: COBS vectors, frame round trips, and a decoder that resyncs on any noise or corruption."""

from __future__ import annotations

import zlib
from itertools import pairwise

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from devices.serial_framing import (
    CRC,
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    Ack,
    DecodeError,
    Frame,
    FrameDecoder,
    Hello,
    MessageType,
    SerialFrameError,
    UpdateChunk,
    cobs_decode,
    cobs_encode,
    cobs_max_encoded_length,
    encode_frame,
    framing_overhead_bytes,
    json_payload,
    log_payload,
    max_payload_bytes,
    parse_json_payload,
    parse_log_payload,
    parse_session_payload,
    session_payload,
)
from testbed.core.wire import split_chunks

frames_strategy = st.builds(
    Frame,
    message_type=st.sampled_from(MessageType),
    sequence=st.integers(0, 0xFFFF),
    payload=st.binary(max_size=600),
    flags=st.integers(0, 255),
)


def wire(frame: Frame, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    return encode_frame(frame.message_type, frame.sequence, frame.payload, flags=frame.flags,
                        max_frame_bytes=max_frame_bytes)


def raw_frame(body_without_crc: bytes) -> bytes:
    """Wire bytes of a hand-made body (bypasses encode_frame's checks)."""
    body = body_without_crc + CRC.pack(zlib.crc32(body_without_crc))
    return b"\x00" + cobs_encode(body) + b"\x00"


def feed_in_pieces(decoder: FrameDecoder, stream: bytes, cuts: list[int]) -> list[Frame]:
    decoded: list[Frame] = []
    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut in cuts)})
    for start, end in pairwise(bounds):
        decoded += decoder.feed(stream[start:end])
        assert decoder.buffered_bytes <= decoder.max_frame_bytes
    return decoded


# --- COBS ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "encoded"), [
    # the reference examples (Cheshire & Baker; as listed on Wikipedia "Consistent Overhead Byte Stuffing")
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x00\x11\x00", b"\x01\x02\x11\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255))),
    (bytes(range(255)), b"\x01\xff" + bytes(range(1, 255))),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
    (bytes(range(2, 256)) + b"\x00", b"\xff" + bytes(range(2, 256)) + b"\x01\x01"),
    (b"", b"\x01"),
])
def test_cobs_reference_vectors(raw, encoded):
    assert cobs_encode(raw) == encoded
    assert cobs_decode(encoded) == raw


@given(st.binary(max_size=2000))
def test_cobs_round_trip_and_bound(data):
    encoded = cobs_encode(data)
    assert 0 not in encoded
    assert cobs_decode(encoded) == data
    assert len(encoded) <= cobs_max_encoded_length(len(data))


def test_cobs_worst_case_is_reached_by_data_without_zeros():
    for length in range(1100):
        data = bytes(1 + index % 255 for index in range(length))
        assert len(cobs_encode(data)) == cobs_max_encoded_length(length) == length + max(1, -(-length // 254))


@pytest.mark.parametrize("bad", [b"", b"\x03\x11", b"\x02\x00", b"\x00"])
def test_cobs_decode_rejects_malformed(bad):
    with pytest.raises(SerialFrameError):
        cobs_decode(bad)


# --- frames and overhead ------------------------------------------------------------------------------

@given(frames_strategy)
def test_frame_round_trip(frame):
    encoded = wire(frame)
    assert encoded[:1] == encoded[-1:] == b"\x00" and 0 not in encoded[1:-1]
    assert FrameDecoder().feed(encoded) == [frame]
    assert len(encoded) <= len(frame.payload) + framing_overhead_bytes(len(frame.payload))


@settings(suppress_health_check=[HealthCheck.filter_too_much])
@given(st.binary(min_size=0, max_size=3000).map(lambda data: data.replace(b"\x00", b"\x07")),
       st.integers(1, 255), st.integers(0x0101, 0xFFFF))
def test_overhead_is_exact_for_bodies_without_zero(payload, flags, sequence):
    assume(b"\x00" not in HEADER.pack(MessageType.UPDATE_CHUNK, flags, sequence, 0x01010101))
    body = HEADER.pack(MessageType.UPDATE_CHUNK, flags, sequence, 0x01010101) + payload
    assume(b"\x00" not in CRC.pack(zlib.crc32(body)))
    encoded = encode_frame(MessageType.UPDATE_CHUNK, sequence, payload, flags=flags, session=0x01010101)
    assert len(encoded) - len(payload) == framing_overhead_bytes(len(payload))


def test_overhead_exact_at_every_payload_length():
    for length in range(max_payload_bytes() + 1):
        payload = bytes(1 + index % 255 for index in range(length))
        for sequence in range(0x0101, 0x0201):  # find a header and CRC with no 0x00 byte
            body = HEADER.pack(MessageType.UPDATE_CHUNK, 1, sequence, 0x01010101) + payload
            if 0 not in HEADER.pack(MessageType.UPDATE_CHUNK, 1, sequence, 0x01010101) and 0 not in CRC.pack(zlib.crc32(body)):
                break
        encoded = encode_frame(MessageType.UPDATE_CHUNK, sequence, payload, flags=1, session=0x01010101)
        assert len(encoded) == length + framing_overhead_bytes(length), length
    # by hand: 8 header + 4 CRC + 2 delimiters + one COBS code per started 254 bytes of body
    assert framing_overhead_bytes(0) == 12 + 2 + 1
    assert framing_overhead_bytes(242) == 12 + 2 + 1  # body of exactly 254 bytes
    assert framing_overhead_bytes(243) == 12 + 2 + 2
    assert framing_overhead_bytes(4084) == 12 + 2 + 17  # 4096-byte body: ceil(4096 / 254) = 17


@pytest.mark.parametrize(("arguments", "message"), [
    ((MessageType.PING, 0, b"x" * (DEFAULT_MAX_FRAME_BYTES - 7)), "exceeds the frame limit"),
    ((MessageType.PING, 0x10000, b""), "sequence"),
    ((MessageType.PING, -1, b""), "sequence"),
    ((99, 0, b""), "unknown message type"),
])
def test_encode_misuse_raises(arguments, message):
    with pytest.raises(SerialFrameError, match=message):
        encode_frame(*arguments)


def test_encode_limits():
    assert FrameDecoder().feed(encode_frame(MessageType.PING, 0, b"x" * max_payload_bytes()))[0].payload == b"x" * 4084
    with pytest.raises(SerialFrameError, match="flags"):
        encode_frame(MessageType.PING, 0, b"", flags=256)
    with pytest.raises(SerialFrameError, match="max_frame_bytes"):
        FrameDecoder(max_frame_bytes=7)


# --- the decoder against noise and corruption ---------------------------------------------------------

@settings(max_examples=300)
@given(st.lists(st.tuples(st.binary(max_size=80), frames_strategy), max_size=8), st.binary(max_size=80),
       st.lists(st.integers(0, 10_000), max_size=30))
def test_any_noise_between_frames_decodes_to_exactly_the_frames(items, tail_noise, cuts):
    frames = [frame for _, frame in items]
    stream = b"".join(noise + wire(frame) for noise, frame in items) + tail_noise
    assert feed_in_pieces(FrameDecoder(), stream, cuts) == frames


@settings(max_examples=300)
@given(st.lists(st.tuples(st.binary(max_size=40).filter(lambda noise: 0 not in noise), frames_strategy),
                min_size=1, max_size=6),
       st.lists(st.integers(0, 10_000), max_size=30))
def test_noise_without_delimiters_costs_nothing_but_a_counted_error(items, cuts):
    decoder = FrameDecoder()
    stream = b"".join(noise + wire(frame) for noise, frame in items)
    assert feed_in_pieces(decoder, stream, cuts) == [frame for _, frame in items]
    assert sum(decoder.errors.values()) == sum(1 for noise, _ in items if noise)


@settings(max_examples=400)
@given(st.lists(frames_strategy, min_size=1, max_size=6), st.data(), st.lists(st.integers(0, 10_000), max_size=20))
def test_a_single_corruption_loses_only_that_frame(frames, data, cuts):
    victim = data.draw(st.integers(0, len(frames) - 1), label="victim")
    encoded = [wire(frame) for frame in frames]
    position = data.draw(st.integers(0, len(encoded[victim]) - 1), label="position")
    old = encoded[victim][position]
    new = data.draw(st.integers(0, 255).filter(lambda value: value != old), label="new byte")
    encoded[victim] = encoded[victim][:position] + bytes([new]) + encoded[victim][position + 1:]
    decoder = FrameDecoder()
    decoded = feed_in_pieces(decoder, b"".join(encoded) + b"\x00", cuts)
    assert decoded == frames[:victim] + frames[victim + 1:]
    assert sum(decoder.errors.values()) >= 1


@given(st.lists(st.one_of(frames_strategy, st.binary(min_size=1, max_size=300)), max_size=10),
       st.lists(st.integers(0, 10_000), max_size=20))
def test_small_frame_limit_drops_only_oversize_frames(items, cuts):
    limit = 64
    decoder = FrameDecoder(max_frame_bytes=limit)
    stream = b""
    expected = []
    for item in items:
        if isinstance(item, Frame):
            body = HEADER.pack(item.message_type, item.flags, item.sequence, 0) + item.payload
            stream += raw_frame(body)
            if len(body) + 4 <= limit:
                expected.append(item)
        else:
            stream += item  # noise
    assert feed_in_pieces(decoder, stream, cuts) == expected


def test_each_rejection_is_counted_by_reason():
    good = encode_frame(MessageType.LOG, 7, b"boot ok")
    body = HEADER.pack(MessageType.LOG, 0, 1, 0) + b"hello"
    wrong_crc = b"\x00" + cobs_encode(body + CRC.pack(zlib.crc32(body) ^ 1)) + b"\x00"
    stream = b"".join([
        b"garbage before anything",  # "g" reads as a COBS code of 103, cut short by the next delimiter
        good,
        wrong_crc,
        raw_frame(bytes([200, 0, 0, 0]) + b"what"),  # unknown type
        raw_frame(HEADER.pack(MessageType.PING, 0, 0, 0) + b"y" * DEFAULT_MAX_FRAME_BYTES),  # oversize
        b"\x00\x05ab\x00",  # a COBS block cut short by a delimiter
        b"\x00\x01\x01\x01\x00",  # COBS of three zero bytes: shorter than a header + CRC
        good,
    ])
    decoder = FrameDecoder()
    assert [frame.sequence for frame in decoder.feed(stream)] == [7, 7]
    assert dict(decoder.errors) == {
        DecodeError.BAD_CRC.value: 1, DecodeError.UNKNOWN_TYPE.value: 1, DecodeError.OVERSIZE.value: 1,
        DecodeError.BAD_COBS.value: 2, DecodeError.TOO_SHORT.value: 1,
    }
    assert decoder.frames_decoded == 2


def test_oversize_frame_is_never_held_in_full():
    decoder = FrameDecoder(max_frame_bytes=100)
    endless = bytes([0xFF]) + b"\x01" * 254
    for _ in range(100):
        decoder.feed(endless)
        assert decoder.buffered_bytes <= 100
    assert decoder.errors == {DecodeError.OVERSIZE.value: 1}
    assert decoder.feed(encode_frame(MessageType.PONG, 3, b"back")) == [Frame(MessageType.PONG, 3, b"back")]


def test_frame_of_exactly_the_limit_decodes():
    payload = b"z" * max_payload_bytes(100)
    assert FrameDecoder(max_frame_bytes=100).feed(
        encode_frame(MessageType.REPORT, 1, payload, max_frame_bytes=100)) == [Frame(MessageType.REPORT, 1, payload)]


# --- payloads -----------------------------------------------------------------------------------------

@given(st.text(max_size=60), st.integers(0, 2**32 - 1), st.binary(max_size=500))
def test_update_chunk_round_trip(key, index, data):
    chunk = UpdateChunk(key, index, data)
    frame = FrameDecoder().feed(encode_frame(MessageType.UPDATE_CHUNK, 1, chunk.to_payload()))[0]
    assert UpdateChunk.from_payload(frame.payload) == chunk


def test_update_chunks_carry_a_split_update():
    update = bytes(range(256)) * 40
    chunk_size = max_payload_bytes() - 64
    payloads = [UpdateChunk("r3-v4", index, chunk).to_payload()
                for index, chunk in enumerate(split_chunks(update, chunk_size))]
    stream = b"".join(encode_frame(MessageType.UPDATE_CHUNK, seq, payload) for seq, payload in enumerate(payloads))
    chunks = [UpdateChunk.from_payload(frame.payload) for frame in FrameDecoder().feed(stream)]
    assert b"".join(chunk.data for chunk in chunks) == update
    assert [chunk.index for chunk in chunks] == list(range(len(payloads)))


@pytest.mark.parametrize("bad", [b"", b"\x05\x00ab", b"\x02\x00\xff\xfe\x00\x00\x00\x00"])
def test_update_chunk_rejects_malformed(bad):
    with pytest.raises(SerialFrameError):
        UpdateChunk.from_payload(bad)


def test_ack_hello_json_and_log_payloads():
    assert Ack.from_payload(Ack(513, 0xDEADBEEF, "crc").to_payload()) == Ack(513, 0xDEADBEEF, "crc")
    assert Ack.from_payload(Ack(0).to_payload()) == Ack(0)
    with pytest.raises(SerialFrameError):
        Ack.from_payload(b"\x01\x00\x02")
    with pytest.raises(SerialFrameError):
        Ack(1, 2**32).to_payload()
    assert parse_session_payload(session_payload(7)) == (7, 0)
    frame = Frame(MessageType.LOG, 9, b"x", 0, 0xCAFEF00D)
    assert FrameDecoder().feed(encode_frame(frame.message_type, 9, b"x", session=frame.session)) == [frame]
    with pytest.raises(SerialFrameError, match="session"):
        encode_frame(MessageType.LOG, 0, b"", session=2**32)
    assert parse_session_payload(session_payload(7, 2**32 - 1)) == (7, 2**32 - 1)
    for bad in (b"", b"\x00" * 8, b"\x01\x00\x00\x00\x00"):
        with pytest.raises(SerialFrameError):
            parse_session_payload(bad)
    with pytest.raises(SerialFrameError):
        session_payload(0)
    hello = Hello("bench-pi", "rpi4", ("energy:ina219", "serial:115200"))
    assert Hello.from_payload(hello.to_payload()) == hello
    with pytest.raises(SerialFrameError, match="fields"):
        Hello.from_payload(json_payload({"board": "x"}))
    with pytest.raises(SerialFrameError, match="wrong type"):
        Hello.from_payload(json_payload({"board": "x", "profile": "rpi4", "capabilities": "all"}))
    assert parse_json_payload(json_payload({"accuracy": 0.9})) == {"accuracy": 0.9}
    for bad in (b"{", b"[1]", b"\xff"):
        with pytest.raises(SerialFrameError):
            parse_json_payload(bad)
    assert parse_log_payload(log_payload("applied v3\r\n")) == "applied v3"
    assert parse_log_payload(b"bad \xff byte") == "bad \ufffd byte"
