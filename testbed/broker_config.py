"""A scenario's broker identities read from its files, and `testbed broker-config` writing Mosquitto's password and ACL files."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from testbed.broker_access import (
    MOSQUITTO_SALT_BYTES,
    BrokerAccess,
    Identity,
    check_username,
    mosquitto_acl_file,
    mosquitto_conf_snippet,
    mosquitto_password_file,
)
from testbed.core.scenario import Scenario, ScenarioError, load_scenario
from testbed.core.scenario_yaml import ScenarioYamlError, load_scenario_yaml

COMMANDS = ("broker-config",)
EXIT_OK = 0
EXIT_BAD_INPUT = 2
FIELD = "broker.device_credentials"
MAX_CREDENTIALS_FILE_BYTES = 1 << 20
PASSWORD_FILE = "passwd"
ACL_FILE = "acl"
CONF_FILE = "mosquitto-auth.conf"


class CredentialsError(ScenarioError):
    """The scenario's broker identities cannot be used: the message names the field and what is wrong."""


def parse_device_credentials(text: str, device_ids: list[str], where: str) -> dict[str, Identity]:
    """Device id -> identity for each of `device_ids`, from a credentials file's text (YAML or JSON).

    Each entry is ``device-id: password`` (the username is the device id) or
    ``device-id: {username: ..., password: ...}``; entries for other devices are ignored.
    """
    try:
        raw = load_scenario_yaml(text)
    except ScenarioYamlError as error:
        raise CredentialsError(f"{FIELD}: {where}: {error}") from None
    if not isinstance(raw, dict):
        raise CredentialsError(f"{FIELD}: {where}: expected a mapping of device id to password or "
                               "{username, password}, got " + type(raw).__name__)
    missing = [device_id for device_id in device_ids if device_id not in raw]
    if missing:
        raise CredentialsError(f"{FIELD}: {where} has no entry for device {missing[0]!r}"
                               + (f" (nor for {len(missing) - 1} more)" if len(missing) > 1 else "")
                               + "; give each device of the scenario its own username and password")
    return {device_id: _identity(device_id, raw[device_id], where) for device_id in device_ids}


def _identity(device_id: str, entry: Any, where: str) -> Identity:
    at = f"{FIELD}: {where}: {device_id}"
    if isinstance(entry, str):
        username, password = device_id, entry
    elif isinstance(entry, dict):
        unknown = sorted(str(key) for key in entry if key not in ("username", "password"))
        if unknown:
            raise CredentialsError(f"{at}: unknown key {unknown[0]!r} (an entry has username and password)")
        username, password = entry.get("username", device_id), entry.get("password")
    else:
        raise CredentialsError(f"{at}: expected a password (a string: quote numbers) or {{username, password}}, "
                               f"got {type(entry).__name__}")
    if not isinstance(username, str) or (problem := check_username(username, at)) is not None:
        raise CredentialsError(problem or f"{at}: the username must be a string, got {type(username).__name__}")
    if not isinstance(password, str) or not password or "\n" in password:
        raise CredentialsError(f"{at}: the password must be a non-empty one-line string (quote numbers)")
    return Identity(username, password)


def broker_access(scenario: Scenario) -> BrokerAccess | None:
    """The run's identities: None when the scenario gives none (anonymous), the server's alone without
    `broker.device_credentials` (every client of the run uses it), else the server's and one per device."""
    spec = scenario.broker
    if spec.username is None:
        return None
    server = Identity(spec.username, spec.password or "")
    if spec.device_credentials is None:
        return BrokerAccess(server, {})
    problem = check_username(spec.username, "broker.username")
    if problem is not None:
        raise CredentialsError(problem)
    path = spec.device_credentials
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CREDENTIALS_FILE_BYTES + 1)
    except OSError as error:
        raise CredentialsError(f"{FIELD}: cannot read {str(path)!r}: {error.strerror or error}") from None
    if len(data) > MAX_CREDENTIALS_FILE_BYTES:
        raise CredentialsError(f"{FIELD}: {str(path)!r} is over {MAX_CREDENTIALS_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CredentialsError(f"{FIELD}: {str(path)!r} is not UTF-8 text") from None
    devices = parse_device_credentials(text, scenario.device_ids(), repr(str(path)))
    owners: dict[str, str] = {server.username: "the server (broker.username)"}
    for device_id, identity in devices.items():
        if identity.username in owners:
            raise CredentialsError(f"{FIELD}: {str(path)!r}: device {device_id!r} has username "
                                   f"{identity.username!r}, already that of {owners[identity.username]}; "
                                   "each identity must be its own")
        owners[identity.username] = f"device {device_id!r}"
    return BrokerAccess(server, devices)


def scenario_without_secrets(scenario: Scenario) -> dict[str, Any]:
    """The scenario as the run shares it with every device (the retained run config): no broker password,
    and no path to the file of device passwords, which a device has no use for."""
    data = scenario.model_dump(mode="json", by_alias=True, exclude_none=True)
    for secret in ("password", "device_credentials"):
        data.get("broker", {}).pop(secret, None)
    return data


def write_broker_config(access: BrokerAccess, out_dir: Path, source: str) -> list[Path]:
    """Write the password file (mode 0600), the ACL file and the mosquitto.conf snippet into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    password_path, acl_path, conf_path = out_dir / PASSWORD_FILE, out_dir / ACL_FILE, out_dir / CONF_FILE
    salts = {identity.username: os.urandom(MOSQUITTO_SALT_BYTES) for identity in access.identities()}
    descriptor = os.open(password_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)  # also when the file was there before, with wider permissions
        file.write(mosquitto_password_file(access, salts))
    acl_path.write_text(mosquitto_acl_file(access, source), encoding="utf-8")
    conf_path.write_text(mosquitto_conf_snippet(str(password_path.resolve()), str(acl_path.resolve()), source),
                         encoding="utf-8")
    return [password_path, acl_path, conf_path]


# --- `testbed broker-config` ------------------------------------------------------------------------------

def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `broker-config` on the `testbed` command's subparsers."""
    command = commands.add_parser(
        "broker-config", help="write Mosquitto password and ACL files for a scenario's identities",
        description="Writes, for the server and each device of SCENARIO (broker.username/password and "
                    "broker.device_credentials), a Mosquitto password file, an ACL file holding each identity "
                    "to its own topics, and a mosquitto.conf snippet using both.")
    command.add_argument("scenario", type=Path, help="scenario YAML file")
    command.add_argument("--out", type=Path, default=None, help="output folder (default: broker-<scenario name>)")
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE",
                         help="override a scenario field (repeatable)")


def run(args: argparse.Namespace) -> int:
    """Run `broker-config`; returns the exit code."""
    try:
        scenario = load_scenario(args.scenario, args.overrides)
    except ScenarioError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        access = broker_access(scenario)
        if access is None or not access.restricts_topics:
            raise CredentialsError(f"broker-config needs broker.username, broker.password and {FIELD} "
                                   "(the identities it writes)")
    except CredentialsError as error:
        print(f"error: {args.scenario}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    out_dir = args.out or Path(f"broker-{scenario.name}")
    try:
        written = write_broker_config(access, out_dir, f"scenario {scenario.name}")
    except OSError as error:
        print(f"error: cannot write to {out_dir}: {error.strerror or error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    descriptions = (f"{len(access.identities())} identities, Mosquitto $7$ hashes, mode 0600",
                    f"the server and {len(access.devices)} devices, each held to its own topics",
                    "for mosquitto.conf: allow_anonymous false, password_file, acl_file")
    for path, description in zip(written, descriptions):
        print(f"wrote {path} ({description})")
    return EXIT_OK
