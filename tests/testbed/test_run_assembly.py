"""Ending a run: the retained run config is cleared even when the run's own client lost its connection."""

from __future__ import annotations

import asyncio

from testbed.core.mqtt import MqttEndpoint
from testbed.run_assembly import _end_run_config


async def _retained(endpoint: MqttEndpoint, topic: str, identifier: str) -> bytes | None:
    """The retained payload on `topic`, or None when there is none (a broker sends retained messages on subscribe)."""
    async with endpoint.client(identifier) as reader:
        await reader.subscribe(topic, qos=1)
        try:
            message = await asyncio.wait_for(anext(aiter(reader.messages)), 1.0)
        except asyncio.TimeoutError:
            return None
        return bytes(message.payload)


async def test_a_disconnected_control_client_still_clears_the_retained_config(mosquitto) -> None:
    endpoint = MqttEndpoint(*mosquitto)
    topic = "testbed/assembly-test/config"
    async with endpoint.client("assembly-test-writer") as writer:
        await writer.publish(topic, b'{"run": "assembly-test"}', qos=1, retain=True)
    assert await _retained(endpoint, topic, "assembly-test-reader-1") == b'{"run": "assembly-test"}'
    never_connected = endpoint.client("assembly-test-lost")  # as a client whose connection is gone
    await asyncio.wait_for(_end_run_config(never_connected, endpoint, "assembly-test", topic, 0.0), 30.0)
    assert await _retained(endpoint, topic, "assembly-test-reader-2") is None


async def test_an_unreachable_broker_ends_the_goodbye_in_bounded_time(caplog) -> None:
    endpoint = MqttEndpoint("127.0.0.1", 1)  # nothing listens on port 1
    lost = endpoint.client("assembly-test-unreachable")
    await asyncio.wait_for(_end_run_config(lost, endpoint, "assembly-test", "testbed/x/config", 0.0), 30.0)
    assert "could not clear the retained testbed/x/config" in caplog.text


def test_a_dead_workers_reason_is_the_last_line_of_its_log(tmp_path) -> None:
    from testbed.run_assembly import last_line

    log = tmp_path / "worker-0.log"
    log.write_bytes(b"starting\n" + b"x" * 10_000 + b"\nOSError: [Errno 24] Too many open files\n\n")
    assert last_line(log) == "OSError: [Errno 24] Too many open files"
    assert last_line(tmp_path / "missing.log") == ""
    log.write_bytes(b"")
    assert last_line(log) == ""


async def test_a_fleet_whose_members_end_alike_logs_the_error_once(caplog) -> None:
    import asyncio
    import logging

    from devices.fleet import EmulatedFleet

    class DoomedMember:
        def __init__(self, device_id: str) -> None:
            self.device_id = device_id
            self.connected = asyncio.Event()

        async def run(self) -> None:
            raise RuntimeError("fleet worker 0 exited with code 1")

    caplog.set_level(logging.ERROR, logger="devices.fleet")
    async with EmulatedFleet([DoomedMember(f"rpi4-{index}") for index in range(50)]):  # type: ignore[list-item]
        await asyncio.sleep(0.05)
    lines = [record.getMessage() for record in caplog.records if record.name == "devices.fleet"]
    assert lines == ["device rpi4-0 and 49 more ended with RuntimeError('fleet worker 0 exited with code 1')"]
