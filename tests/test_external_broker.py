"""Runs against an external Mosquitto broker: password auth, TLS through the link proxies, and clear failures."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.core.mqtt import BrokerConnectionError, MqttEndpoint
from testbed.runner import RunError, ScenarioRun
from testbed.core.scenario import Scenario, parse_scenario

from .conftest import TlsFiles, free_port

# A failing connect must be reported well before the 30 s MQTT timeout would expire.
FAST_FAILURE_S = 15.0

pytestmark = pytest.mark.timeout(60)


def small_scenario(broker: dict[str, Any]) -> Scenario:
    return parse_scenario({
        "name": "external-broker", "seed": 3, "rounds": 2, "round_timeout": "15s",
        "data": {"initial_samples": 200, "new_samples_per_round": 60},
        "update": {"epochs": 2}, "model": {"hidden": [16]},
        "devices": [{"profile": "rpi4", "count": 2}],
        "broker": broker,
        "metrics": {"enabled": False},
    })


async def run_to_completion(scenario: Scenario, out_dir: Path) -> None:
    result = await ScenarioRun(scenario, out_dir).execute()
    devices = result.summary["devices"]
    assert len(devices) == 2
    for device_id, state in devices.items():
        assert state["final_version"] == result.summary["server"]["final_version"], device_id
        assert state["hash_matches_server"], device_id


async def run_expecting_failure(scenario: Scenario, out_dir: Path) -> str:
    """Run a scenario that must fail fast with a RunError; returns its message. Nothing may keep running."""
    started = time.monotonic()
    with pytest.raises(RunError) as failure:
        await ScenarioRun(scenario, out_dir).execute()
    elapsed = time.monotonic() - started
    assert elapsed < FAST_FAILURE_S, f"failure took {elapsed:.1f} s"
    leftover = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    assert leftover == []
    message = str(failure.value)
    assert scenario.broker.url in message
    return message


def password_broker(start_mosquitto: Any, folder: Path) -> int:
    password_file = folder / "passwords"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(password_file), "u", "p"], check=True,
                   capture_output=True, timeout=30)
    password_file.chmod(0o600)
    return int(start_mosquitto(f"allow_anonymous false\npassword_file {password_file}\n"))


def tls_broker(start_mosquitto: Any, tls_files: TlsFiles, other_name: bool = False) -> int:
    cert_file = tls_files.other_name_cert_file if other_name else tls_files.server_cert_file
    key_file = tls_files.other_name_key_file if other_name else tls_files.server_key_file
    return int(start_mosquitto(
        f"allow_anonymous true\ncafile {tls_files.ca_file}\ncertfile {cert_file}\nkeyfile {key_file}\n"
    ))


async def test_username_and_password(start_mosquitto: Any, tmp_path: Path) -> None:
    port = password_broker(start_mosquitto, tmp_path)
    scenario = small_scenario({"url": f"mqtt://127.0.0.1:{port}", "username": "u", "password": "p"})
    await run_to_completion(scenario, tmp_path / "out")


async def test_wrong_password_fails_fast_and_clearly(start_mosquitto: Any, tmp_path: Path) -> None:
    port = password_broker(start_mosquitto, tmp_path)
    scenario = small_scenario({"url": f"mqtt://127.0.0.1:{port}", "username": "u", "password": "wrong"})
    message = await run_expecting_failure(scenario, tmp_path / "out")
    assert "not authorised" in message.lower() or "not authorized" in message.lower()


async def test_tls_end_to_end_through_the_link_proxies(start_mosquitto: Any, tls_files: TlsFiles,
                                                       tmp_path: Path) -> None:
    port = tls_broker(start_mosquitto, tls_files)
    scenario = small_scenario({"url": f"mqtts://127.0.0.1:{port}", "tls": {"ca_file": str(tls_files.ca_file)}})
    await run_to_completion(scenario, tmp_path / "out")


async def test_tls_from_the_tls_section_with_a_mqtt_url(start_mosquitto: Any, tls_files: TlsFiles,
                                                       tmp_path: Path) -> None:
    port = tls_broker(start_mosquitto, tls_files)
    scenario = small_scenario({"url": f"mqtt://localhost:{port}", "tls": {"ca_file": str(tls_files.ca_file)}})
    await run_to_completion(scenario, tmp_path / "out")


async def test_tls_with_the_wrong_ca_fails_fast_and_clearly(start_mosquitto: Any, tls_files: TlsFiles,
                                                          tmp_path: Path) -> None:
    port = tls_broker(start_mosquitto, tls_files)
    scenario = small_scenario({"url": f"mqtts://127.0.0.1:{port}", "tls": {"ca_file": str(tls_files.other_ca_file)}})
    message = await run_expecting_failure(scenario, tmp_path / "out")
    assert "certificate verify failed" in message


async def test_host_name_is_checked_directly_but_not_through_a_proxy(start_mosquitto: Any, tls_files: TlsFiles,
                                                                    tmp_path: Path) -> None:
    """The certificate names only broker.invalid: the run's direct connection refuses it, `via()` accepts it."""
    port = tls_broker(start_mosquitto, tls_files, other_name=True)
    scenario = small_scenario({"url": f"mqtts://127.0.0.1:{port}", "tls": {"ca_file": str(tls_files.ca_file)}})
    message = await run_expecting_failure(scenario, tmp_path / "out")
    assert "mismatch" in message
    endpoint = MqttEndpoint.from_spec(scenario.broker, "127.0.0.1", port)
    await endpoint.via("127.0.0.1", port).check_connection("via-check", timeout_s=5)
    # ... but the CA is still verified through a proxy.
    wrong_ca = MqttEndpoint.from_spec(
        small_scenario({"url": f"mqtts://127.0.0.1:{port}", "tls": {"ca_file": str(tls_files.other_ca_file)}}).broker,
        "127.0.0.1", port)
    with pytest.raises(BrokerConnectionError, match="certificate verify failed"):
        await wrong_ca.via("127.0.0.1", port).check_connection("via-wrong-ca", timeout_s=5)


async def test_plain_client_to_a_tls_listener_fails_fast(start_mosquitto: Any, tls_files: TlsFiles,
                                                         tmp_path: Path) -> None:
    port = tls_broker(start_mosquitto, tls_files)
    scenario = small_scenario({"url": f"mqtt://127.0.0.1:{port}"})
    await run_expecting_failure(scenario, tmp_path / "out")


async def test_unreachable_broker_fails_fast_and_clearly(tmp_path: Path) -> None:
    scenario = small_scenario({"url": f"mqtt://127.0.0.1:{free_port()}"})
    message = await run_expecting_failure(scenario, tmp_path / "out")
    assert "refused" in message.lower()


async def test_silent_broker_times_out_and_leaves_nothing_open() -> None:
    """A listener that never sends CONNACK: the check times out, closes its socket and ends its task."""
    closed = asyncio.Event()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(1024):
            pass
        closed.set()
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(BrokerConnectionError, match="no CONNACK within 1 s"):
            await MqttEndpoint("127.0.0.1", port).check_connection("silent", timeout_s=1.0)
        await asyncio.wait_for(closed.wait(), 5.0)
        assert [task for task in asyncio.all_tasks() if task is not asyncio.current_task()
                and task.get_coro().__qualname__ != "swallow"] == []
