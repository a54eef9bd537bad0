"""The broker's rule set, Mosquitto's file formats, the device credentials file, and `testbed broker-config`."""

from __future__ import annotations

import base64
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from testbed.broker_access import (
    BrokerAccess,
    Identity,
    filter_covers,
    mosquitto_acl_file,
    mosquitto_password_hash,
)
from testbed.broker_config import (
    CredentialsError,
    broker_access,
    parse_device_credentials,
    scenario_without_secrets,
    write_broker_config,
)
from testbed.cli import main
from testbed.core.scenario import ScenarioError, parse_scenario
from testbed.core.topics import Topics
from testbed.run_assembly import is_loopback, metrics_exposure_warning

from ..conftest import debian_tool

RUN = Topics("lowband-20250101-120000-ab12")
ACCESS = BrokerAccess(Identity("server", "s"), {"rpi4-0": Identity("rpi4-0", "a"),
                                                "rpi4-1": Identity("lab-board", "b")})


def scenario_raw(broker: dict[str, Any]) -> dict[str, Any]:
    return {"name": "acl", "rounds": 1, "devices": [{"profile": "rpi4", "count": 2}], "broker": broker}


# --- the rule set -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("topic", [RUN.manifest, RUN.config, RUN.update_chunk("3", 0), RUN.update_chunk("3-from-1", 7),
                                   RUN.device("rpi4-1", "manifest"), RUN.device_update_chunk("rpi4-1", "3-from-1", 0)])
def test_only_the_server_publishes_manifests_config_and_updates(topic: str) -> None:
    assert ACCESS.allows("server", "write", topic)
    assert not ACCESS.allows("rpi4-0", "write", topic)
    assert not ACCESS.allows("lab-board", "write", topic)
    assert not ACCESS.allows(None, "write", topic)
    assert not ACCESS.allows("stranger", "write", topic)


@pytest.mark.parametrize("kind", ["hello", "status", "report", "nack"])
def test_a_device_publishes_only_on_its_own_device_topics(kind: str) -> None:
    assert ACCESS.allows("rpi4-0", "write", RUN.device("rpi4-0", kind))
    assert ACCESS.allows("lab-board", "write", RUN.device("rpi4-1", kind))  # its username need not be its id
    assert not ACCESS.allows("rpi4-0", "write", RUN.device("rpi4-1", kind))
    assert not ACCESS.allows("lab-board", "write", RUN.device("rpi4-0", kind))
    assert not ACCESS.allows("server", "write", RUN.device("rpi4-0", kind))  # a forged report from the server's id
    assert ACCESS.allows("server", "read", RUN.device("rpi4-0", kind))


def test_a_device_reads_the_broadcasts_and_only_its_own_updates() -> None:
    for subscription in RUN.device_subscriptions("rpi4-0"):
        assert ACCESS.allows("rpi4-0", "read", subscription), subscription
    assert ACCESS.allows("rpi4-0", "read", "testbed/+/config")  # `testbed attach` looks for the newest run
    for other in (RUN.device("rpi4-1", "manifest"), RUN.device_update_chunks("rpi4-1"), RUN.devices("report"),
                  RUN.prefix + "#", "#", "testbed/#", RUN.prefix + "device/#"):
        assert not ACCESS.allows("rpi4-0", "read", other), other


def test_without_device_identities_the_server_identity_may_do_anything_and_no_one_else() -> None:
    access = BrokerAccess(Identity("server", "s"), {})
    assert not access.restricts_topics and access.rules() == {"server": access.rules()["server"]}
    assert access.allows("server", "write", RUN.device("rpi4-0", "report"))
    assert not access.allows("rpi4-0", "write", RUN.device("rpi4-0", "report"))


