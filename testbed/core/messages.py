"""Typed JSON messages between devices and the run (hello, status, report, nack, run config), each with one encode/decode.

Every message is a frozen pydantic model in strict mode: ``encode()`` gives the JSON bytes sent over MQTT (or
serial), ``decode(payload)`` is the only way back and raises `MessageError` with the field path and the offending
value for anything that is not exactly the message (wrong type, unknown field, too large, wrong schema version).
The JSON field names and order are the ones the testbed has always used on the wire. Each message has a
``schema_version``; version 1 is that wire format as it was before the field existed, so a version-1 message
leaves it out (the payload, and the uplink bytes and airtime a device is charged for, stay as they were) and a
payload without it reads as version 1. A later version states itself, and a reader of another version refuses it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from testbed.core.errors import TestbedError
from testbed.core.manifest import RejectReason

MESSAGE_SCHEMA_VERSION = 1
MAX_DEVICE_MESSAGE_BYTES = 64 * 1024
"""Upper bound of a hello, status, report or nack payload (a report with measured energy is about 2 KiB)."""
MAX_CONFIG_MESSAGE_BYTES = 1024 * 1024
"""Upper bound of a run or board config payload (it carries the resolved scenario, outages and all)."""

Name = Annotated[str, Field(min_length=1, max_length=256)]
"""A device or profile name."""
Count = Annotated[int, Field(ge=0)]
"""A version, a byte count, a seed: a non-negative integer (never a bool)."""
RejectReasonName = Literal[tuple(reason.value for reason in RejectReason)]  # type: ignore[valid-type]
"""A RejectReason's value: the only keys a rejection count may have (they become metric labels)."""
PublicKeyText = Annotated[str, Field(min_length=1, max_length=128)]
"""The run's update-signing public key, `ed25519:<base64>` (testbed.core.signing.TrustedKey)."""

MessageT = TypeVar("MessageT", bound="Message")


class MessageError(TestbedError):
    """A payload that is not a valid message of the expected kind (bad JSON, wrong field, too large, other schema)."""


class Message(BaseModel):
    """Base of the typed messages: strict fields, no unknown keys, immutable, one encode and one decode."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, validate_by_name=True, validate_by_alias=True)

    message_name: ClassVar[str] = "message"
    max_bytes: ClassVar[int] = MAX_DEVICE_MESSAGE_BYTES

    schema_version: int = MESSAGE_SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this message; optional fields left unset (None) and the implicit version 1 are omitted."""
        return {name: value for name, value in self.model_dump(mode="python", by_alias=True).items()
                if value is not None and not (name == "schema_version" and value == 1)}

    def encode(self) -> bytes:
        """UTF-8 JSON, as published."""
        payload = json.dumps(self.to_dict()).encode("utf-8")
        if len(payload) > self.max_bytes:
            raise MessageError(f"{self.message_name} message of {len(payload)} bytes exceeds the {self.max_bytes}-byte limit")
        return payload

    @classmethod
    def decode(cls: type[MessageT], payload: bytes | bytearray | memoryview) -> MessageT:
        """The message in `payload`, or MessageError saying what is wrong with it."""
        data = bytes(payload)
        if len(data) > cls.max_bytes:
            raise MessageError(f"{cls.message_name} message of {len(data)} bytes exceeds the {cls.max_bytes}-byte limit")
        try:
            parsed = json.loads(data)
        except (ValueError, RecursionError) as error:  # ValueError covers JSONDecodeError and UnicodeDecodeError
            raise MessageError(f"{cls.message_name} message is not UTF-8 JSON: {error}") from None
        return cls.from_dict(parsed)

    @classmethod
    def from_dict(cls: type[MessageT], data: object) -> MessageT:
        """The message in an already parsed JSON value (e.g. a frame payload), or MessageError."""
        if not isinstance(data, dict):
            raise MessageError(f"{cls.message_name} message must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version", MESSAGE_SCHEMA_VERSION)
        if type(version) is not int or version != MESSAGE_SCHEMA_VERSION:
            raise MessageError(f"{cls.message_name} message has schema_version {version!r:.40}; this testbed reads "
                               f"version {MESSAGE_SCHEMA_VERSION} (update the sender or the testbed to match)")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise MessageError(f"invalid {cls.message_name} message: {_describe(error)}") from None


