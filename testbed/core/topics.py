"""MQTT topic names of a run: the one place they are spelled out."""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_MESSAGE_KINDS = ("hello", "status", "report", "nack", "manifest")
MAX_CHUNK_INDEX_DIGITS = 9
MAX_UPDATE_KEY_CHARS = 32
MAX_TOPIC_CHARS = 1024


@dataclass(frozen=True)
class Topics:
    """Topics under `testbed/<run>/` for manifests, update chunks and per-device messages."""

    run_id: str

    @property
    def prefix(self) -> str:
        return f"testbed/{self.run_id}/"

    @property
    def manifest(self) -> str:
        """Retained: the latest update every device should hold."""
        return self.prefix + "manifest"

    @property
    def config(self) -> str:
        """Retained: the run's scenario and device list, for boards attached from outside the run."""
        return self.prefix + "config"

    @property
    def report_request(self) -> str:
        """The run asks devices to send their latest report again (testbed.core.messages.ReportRequest)."""
        return self.prefix + "report-request"

    def update_chunk(self, update_key: str, chunk_index: int) -> str:
        """One chunk of an encoded update; `update_key` is the target version, or `<target>-from-<base>`."""
        return f"{self.prefix}update/{update_key}/{chunk_index}"

    @property
    def update_chunks(self) -> str:
        """Wildcard matching every update chunk."""
        return self.prefix + "update/+/+"

    def device_update_chunk(self, device_id: str, update_key: str, chunk_index: int) -> str:
        """One chunk of a catch-up update meant for one device only."""
        return f"{self.prefix}device/{device_id}/update/{update_key}/{chunk_index}"

    def device_update_chunks(self, device_id: str) -> str:
        """Wildcard matching the catch-up chunks of one device."""
        return f"{self.prefix}device/{device_id}/update/+/+"

    def device(self, device_id: str, kind: str) -> str:
        """A device's own topic of one kind (hello, status, report, nack, manifest)."""
        if kind not in DEVICE_MESSAGE_KINDS:
            raise ValueError(f"unknown device message kind {kind!r}")
        return f"{self.prefix}device/{device_id}/{kind}"

    def device_subscriptions(self, device_id: str) -> tuple[str, ...]:
        """What a device subscribes to: the broadcast manifest and chunks, its own catch-ups, and report requests."""
        return (self.manifest, self.device(device_id, "manifest"), self.update_chunks,
                self.device_update_chunks(device_id), self.report_request)

    def devices(self, kind: str) -> str:
        """Wildcard matching one kind of message from every device."""
        return self.device("+", kind)

    def parse_update_chunk(self, topic: str) -> tuple[str, int] | None:
        """(update key, chunk index) of a broadcast or per-device chunk topic, or None if it is not one.

        Bounded: a topic longer than MAX_TOPIC_CHARS, a key longer than MAX_UPDATE_KEY_CHARS or an index of
        more than MAX_CHUNK_INDEX_DIGITS digits is not a chunk topic.
        """
        if len(topic) > MAX_TOPIC_CHARS or not topic.startswith(self.prefix):
            return None
        parts = topic[len(self.prefix):].split("/", 5)
        if len(parts) == 5 and parts[0] == "device" and parts[2] == "update":
            parts = parts[2:]
        if (len(parts) != 3 or parts[0] != "update" or not 0 < len(parts[1]) <= MAX_UPDATE_KEY_CHARS
                or not 0 < len(parts[2]) <= MAX_CHUNK_INDEX_DIGITS or not _is_ascii_digits(parts[2])):
            return None
        return parts[1], int(parts[2])

    def parse_device_topic(self, topic: str) -> tuple[str, str] | None:
        """(device id, kind) of a device topic, or None."""
        if len(topic) > MAX_TOPIC_CHARS or not topic.startswith(self.prefix + "device/"):
            return None
        parts = topic[len(self.prefix + "device/"):].split("/", 2)
        if len(parts) != 2 or not parts[0] or parts[1] not in DEVICE_MESSAGE_KINDS:
            return None
        return parts[0], parts[1]


def _is_ascii_digits(text: str) -> bool:
    # str.isdigit() also accepts superscripts and other scripts' digits, which int() rejects or misreads.
    return text.isascii() and text.isdigit()


def update_key(target_version: int, base_version: int | None = None) -> str:
    """The topic key of an update: the version alone for the broadcast, `T-from-B` for a catch-up."""
    return str(target_version) if base_version is None else f"{target_version}-from-{base_version}"


def mqtt_publish_wire_bytes(topic: str, payload_bytes: int, qos: int) -> int:
    """Bytes of an MQTT 3.1.1 PUBLISH packet on the wire (fixed header, topic, packet id, payload)."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + payload_bytes
    length_bytes = 1
    while remaining >= 128 ** length_bytes and length_bytes < 4:
        length_bytes += 1
    return 1 + length_bytes + remaining