@pytest.mark.parametrize(("allowed", "requested", "covered"), [
    ("a/+/c", "a/b/c", True), ("a/+/c", "a/+/c", True), ("a/+/c", "a/b/c/d", False), ("a/+/c", "a/b", False),
    ("a/#", "a", True), ("a/#", "a/b/c", True), ("a/#", "a/+/#", True), ("a/b", "a/+", False),
    ("a/+", "a/#", False), ("#", "anything/at/all", True), ("a/b", "#", False), ("a/+/c", "a/b/#", False),
])
def test_filter_covers(allowed: str, requested: str, covered: bool) -> None:
    assert filter_covers(allowed, requested) is covered


level = st.sampled_from(["a", "b", "+", "#", "testbed", ""])


@given(st.lists(level, min_size=1, max_size=5), st.lists(st.sampled_from(["a", "b", "testbed", ""]),
                                                         min_size=1, max_size=6))
def test_a_covered_topic_is_one_the_rule_matches(allowed_levels: list[str], topic_levels: list[str]) -> None:
    """Exact topics are the ground truth: whatever a rule covers, the rule matches (MQTT matching, spelled out)."""
    allowed, topic = "/".join(allowed_levels), "/".join(topic_levels)
    if filter_covers(allowed, topic):
        assert _mqtt_matches(allowed, topic)


@given(st.lists(level, min_size=1, max_size=5), st.lists(level, min_size=1, max_size=5),
       st.lists(st.sampled_from(["a", "b", "testbed", ""]), min_size=1, max_size=6))
def test_a_covered_subscription_receives_only_topics_the_rule_matches(
        allowed_levels: list[str], requested_levels: list[str], topic_levels: list[str]) -> None:
    allowed, requested, topic = "/".join(allowed_levels), "/".join(requested_levels), "/".join(topic_levels)
    if filter_covers(allowed, requested) and _mqtt_matches(requested, topic):
        assert _mqtt_matches(allowed, topic)


def _mqtt_matches(topic_filter: str, topic: str) -> bool:
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return index == len(filter_levels) - 1
        if index >= len(topic_levels) or (level != "+" and level != topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)


# --- Mosquitto's formats ----------------------------------------------------------------------------------

def test_password_hash_is_the_one_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = debian_tool("mosquitto_passwd", "mosquitto")
    password_file = tmp_path / "passwd"
    subprocess.run([tool, "-b", "-c", str(password_file), "u", "pässword"], check=True, capture_output=True,
                   timeout=30)
    written = password_file.read_text().strip().split(":", 1)[1]
    _, kind, iterations, salt, _ = written.split("$")
    assert kind == "7"
    assert mosquitto_password_hash("pässword", base64.b64decode(salt), int(iterations)) == written


def test_password_hash_layout() -> None:
    salt = bytes(range(12))
    digest = hashlib.pbkdf2_hmac("sha512", b"p", salt, 5, 64)
    assert mosquitto_password_hash("p", salt, 5) == (
        f"$7$5${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}")


def test_acl_file_has_a_block_per_identity_and_nothing_for_anonymous() -> None:
    text = mosquitto_acl_file(ACCESS, "scenario acl")
    rule_lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert rule_lines[0] == "user server"  # no rule before the first `user` line: anonymous gets none
    assert "user lab-board" in rule_lines
    board = rule_lines[rule_lines.index("user lab-board") + 1:]
    assert "topic write testbed/+/device/rpi4-1/report" in board
    assert all("rpi4-0" not in line for line in board)
    assert all(line.startswith(("user ", "topic read ", "topic write ")) for line in rule_lines)


def test_written_files(tmp_path: Path) -> None:
    written = write_broker_config(ACCESS, tmp_path / "out", "scenario acl")
    password_path, acl_path, conf_path = written
    assert password_path.stat().st_mode & 0o777 == 0o600
    users = [line.split(":", 1)[0] for line in password_path.read_text().splitlines()]
    assert users == ["server", "rpi4-0", "lab-board"]
    assert "pbkdf2" not in password_path.read_text() and ":s\n" not in password_path.read_text()
    conf = conf_path.read_text()
    assert "allow_anonymous false" in conf
    assert f"password_file {password_path.resolve()}" in conf and f"acl_file {acl_path.resolve()}" in conf