def _describe(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        path = ".".join(str(part) for part in item["loc"]) or "(message)"
        if item["type"] == "missing":
            problems.append(f"{path}: missing")
        elif item["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown field")
        else:
            problems.append(f"{path}: {item['msg']}, got {item['input']!r:.80}")
    return "; ".join(problems)


# --- device → run (topics testbed/<run>/device/<id>/<kind>) -----------------------------------------------------

class DeviceHello(Message):
    """Sent once per connection: who the device is and the model version it holds."""

    message_name: ClassVar[str] = "hello"

    device: Name
    profile: Name
    version: Count
    kind_of_device: str = Field(alias="kind", min_length=1, max_length=64)
    """"emulated" (in-process agent), "serial" (a board behind the serial bridge), ..."""
    port: str | None = None
    board: str | None = None
    capabilities: list[str] | None = None



class DeviceStatus(Message):
    """Retained: whether the device is online (its MQTT will publishes ``online: false``)."""

    message_name: ClassVar[str] = "status"

    online: bool


class DeviceReport(Message):
    """After applying an update: the model version held, its accuracy, and what the round cost in bytes and energy."""

    message_name: ClassVar[str] = "report"

    device: Name
    profile: Name
    round: int | None = Field(default=None, ge=0)
    version: Count
    weights_hash: str = Field(min_length=1, max_length=128)
    accuracy: float
    update_bytes: Count
    received_bytes: Count
    transmitted_bytes: Count
    total_received_bytes: Count
    delivery_seconds: float = 0.0
    """Publish to delivery; the serial bridge fills it on the host's clock, so a board may leave it out."""
    apply_seconds: float
    evaluate_seconds: float
    energy_joules: float
    energy_joules_by_phase: dict[str, float]
    phase_seconds: dict[str, float]
    total_energy_joules: float
    rejected_updates: Count
    rejected_by_reason: dict[RejectReasonName, Count] | None = None
    """Refusals since the device started, by reason (testbed.core.manifest.RejectReason)."""
    kind_of_device: str | None = Field(default=None, alias="kind", max_length=64)
    published_at: float | None = None
    report_delay_seconds: float | None = None
    serial_frames_lost: int | None = Field(default=None, ge=0)
    measured_energy: dict[str, Any] | None = None
    """What a board measured and how (meter, sampling), next to the modelled phase split."""



class DeviceNack(Message):
    """A rejected update (or lost transfers): the version the device still holds, so the run can serve a catch-up."""

    message_name: ClassVar[str] = "nack"

    device: Name
    version: Count
    reason: str = Field(max_length=1024)
    session: Count | None = None
    """Which of the device's connections sent it: one catch-up per version and connection is enough."""
    repair: Count | None = None
    """How many repairs the device has asked for (damaged transfers, devices.chunk_repair), when any: a nack with a
    higher count than the one a catch-up answered asks again (that catch-up came damaged too); omitted when 0."""


DEVICE_MESSAGE_TYPES: dict[str, type[Message]] = {
    "hello": DeviceHello, "status": DeviceStatus, "report": DeviceReport, "nack": DeviceNack,
}
"""The message type of each device topic kind that carries JSON (the per-device manifest is an UpdateManifest)."""


def decode_device_message(kind: str, payload: bytes | bytearray | memoryview) -> Message:
    """The typed message on a device topic of `kind` (hello, status, report, nack); MessageError otherwise."""
    message_type = DEVICE_MESSAGE_TYPES.get(kind)
    if message_type is None:
        raise MessageError(f"no JSON message is sent on device topic kind {kind!r:.40}")
    return message_type.decode(payload)


# --- run → devices (topic testbed/<run>/config, and the serial config frame) --------------------------------------

class RunConfig(Message):
    """Retained on ``testbed/<run>/config``: how `testbed attach` learns the run's scenario and device numbers."""

    message_name: ClassVar[str] = "run config"
    max_bytes: ClassVar[int] = MAX_CONFIG_MESSAGE_BYTES

    run: str = Field(min_length=1, max_length=512)
    started_at: float
    init_seed: Count
    public_key: PublicKeyText
    """The key the run signs its updates with; a board pinned to another key (`testbed board --trust`) refuses the run."""
    scenario: dict[str, Any]
    """The resolved scenario, as the run wrote it to scenario.yaml (JSON mode, by alias, without nulls)."""
    devices: dict[Name, Count]
    """Device name → device number (its index in the scenario: picks its test split and link seed)."""

    def board_config(self, device: str) -> BoardConfig:
        """What the board taking part as `device` needs; MessageError if the run has no such device."""
        if device not in self.devices:
            raise MessageError(f"run {self.run} has no device {device!r}; it has {sorted(self.devices)}")
        return BoardConfig(run=self.run, device=device, device_index=self.devices[device], init_seed=self.init_seed,
                           public_key=self.public_key, scenario=self.scenario)


class RunFinished(Message):
    """Published (not retained) on ``testbed/<run>/config`` as the run ends, before the retained config is cleared."""

    message_name: ClassVar[str] = "run finished"

    finished: Literal[True] = True


class ReportRequest(Message):
    """Published on ``testbed/<run>/report-request`` after the run's own session came back (a broker restart): a
    device whose latest report is of `version` sends it again, as the run may have missed it while away."""

    message_name: ClassVar[str] = "report request"

    round: Count
    version: Count


def decode_config_topic(payload: bytes | bytearray | memoryview) -> RunConfig | RunFinished | None:
    """What is on the config topic: the run's config, its end, or None for the empty payload that clears it."""
    data = bytes(payload)
    if not data:
        return None
    if len(data) <= MAX_DEVICE_MESSAGE_BYTES:
        try:
            return RunFinished.decode(data)
        except MessageError:
            pass
    return RunConfig.decode(data)


class BoardConfig(Message):
    """Sent to a board over serial: its run, its name and number in the run, and the scenario (one device's RunConfig)."""

    message_name: ClassVar[str] = "board config"
    max_bytes: ClassVar[int] = MAX_CONFIG_MESSAGE_BYTES

    run: str = Field(min_length=1, max_length=512)
    device: Name
    device_index: Count
    init_seed: Count
    public_key: PublicKeyText
    scenario: dict[str, Any]
