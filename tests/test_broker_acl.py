"""Broker identities and topic rules for real: Mosquitto with `testbed broker-config`'s files behind TLS, and the embedded broker."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from testbed.broker import EmbeddedBroker
from testbed.broker_config import broker_access
from testbed.cli import main
from testbed.core.mqtt import BrokerConnectionError, MqttEndpoint
from testbed.core.scenario import parse_scenario
from testbed.core.topics import Topics
from testbed.runner import ScenarioRun

pytestmark = pytest.mark.timeout(240)

SERVER = ("testbed-server", "server-secret")
DEVICE_A = ("dev-a", "a-secret")  # rpi4-0, under a username of its own
DEVICE_B = ("rpi4-1", "b-secret")  # rpi4-1, under its device id
WAIT_S = 20.0  # for a message the broker will deliver; refused ones are shown absent by a later marker


@dataclass(frozen=True)
class Certificates:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certificates(folder: Path) -> Certificates:
    """A test CA and a broker certificate it signs for 127.0.0.1 and localhost (P-256, valid for a day)."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-testbed ACL test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
    files = Certificates(folder / "ca.crt", folder / "broker.crt", folder / "broker.key")
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    files.key_file.chmod(0o600)
    return files


def scenario_raw(folder: Path, broker: dict[str, Any]) -> dict[str, Any]:
    """A two-device scenario whose devices have identities of their own (the file is written here)."""
    credentials = folder / "devices.yaml"
    credentials.write_text(yaml.safe_dump({"rpi4-0": {"username": DEVICE_A[0], "password": DEVICE_A[1]},
                                           "rpi4-1": DEVICE_B[1]}))
    return {
        "name": "broker-acl", "seed": 3, "rounds": 2, "round_timeout": "30s",
        "data": {"initial_samples": 200, "new_samples_per_round": 60},
        "update": {"epochs": 2}, "model": {"hidden": [16]},
        "devices": [{"profile": "rpi4", "count": 2}],
        "broker": {"username": SERVER[0], "password": SERVER[1], "device_credentials": str(credentials), **broker},
        "metrics": {"enabled": False},
    }


def write_scenario(folder: Path, raw: dict[str, Any]) -> Path:
    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def mosquitto_with_the_rules(start_mosquitto: Callable[[str], int], folder: Path,
                             certificates: Certificates | None = None) -> int:
    """Mosquitto using the files `testbed broker-config` writes for the scenario (and a TLS listener); its port."""
    scenario = write_scenario(folder, scenario_raw(folder, {"url": "mqtt://127.0.0.1:1883"}))
    assert main(["broker-config", str(scenario), "--out", str(folder / "broker")]) == 0
    tls = "" if certificates is None else (f"cafile {certificates.ca_file}\ncertfile {certificates.cert_file}\n"
                                           f"keyfile {certificates.key_file}\n")
    return start_mosquitto(tls + f"log_dest file {folder / 'broker.log'}\nlog_type all\n"
                           + (folder / "broker" / "mosquitto-auth.conf").read_text())


async def received_until(client: aiomqtt.Client, marker: bytes) -> list[tuple[str, bytes]]:
    """Every message the client gets up to and including the one whose payload is `marker`."""
    received: list[tuple[str, bytes]] = []
    async with asyncio.timeout(WAIT_S):
        async for message in client.messages:
            received.append((str(message.topic), bytes(message.payload)))
            if message.payload == marker:
                return received
    return received


