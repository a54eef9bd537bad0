"""Typed device and run messages: every message round-trips; every bad payload is one MessageError naming the field."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.core.errors import TestbedError
from testbed.core.messages import (
    MAX_CONFIG_MESSAGE_BYTES,
    MAX_DEVICE_MESSAGE_BYTES,
    BoardConfig,
    DeviceHello,
    DeviceNack,
    DeviceReport,
    DeviceStatus,
    Message,
    MessageError,
    ReportRequest,
    RunConfig,
    RunFinished,
    decode_config_topic,
    decode_device_message,
)

names = st.text(min_size=1, max_size=40)
counts = st.integers(min_value=0, max_value=2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
phases = st.dictionaries(st.sampled_from(["receive", "transmit", "compute", "idle"]), floats)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53), max_value=2**53) | floats | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)

hellos = st.builds(DeviceHello, device=names, profile=names, version=counts, kind=st.sampled_from(["emulated", "serial"]),
                   port=st.none() | names, board=st.none() | names, capabilities=st.none() | st.lists(names, max_size=3))
statuses = st.builds(DeviceStatus, online=st.booleans())
reports = st.builds(
    DeviceReport, device=names, profile=names, version=counts, weights_hash=st.text("0123456789abcdef", min_size=64,
                                                                                    max_size=64),
    accuracy=floats, update_bytes=counts, received_bytes=counts, transmitted_bytes=counts, total_received_bytes=counts,
    delivery_seconds=floats, apply_seconds=floats, evaluate_seconds=floats, energy_joules=floats,
    energy_joules_by_phase=phases, phase_seconds=phases, total_energy_joules=floats, rejected_updates=counts,
    round=st.none() | counts, kind=st.none() | st.just("serial"), published_at=st.none() | floats,
    report_delay_seconds=st.none() | floats, serial_frames_lost=st.none() | counts,
    measured_energy=st.none() | st.dictionaries(st.text(max_size=10), json_values, max_size=3),
)
nacks = st.builds(DeviceNack, device=names, version=counts, reason=st.text(max_size=200), session=st.none() | counts,
                  repair=st.none() | counts)
report_requests = st.builds(ReportRequest, round=counts, version=counts)
run_configs = st.builds(RunConfig, run=names, started_at=floats, init_seed=counts,
                        scenario=st.dictionaries(st.text(max_size=10), json_values, max_size=4),
                        devices=st.dictionaries(names, counts, max_size=5))
board_configs = st.builds(BoardConfig, run=names, device=names, device_index=counts, init_seed=counts,
                          scenario=st.dictionaries(st.text(max_size=10), json_values, max_size=4))


@given(st.one_of(hellos, statuses, reports, nacks, report_requests, run_configs, board_configs,
                 st.just(RunFinished())))
def test_every_message_round_trips(message: Message) -> None:
    payload = message.encode()
    assert type(message).decode(payload) == message
    assert type(message).decode(payload).schema_version == 1


@given(st.one_of(hellos, statuses, reports, nacks))
def test_device_messages_decode_by_topic_kind(message: Message) -> None:
    kind = {DeviceHello: "hello", DeviceStatus: "status", DeviceReport: "report", DeviceNack: "nack"}[type(message)]
    assert decode_device_message(kind, message.encode()) == message


@given(run_configs)
def test_config_topic_holds_a_config_an_end_or_nothing(config: RunConfig) -> None:
    assert decode_config_topic(config.encode()) == config
    assert decode_config_topic(RunFinished().encode()) == RunFinished()
    assert decode_config_topic(b'{"finished": true}') == RunFinished()  # as runs before schema_version sent it
    assert decode_config_topic(b"") is None


@given(st.binary(max_size=200))
def test_arbitrary_bytes_decode_or_raise_message_error(payload: bytes) -> None:
    for message_type in (DeviceHello, DeviceStatus, DeviceReport, DeviceNack, ReportRequest, RunConfig, BoardConfig):
        try:
            message_type.decode(payload)
        except MessageError:
            pass


def test_wire_field_names_are_the_ones_used_before_typed_messages() -> None:
    hello = DeviceHello(device="dev-a", profile="rpi4", version=3, kind="emulated")
    assert hello.encode() == b'{"device": "dev-a", "profile": "rpi4", "version": 3, "kind": "emulated"}'
    assert DeviceStatus(online=False).encode() == b'{"online": false}'
    assert DeviceNack(device="d", version=2, reason="bad hash").encode() == \
        b'{"device": "d", "version": 2, "reason": "bad hash"}'
    assert RunFinished().encode() == b'{"finished": true}'
    report = _report_dict()
    assert DeviceReport.decode(json.dumps(report).encode()).encode() == json.dumps(report).encode()  # same bytes


def test_version_1_is_implicit_on_the_wire_and_may_be_stated() -> None:
    assert DeviceStatus.decode(b'{"online": true}') == DeviceStatus(online=True)
    assert DeviceStatus.decode(b'{"schema_version": 1, "online": true}') == DeviceStatus(online=True)
    nack = DeviceNack.decode(b'{"device": "d", "version": 1, "reason": "r"}')
    assert nack.schema_version == 1


def test_a_serial_board_report_decodes() -> None:
    report = _report_dict(kind="serial", published_at=1.5, report_delay_seconds=0.1, serial_frames_lost=0,
                          measured_energy={"meter": "model", "sample_count": 3})
    decoded = DeviceReport.decode(json.dumps(report).encode())
    assert decoded.kind_of_device == "serial" and decoded.measured_energy == {"meter": "model", "sample_count": 3}
    assert decoded.to_dict() == report


def test_delivery_seconds_defaults_to_zero_for_a_board_that_leaves_it_to_the_bridge() -> None:
    report = _report_dict()
    del report["delivery_seconds"]
    assert DeviceReport.decode(json.dumps(report).encode()).delivery_seconds == 0.0


def test_run_config_gives_each_board_its_config() -> None:
    key = "ed25519:" + "A" * 43 + "="
    config = RunConfig(run="r1", started_at=1.0, init_seed=7, public_key=key, scenario={"name": "x"},
                       devices={"a": 0, "b": 1})
    assert config.board_config("b") == BoardConfig(run="r1", device="b", device_index=1, init_seed=7,
                                                   public_key=key, scenario={"name": "x"})
    with pytest.raises(MessageError, match="run r1 has no device 'c'"):
        config.board_config("c")


@pytest.mark.parametrize(("message_type", "payload", "expected"), [
    (DeviceStatus, b"", "not UTF-8 JSON"),
    (DeviceStatus, b"\xff\xfe", "not UTF-8 JSON"),
    (DeviceStatus, b"{", "not UTF-8 JSON"),
    (DeviceStatus, b"[true]", "must be a JSON object, got list"),
    (DeviceStatus, b'{"online": "yes"}', "online: Input should be a valid boolean, got 'yes'"),
    (DeviceStatus, b'{"online": 1}', "online: Input should be a valid boolean, got 1"),
    (DeviceStatus, b'{}', "online: missing"),
    (DeviceStatus, b'{"online": true, "extra": 1}', "extra: unknown field"),
    (DeviceStatus, b'{"schema_version": 2, "online": true}', "schema_version 2; this testbed reads version 1"),
    (DeviceStatus, b'{"schema_version": true, "online": true}', "schema_version True"),
    (DeviceNack, b'{"device": "d", "version": true, "reason": "r"}', "version: Input should be a valid integer"),
    (DeviceNack, b'{"device": "d", "version": -1, "reason": "r"}', "version: Input should be greater than or equal to 0"),
    (DeviceNack, b'{"device": "d", "version": "3", "reason": "r"}', "version: Input should be a valid integer, got '3'"),
    (DeviceNack, b'{"device": "", "version": 0, "reason": "r"}', "device: String should have at least 1 character"),
    (DeviceNack, b'{"device": "d", "version": 0}', "reason: missing"),
    (DeviceHello, b'{"device": "d", "profile": "p", "version": 0}', "kind: missing"),
    (RunConfig, b'{"run": "r", "started_at": 1.0, "init_seed": 1, "scenario": {}, "devices": {"a": -1}}',
     "devices.a: Input should be greater than or equal to 0"),
    (RunConfig, b'{"run": "r", "started_at": 1.0, "init_seed": 1, "scenario": [], "devices": {}}',
     "scenario: Input should be a valid dictionary"),
])
def test_bad_payloads_raise_message_error_naming_the_problem(message_type: type[Message], payload: bytes,
                                                               expected: str) -> None:
    with pytest.raises(MessageError, match=_escaped(expected)) as caught:
        message_type.decode(payload)
    assert isinstance(caught.value, TestbedError)


def test_a_report_missing_a_field_names_it() -> None:
    report = _report_dict()
    del report["weights_hash"]
    with pytest.raises(MessageError, match="invalid report message: weights_hash: missing"):
        DeviceReport.decode(json.dumps(report).encode())


def test_oversized_payloads_are_refused_before_parsing() -> None:
    with pytest.raises(MessageError, match=f"exceeds the {MAX_DEVICE_MESSAGE_BYTES}-byte limit"):
        DeviceNack.decode(b" " * (MAX_DEVICE_MESSAGE_BYTES + 1))
    with pytest.raises(MessageError, match=f"exceeds the {MAX_CONFIG_MESSAGE_BYTES}-byte limit"):
        RunConfig.decode(b" " * (MAX_CONFIG_MESSAGE_BYTES + 1))
    with pytest.raises(MessageError, match="exceeds"):
        DeviceHello(device="d", profile="p", version=0, kind="emulated",
                    capabilities=["x" * 1000] * (MAX_DEVICE_MESSAGE_BYTES // 1000 + 1)).encode()


def test_deeply_nested_json_is_a_message_error() -> None:
    with pytest.raises(MessageError):
        RunConfig.decode(b"[" * 100_000 + b"]" * 100_000)


def test_messages_are_immutable() -> None:
    status = DeviceStatus(online=True)
    with pytest.raises(Exception):
        status.online = False  # type: ignore[misc]


def test_unknown_device_topic_kind() -> None:
    with pytest.raises(MessageError, match="no JSON message is sent on device topic kind 'manifest'"):
        decode_device_message("manifest", b"{}")


def _report_dict(**extra: Any) -> dict[str, Any]:
    return {
        "device": "dev-a", "profile": "rpi4", "round": 1, "version": 2, "weights_hash": "ab" * 32, "accuracy": 0.8,
        "update_bytes": 100, "received_bytes": 120, "transmitted_bytes": 30, "total_received_bytes": 500,
        "delivery_seconds": 1.25, "apply_seconds": 0.01, "evaluate_seconds": 0.02, "energy_joules": 3.5,
        "energy_joules_by_phase": {"receive": 1.0, "transmit": 0.5, "compute": 1.0, "idle": 1.0},
        "phase_seconds": {"receive": 1.0, "transmit": 0.5, "compute": 1.0, "idle": 1.0},
        "total_energy_joules": 7.0, "rejected_updates": 0, **extra,
    }


def _escaped(text: str) -> str:
    import re

    return re.escape(text)