# --- the credentials file ---------------------------------------------------------------------------------

def test_credentials_file_forms() -> None:
    devices = parse_device_credentials("rpi4-0: one\nrpi4-1: {username: lab-board, password: two}\nspare: x\n",
                                       ["rpi4-0", "rpi4-1"], "creds.yaml")
    assert devices == {"rpi4-0": Identity("rpi4-0", "one"), "rpi4-1": Identity("lab-board", "two")}
    as_json = parse_device_credentials('{"rpi4-0": "one", "rpi4-1": "two"}', ["rpi4-0", "rpi4-1"], "c.json")
    assert as_json["rpi4-1"] == Identity("rpi4-1", "two")
    assert "two" not in repr(as_json)


@pytest.mark.parametrize(("text", "complaint"), [
    ("rpi4-0: one\n", "no entry for device 'rpi4-1'"),
    ("- rpi4-0\n", "expected a mapping"),
    ("rpi4-0: 1234\nrpi4-1: two\n", "quote numbers"),
    ("rpi4-0: {password: 1234}\nrpi4-1: two\n", "quote numbers"),
    ("rpi4-0: ''\nrpi4-1: two\n", "non-empty one-line string"),
    ("rpi4-0: {password: x, role: admin}\nrpi4-1: two\n", "unknown key 'role'"),
    ("rpi4-0: {username: 'a b', password: x}\nrpi4-1: two\n", "username 'a b'"),
    ("rpi4-0: {username: '#', password: x}\nrpi4-1: two\n", "username '#'"),
    ("rpi4-0: one\nrpi4-0: again\nrpi4-1: two\n", "given twice"),
    ("rpi4-0: [unclosed\n", "not valid YAML"),
])
def test_credentials_file_errors_name_the_field(text: str, complaint: str) -> None:
    with pytest.raises(CredentialsError, match="broker.device_credentials") as failure:
        parse_device_credentials(text, ["rpi4-0", "rpi4-1"], "creds.yaml")
    assert complaint in str(failure.value)
    assert len(str(failure.value).splitlines()) == 1


def test_broker_access_from_a_scenario(tmp_path: Path) -> None:
    assert broker_access(parse_scenario(scenario_raw({"url": "embedded"}))) is None
    server_only = broker_access(parse_scenario(scenario_raw({"url": "embedded", "username": "u", "password": "p"})))
    assert server_only is not None and not server_only.restricts_topics
    creds = tmp_path / "devices.yaml"
    creds.write_text("rpi4-0: a\nrpi4-1: {username: server, password: b}\n")
    scenario = parse_scenario(scenario_raw({"url": "embedded", "username": "server", "password": "p",
                                            "device_credentials": str(creds)}))
    with pytest.raises(CredentialsError, match="already that of the server"):
        broker_access(scenario)
    missing = parse_scenario(scenario_raw({"url": "embedded", "username": "server", "password": "p",
                                           "device_credentials": str(tmp_path / "nope.yaml")}))
    with pytest.raises(CredentialsError, match="broker.device_credentials: cannot read"):
        broker_access(missing)


def test_device_credentials_need_the_server_identity() -> None:
    with pytest.raises(ScenarioError, match="broker: device_credentials needs username and password"):
        parse_scenario(scenario_raw({"url": "embedded", "username": "u", "device_credentials": "devices.yaml"}))


def test_the_run_config_shares_no_secret() -> None:
    scenario = parse_scenario(scenario_raw({"url": "mqtt://h:1883", "username": "u", "password": "secret",
                                            "device_credentials": "devices.yaml"}))
    shared = scenario_without_secrets(scenario)
    assert shared["broker"] == {"url": "mqtt://h:1883", "username": "u"}
    assert "secret" not in yaml.safe_dump(shared)
    parse_scenario(shared)  # a board still reads it