async def assert_each_identity_is_held_to_its_topics(endpoint: Callable[[str | None, str | None], MqttEndpoint]) -> None:
    """A third party (anonymous, or holding device A's identity) cannot reach the run's topics or device B's.

    What the broker refuses is shown absent by a marker: each client's messages arrive in the order they
    were sent, so a forged message the broker had let through would arrive before the marker after it.
    """
    topics = Topics("acl-test-run")
    for username, password in ((None, None), (DEVICE_A[0], "wrong"), ("nobody", "x"), (SERVER[0], DEVICE_A[1])):
        with pytest.raises(BrokerConnectionError) as refused:
            await endpoint(username, password).check_connection(f"refused-{username}", timeout_s=15.0)
        assert refused.value.credentials_refused, refused.value
    async with endpoint(*SERVER).client("acl-server", timeout_s=15.0) as server, \
            endpoint(*DEVICE_B).client("acl-device-b", timeout_s=15.0) as device_b, \
            endpoint(*DEVICE_A).client("acl-device-a", timeout_s=15.0) as device_a:
        for kind in ("hello", "status", "report", "nack"):
            await server.subscribe(topics.devices(kind), qos=1)
        for topic in topics.device_subscriptions("rpi4-1"):
            await device_b.subscribe(topic, qos=1)
        await device_a.subscribe(topics.manifest, qos=1)
        await device_a.subscribe("testbed/+/config", qos=1)  # as `testbed attach` looks for its run
        for eavesdrop in (topics.device("rpi4-1", "manifest"), topics.device_update_chunks("rpi4-1"),
                          topics.devices("report"), "testbed/#"):
            await device_a.subscribe(eavesdrop, qos=1)  # refused (embedded) or granted and filtered (Mosquitto)
        forged = [topics.manifest, topics.config, topics.update_chunk("1000", 0),
                  topics.device("rpi4-1", "manifest"), topics.device_update_chunk("rpi4-1", "1000-from-1", 0),
                  topics.device("rpi4-1", "hello"), topics.device("rpi4-1", "status"),
                  topics.device("rpi4-1", "report"), topics.device("rpi4-1", "nack")]
        for topic in forged:
            await device_a.publish(topic, b"forged", qos=1, retain=topic == topics.manifest, timeout=15.0)
        await device_a.publish(topics.device("rpi4-0", "hello"), b"device-a-marker", qos=1, timeout=15.0)
        await server.publish(topics.device("rpi4-1", "manifest"), b"for-b-only", qos=1, timeout=15.0)
        await server.publish(topics.device_update_chunk("rpi4-1", "2-from-1", 0), b"for-b-only", qos=1, timeout=15.0)
        await server.publish(topics.config, b"run-config", qos=1, timeout=15.0)
        await server.publish(topics.manifest, b"server-marker", qos=1, timeout=15.0)

        at_server = await received_until(server, b"device-a-marker")
        assert at_server == [(topics.device("rpi4-0", "hello"), b"device-a-marker")]
        at_device_b = await received_until(device_b, b"server-marker")
        assert at_device_b == [(topics.device("rpi4-1", "manifest"), b"for-b-only"),
                               (topics.device_update_chunk("rpi4-1", "2-from-1", 0), b"for-b-only"),
                               (topics.manifest, b"server-marker")]
        at_device_a = await received_until(device_a, b"server-marker")
        assert at_device_a == [(topics.config, b"run-config"), (topics.manifest, b"server-marker")]
        # The forged retained manifest was not kept either: a newcomer gets no retained manifest at all.
        async with endpoint(*DEVICE_B).client("acl-device-b-late", timeout_s=15.0) as late:
            await late.subscribe(topics.manifest, qos=1)  # a retained manifest would be sent with the SUBACK
            await server.publish(topics.manifest, b"late-marker", qos=1, timeout=15.0)
            assert await received_until(late, b"late-marker") == [(topics.manifest, b"late-marker")]


