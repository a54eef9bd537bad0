"""Topic names of a run, their parsers, and the MQTT PUBLISH size used for airtime accounting."""

from __future__ import annotations

import struct

import paho.mqtt.client as paho
import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.core.topics import DEVICE_MESSAGE_KINDS, Topics, mqtt_publish_wire_bytes, update_key

TOPICS = Topics("r1")


def test_paths():
    assert TOPICS.prefix == "testbed/r1/"
    assert TOPICS.manifest == "testbed/r1/manifest"
    assert TOPICS.update_chunk("3", 7) == "testbed/r1/update/3/7"
    assert TOPICS.update_chunks == "testbed/r1/update/+/+"
    assert TOPICS.device_update_chunk("d1", "3-from-1", 0) == "testbed/r1/device/d1/update/3-from-1/0"
    assert TOPICS.device_update_chunks("d1") == "testbed/r1/device/d1/update/+/+"
    assert TOPICS.device("d1", "report") == "testbed/r1/device/d1/report"
    assert TOPICS.devices("hello") == "testbed/r1/device/+/hello"


def test_unknown_device_kind_is_refused():
    with pytest.raises(ValueError, match="gossip"):
        TOPICS.device("d1", "gossip")


def test_update_key():
    assert update_key(3) == "3"
    assert update_key(3, 1) == "3-from-1"
    assert update_key(3, 0) == "3-from-0"


def test_parse_broadcast_chunk():
    assert TOPICS.parse_update_chunk("testbed/r1/update/3/7") == ("3", 7)


def test_parse_per_device_chunk():
    assert TOPICS.parse_update_chunk("testbed/r1/device/d1/update/3-from-1/0") == ("3-from-1", 0)


@pytest.mark.parametrize(
    "topic",
    [
        "testbed/r2/update/3/7",  # another run
        "testbed/r1/update/3",  # no index
        "testbed/r1/update/3/x",
        "testbed/r1/update/3/-1",
        "testbed/r1/update/3/\u00b2",  # superscript two: isdigit() but not an index
        "testbed/r1/update/3/7/8",
        "testbed/r1/update//7",  # empty key
        "testbed/r1/manifest",
        "testbed/r1/device/d1/report",
        "testbed/r1/device/d1/other/3/0",
        "testbed/r1/device/d1/update/3",
        "testbed/r1/",
        "",
        "testbed/r1update/3/7",
    ],
)
def test_non_chunk_topics_are_none(topic):
    assert TOPICS.parse_update_chunk(topic) is None


@given(st.text(max_size=60))
def test_parse_update_chunk_never_raises(topic):
    for candidate in (topic, TOPICS.prefix + topic, TOPICS.prefix + "update/" + topic):
        parsed = TOPICS.parse_update_chunk(candidate)
        if parsed is not None:
            key, index = parsed
            assert key and index >= 0


@given(st.from_regex(r"[A-Za-z0-9-]{1,12}", fullmatch=True), st.integers(min_value=0, max_value=10**6),
       st.from_regex(r"[A-Za-z0-9_.-]{1,12}", fullmatch=True))
def test_chunk_topics_round_trip(key, index, device_id):
    assert TOPICS.parse_update_chunk(TOPICS.update_chunk(key, index)) == (key, index)
    assert TOPICS.parse_update_chunk(TOPICS.device_update_chunk(device_id, key, index)) == (key, index)


@pytest.mark.parametrize("kind", DEVICE_MESSAGE_KINDS)
def test_parse_device_topic(kind):
    assert TOPICS.parse_device_topic(TOPICS.device("rpi4-0", kind)) == ("rpi4-0", kind)


@pytest.mark.parametrize(
    "topic",
    ["testbed/r1/device/d1/gossip", "testbed/r1/device/d1", "testbed/r1/device//report",
     "testbed/r1/device/d1/update/3/0", "testbed/r2/device/d1/report", "testbed/r1/manifest"],
)
def test_non_device_topics_are_none(topic):
    assert TOPICS.parse_device_topic(topic) is None


def _paho_publish_packet(topic: str, payload: bytes, qos: int) -> bytes:
    """The bytes paho-mqtt (MQTT 3.1.1) would write for one PUBLISH, captured before the socket."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    captured: list[bytes] = []

    def capture(command, packet, mid, qos, info=None):  # noqa: ANN001, ARG001
        captured.append(bytes(packet))
        return paho.MQTT_ERR_SUCCESS

    client._sock = object()  # _send_publish only checks that a socket is there
    client._packet_queue = capture
    try:
        client._send_publish(1, topic.encode("utf-8"), payload, qos=qos)
    finally:
        client._sock = None
    assert len(captured) == 1
    return captured[0]


def _hand_encoded_publish(topic: str, payload: bytes, qos: int) -> bytes:
    """MQTT 3.1.1 section 3.3: fixed header, remaining-length varint, topic (u16 + UTF-8), packet id, payload."""
    topic_bytes = topic.encode("utf-8")
    body = struct.pack("!H", len(topic_bytes)) + topic_bytes + (struct.pack("!H", 1) if qos else b"") + payload
    remaining, varint = len(body), bytearray()
    while True:
        digit, remaining = remaining % 128, remaining // 128
        varint.append(digit | (0x80 if remaining else 0))
        if not remaining:
            break
    return bytes([0x30 | (qos << 1)]) + bytes(varint) + body


def _payload_sizes_around_boundaries(topic: str, qos: int) -> list[int]:
    overhead = 2 + len(topic.encode("utf-8")) + (2 if qos else 0)
    sizes = {0, 1, 1024}
    for boundary in (128, 128**2, 128**3):
        for remaining in (boundary - 1, boundary, boundary + 1):
            if remaining - overhead >= 0:
                sizes.add(remaining - overhead)
    return sorted(sizes)


@pytest.mark.parametrize("qos", [0, 1])
@pytest.mark.parametrize("topic", ["testbed/r1/update/3/7", "t", "testbed/r\u00e9/device/\u00fc/update/3-from-1/12"])
def test_publish_wire_bytes_match_paho_and_the_spec(topic, qos):
    for size in _payload_sizes_around_boundaries(topic, qos):
        payload = b"\xab" * size
        expected = len(_paho_publish_packet(topic, payload, qos))
        assert len(_hand_encoded_publish(topic, payload, qos)) == expected
        assert mqtt_publish_wire_bytes(topic, size, qos) == expected, (topic, size, qos)


@pytest.mark.parametrize(("remaining", "header_bytes"), [(127, 2), (128, 3), (16383, 3), (16384, 4),
                                                         (2097151, 4), (2097152, 5)])
def test_remaining_length_varint_boundaries(remaining, header_bytes):
    topic = "t"  # 2 + 1 bytes of topic in the remaining length
    assert mqtt_publish_wire_bytes(topic, remaining - 3, qos=0) == remaining + header_bytes
    assert mqtt_publish_wire_bytes(topic, remaining - 5, qos=1) == remaining + header_bytes