def test_metrics_beyond_loopback_warn() -> None:
    metrics = parse_scenario(scenario_raw({"url": "embedded"})).metrics
    assert metrics_exposure_warning(metrics) is None
    for host in ("localhost", "127.0.0.5", "::1"):
        assert is_loopback(host)
        assert metrics_exposure_warning(metrics.model_copy(update={"host": host})) is None
    for host in ("0.0.0.0", "192.168.1.5", "::", "testbed.example"):
        warning = metrics_exposure_warning(metrics.model_copy(update={"host": host}))
        assert warning is not None and host in warning and "\n" not in warning
    assert metrics_exposure_warning(metrics.model_copy(update={"host": "0.0.0.0", "enabled": False})) is None


# --- `testbed broker-config` ------------------------------------------------------------------------------

def test_broker_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "devices.yaml").write_text("rpi4-0: a\nrpi4-1: b\n")
    scenario = tmp_path / "acl.yaml"
    scenario.write_text(yaml.safe_dump(scenario_raw({"url": "mqtts://broker.example", "username": "server",
                                                     "password": "s",
                                                     "device_credentials": str(tmp_path / "devices.yaml")})))
    assert main(["broker-config", str(scenario), "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == [str(tmp_path / "out" / name)
                                                   for name in ("passwd", "acl", "mosquitto-auth.conf")]
    assert "user rpi4-1" in (tmp_path / "out" / "acl").read_text()


@pytest.mark.parametrize(("broker", "complaint"), [
    ({"url": "embedded"}, "broker-config needs broker.username"),
    ({"url": "embedded", "username": "server", "password": "s"}, "broker-config needs broker.username"),
    ({"url": "embedded", "username": "server", "password": "s", "device_credentials": "/nonexistent/devices.yaml"},
     "broker.device_credentials: cannot read '/nonexistent/devices.yaml'"),
])
def test_broker_config_refuses_a_scenario_without_identities(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                             broker: dict[str, Any], complaint: str) -> None:
    scenario = tmp_path / "acl.yaml"
    scenario.write_text(yaml.safe_dump(scenario_raw(broker)))
    assert main(["broker-config", str(scenario), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert complaint in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_run_and_validate_refuse_a_device_missing_from_the_credentials(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "devices.yaml").write_text("rpi4-0: a\n")
    scenario = tmp_path / "acl.yaml"
    scenario.write_text(yaml.safe_dump(scenario_raw({"url": "embedded", "username": "server", "password": "s",
                                                     "device_credentials": str(tmp_path / "devices.yaml")})))
    assert main(["validate", "--resolve", str(scenario)]) == 2
    assert main(["run", str(scenario), "--out", str(tmp_path / "run")]) == 2
    output = capsys.readouterr().out
    assert output.count("broker.device_credentials:") == 2 and "no entry for device 'rpi4-1'" in output


def test_attach_connects_as_the_device(tmp_path: Path) -> None:
    import argparse

    from testbed.hil_commands import attach_endpoint

    password_file = tmp_path / "password"
    password_file.write_text("b-secret\nignored\n")
    arguments = {"broker": "127.0.0.1:18830", "name": "rpi4-1", "username": None, "password_file": None,
                 "ca_file": None}
    plain = attach_endpoint(argparse.Namespace(**arguments))
    assert (plain.username, plain.password, plain.tls_enabled) == (None, None, False)
    own = attach_endpoint(argparse.Namespace(**{**arguments, "password_file": password_file}))
    assert (own.username, own.password) == ("rpi4-1", "b-secret")
    named = attach_endpoint(argparse.Namespace(**{**arguments, "password_file": password_file, "username": "lab",
                                                  "ca_file": tmp_path / "ca.crt"}))
    assert (named.username, named.tls_enabled, named.tls_ca_file) == ("lab", True, str(tmp_path / "ca.crt"))
    assert named.tls_verify_certificate and not named.tls_check_hostname  # through the link's proxy
    with pytest.raises(ValueError, match="--password-file"):
        attach_endpoint(argparse.Namespace(**{**arguments, "password_file": tmp_path / "missing"}))