def test_run_over_tls_with_each_device_as_itself(start_mosquitto: Callable[[str], int], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    certificates = make_certificates(tmp_path)
    port = mosquitto_with_the_rules(start_mosquitto, tmp_path, certificates)
    scenario = write_scenario(tmp_path, scenario_raw(tmp_path, {"url": f"mqtts://127.0.0.1:{port}",
                                                                "tls": {"ca_file": str(certificates.ca_file)}}))
    assert main(["run", str(scenario), "--out", str(tmp_path / "out")]) == 0, capsys.readouterr().out[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert sorted(summary["devices"]) == ["rpi4-0", "rpi4-1"]
    for device_id, state in summary["devices"].items():
        assert state["final_version"] == summary["server"]["final_version"], device_id
        assert state["hash_matches_server"], device_id
    log = (tmp_path / "broker.log").read_text()
    for username in (SERVER[0], DEVICE_A[0], DEVICE_B[0]):
        assert f"u'{username}'" in log, f"nobody connected as {username}"
    assert "Denied PUBLISH" not in log  # the run itself keeps to the rules


async def test_mosquitto_holds_each_identity_to_its_topics(start_mosquitto: Callable[[str], int],
                                                           tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path)
    port = mosquitto_with_the_rules(start_mosquitto, tmp_path, certificates)

    def endpoint(username: str | None, password: str | None) -> MqttEndpoint:
        return MqttEndpoint("127.0.0.1", port, username, password, tls_ca_file=str(certificates.ca_file),
                            tls_enabled=True)

    await assert_each_identity_is_held_to_its_topics(endpoint)
    assert "Denied PUBLISH" in (tmp_path / "broker.log").read_text()


async def test_embedded_broker_holds_each_identity_to_its_topics(tmp_path: Path) -> None:
    access = broker_access(parse_scenario(scenario_raw(tmp_path, {"url": "embedded"})))
    async with EmbeddedBroker(access=access) as broker:
        def endpoint(username: str | None, password: str | None) -> MqttEndpoint:
            return MqttEndpoint(broker.host, broker.port, username, password)

        await assert_each_identity_is_held_to_its_topics(endpoint)
        will = aiomqtt.Will(Topics("acl-test-run").manifest, b"forged will", qos=1, retain=True)
        with pytest.raises(aiomqtt.MqttError):  # a will is published by the broker: it must be one's own topic
            async with endpoint(*DEVICE_A).client("acl-will", will=will, timeout_s=15.0):
                pass


async def test_run_on_the_embedded_broker_with_identities(tmp_path: Path) -> None:
    run = ScenarioRun(parse_scenario(scenario_raw(tmp_path, {"url": "embedded"})), tmp_path / "out")
    result = await run.execute()
    assert run.assembly.access is not None and run.assembly.access.restricts_topics
    for device_id, state in result.summary["devices"].items():
        assert state["hash_matches_server"], device_id


@pytest.mark.parametrize(("who", "broker", "named"), [
    ("server", {"password": "wrong"}, "check broker.username / broker.password"),
    ("device", {}, "as device 'rpi4-1'"),
])
def test_a_refused_identity_is_one_line_and_exit_2(start_mosquitto: Callable[[str], int], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str], who: str,
                                                   broker: dict[str, Any], named: str) -> None:
    port = mosquitto_with_the_rules(start_mosquitto, tmp_path)
    raw = scenario_raw(tmp_path, {"url": f"mqtt://127.0.0.1:{port}", **broker})
    if who == "device":
        Path(raw["broker"]["device_credentials"]).write_text(yaml.safe_dump({"rpi4-0": {"username": DEVICE_A[0],
                                                                                         "password": DEVICE_A[1]},
                                                                             "rpi4-1": "not-b-secret"}))
    capsys.readouterr()
    assert main(["run", str(write_scenario(tmp_path, raw)), "--out", str(tmp_path / "out")]) == 2
    output = capsys.readouterr().out
    failed = [line for line in output.splitlines() if "run failed" in line]
    assert len(failed) == 1 and named in failed[0] and "not authori" in failed[0].lower(), output
    assert "[code:" in failed[0]  # the broker's code, not eaten as console markup
    assert "Traceback" not in output


def test_attach_with_a_refused_identity_is_one_line_and_exit_2(start_mosquitto: Callable[[str], int],
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    port = mosquitto_with_the_rules(start_mosquitto, tmp_path)
    password_file = tmp_path / "rpi4-1.password"
    password_file.write_text("not-b-secret\n")
    capsys.readouterr()
    assert main(["attach", "--port", str(tmp_path / "no-such-port"), "--name", "rpi4-1",
                 "--broker", f"127.0.0.1:{port}", "--password-file", str(password_file)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "refused rpi4-1" in error and "--password-file" in error, error
