"""`testbed board` (the agent on a board) and `testbed attach` (the host bridge joining a run on its own)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import aiomqtt

from devices.board_agent import BoardAgent
from devices.board_state import BoardStateStore
from devices.energy_meters import DEFAULT_PERIOD_S, EnergyMeterError, open_energy_meter
from testbed.core.plugins import DEVICE_PROFILES, ENERGY_METERS
from devices.profiles import get_device_profile
from devices.serial_bridge import BridgeError, SerialBridge
from devices.task_groups import run_together
from testbed.core.messages import BoardConfig, MessageError, RunConfig, RunFinished, decode_config_topic
from testbed.core.mqtt import MqttEndpoint, credentials_refused
from testbed.core.scenario import Scenario, ScenarioError, parse_scenario
from testbed.core.signing import SigningKeyError, TrustedKey
from testbed.core.topics import Topics

COMMANDS = ("board", "attach")
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGUMENTS = 2
CONFIG_WAIT_S = 120.0
RUN_GONE_AFTER_FAILURES = 10  # a second apart: the run's broker has not come back for ten seconds

logger = logging.getLogger("testbed.hil")


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `board` and `attach` on the `testbed` command's subparsers."""
    board = commands.add_parser(
        "board", help="run the board agent (on a Raspberry Pi / Jetson attached to the testbed host over serial)",
        description="The program on a board: waits for the host bridge on PORT, takes the run's configuration, "
                    "applies updates (verify, then swap), evaluates on its local test split and reports accuracy "
                    "and measured energy. Runs until Ctrl-C; survives the port going away and coming back.")
    board.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyGS0 (Pi USB gadget), /dev/ttyAMA0, "
                                                     "/dev/ttyUSB0, or socket://HOST:PORT")
    board.add_argument("--baud", type=int, default=115200, help="line rate (default 115200)")
    board.add_argument("--name", default=socket.gethostname(), help="board name shown to the host (default: hostname)")
    board.add_argument("--profile", choices=DEVICE_PROFILES.names(), default="rpi4",
                       help="device profile for the `model` energy reader (default rpi4)")
    board.add_argument("--energy", choices=["auto", *ENERGY_METERS.names()], default="auto",
                       help="power reader: jetson (INA3221 sysfs), ina3221, ina219 (I2C), model, or auto (default)")
    board.add_argument("--sample-period", type=float, default=DEFAULT_PERIOD_S,
                       help=f"power sampling period in seconds (default {DEFAULT_PERIOD_S})")
    board.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    board.add_argument("--state-dir", type=Path, default=Path.home() / ".local" / "state" / "edge-testbed",
                       help="where the model held is saved, so a reboot resumes (default ~/.local/state/edge-testbed)")
    board.add_argument("--trust", metavar="PUBKEY", default=None,
                       help="apply only updates signed by this key (ed25519:<base64>, or a file holding it, as "
                            "`testbed keygen` prints); without it the board trusts the key the host's config names")
    board.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    attach = commands.add_parser(
        "attach", help="bridge a serial-attached board into a running scenario as one of its devices",
        description="Host side of a board in the loop, for a scenario device with `external: true`: finds the run "
                    "on the broker, opens PORT, hands the board its configuration and relays updates and reports. "
                    "Every frame is logged to OUT/serial/NAME.log. Runs until Ctrl-C.")
    attach.add_argument("--port", required=True, help="serial port (device path, or socket://HOST:PORT for ser2net)")
    attach.add_argument("--baud", type=int, default=115200, help="line rate (default 115200)")
    attach.add_argument("--name", required=True, help="the device name in the scenario (devices: [{name: ...}])")
    attach.add_argument("--broker", default="127.0.0.1:1883", metavar="HOST:PORT",
                        help="where the run said to attach (its link for this device), default 127.0.0.1:1883")
    add_run_arguments(attach)
    attach.add_argument("--out", type=Path, default=Path("."), help="folder for serial/NAME.log (default .)")
    attach.add_argument("-v", "--verbose", action="store_true", help="log debug details")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options saying which run to join and as whom (`attach`, `device`): --run, --username, --password-file,
    --ca-file (read by `join_run`)."""
    parser.add_argument("--run", default=None, help="run id (default: the newest run that has a device NAME)")
    parser.add_argument("--username", default=None,
                        help="the device's own MQTT username, when the broker checks identities (default with "
                             "--password-file: NAME)")
    parser.add_argument("--password-file", type=Path, default=None, metavar="FILE",
                        help="file whose first line is the device's MQTT password (its broker.device_credentials)")
    parser.add_argument("--ca-file", type=Path, default=None, metavar="FILE",
                        help="CA certificate of a TLS broker (mqtts://): TLS runs through the run's link to the broker")


def run(args: argparse.Namespace) -> int:
    """Run `board` or `attach`; returns the exit code."""
    try:
        if args.command == "board":
            return asyncio.run(_board(args))
        return asyncio.run(_attach(args))
    except KeyboardInterrupt:
        return EXIT_OK


def _fail(command: str, message: str, code: int = EXIT_FAILED) -> int:
    print(f"testbed {command}: error: {message}", file=sys.stderr)
    return code


# --- board ----------------------------------------------------------------------------------------------

def board_inference(config: BoardConfig) -> Any:
    """The model and local test split a board runs, from the config the run gave it (BoardSetup)."""
    from testbed.inference import device_inference

    return device_inference(parse_scenario(config.scenario, f"config from the host for {config.device}"),
                            config.device_index)


async def _board(args: argparse.Namespace) -> int:
    profile = get_device_profile(args.profile)
    try:
        meter = open_energy_meter(args.energy, profile, sysfs_root=args.sysfs_root, period_s=args.sample_period)
    except EnergyMeterError as error:
        return _fail("board", str(error), EXIT_BAD_ARGUMENTS)
    try:
        trusted_key = None if args.trust is None else TrustedKey.from_argument(args.trust)
    except SigningKeyError as error:
        return _fail("board", f"--trust: {error}", EXIT_BAD_ARGUMENTS)
    agent = BoardAgent(args.port, board_name=args.name, profile=profile, meter=meter, setup=board_inference,
                       baud=args.baud, state=BoardStateStore(args.state_dir / args.name), trusted_key=trusted_key)
    trust = (f"updates signed by {trusted_key.text} only" if trusted_key
             else "updates signed by the key the host's config names (pin one with --trust)")
    print(f"board {args.name}: waiting for the host on {args.port} at {args.baud} baud; energy reader "
          f"{meter.name} every {meter.period_s * 1000:.0f} ms; state in {args.state_dir / args.name}; {trust}",
          flush=True)
    try:
        await agent.run()
    except (EnergyMeterError, ScenarioError) as error:
        return _fail("board", str(error))
    return EXIT_OK


# --- attach ---------------------------------------------------------------------------------------------

def broker_address(text: str) -> tuple[str, int]:
    host, separator, port = text.rpartition(":")
    if not separator or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"--broker: expected HOST:PORT, got {text!r}")
    return host, int(port)


def read_password_file(path: Path) -> str:
    """The first line of `path`: an MQTT password (ValueError naming --password-file and why it cannot be read)."""
    try:
        return path.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, UnicodeDecodeError, IndexError) as error:
        reason = getattr(error, "strerror", None) or ("empty" if isinstance(error, IndexError) else error)
        raise ValueError(f"--password-file: cannot read a password from {str(path)!r}: {reason}") from None


def attach_endpoint(args: argparse.Namespace) -> MqttEndpoint:
    """Where `testbed attach` connects (the run's link for the device), as the device's own identity if given."""
    endpoint = MqttEndpoint(*broker_address(args.broker))
    if args.password_file is not None:
        endpoint = endpoint.with_credentials(args.username or args.name, read_password_file(args.password_file))
    elif args.username is not None:
        endpoint = endpoint.with_credentials(args.username, "")
    if args.ca_file is not None:  # through the link's proxy: the CA is checked, the host name cannot be
        endpoint = replace(endpoint, tls_enabled=True, tls_ca_file=str(args.ca_file)).via(endpoint.host, endpoint.port)
    return endpoint


async def find_run_config(endpoint: MqttEndpoint, device_id: str, run_id: str | None,
                          wait_s: float = CONFIG_WAIT_S) -> RunConfig:
    """The retained config of run `run_id` (or of the newest run listing `device_id`) on the broker."""
    topic = f"testbed/{run_id}/config" if run_id else "testbed/+/config"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    settle_until: float | None = None  # retained configs of several runs arrive together: keep reading briefly
    found: RunConfig | None = None
    async with endpoint.client(f"attach-{device_id}-{time.monotonic_ns()}") as client:
        await client.subscribe(topic, qos=1)
        messages = client.messages
        while True:
            remaining = (deadline if settle_until is None else min(deadline, settle_until)) - loop.time()
            if remaining <= 0:
                break
            try:
                message = await asyncio.wait_for(anext(messages), remaining)
            except asyncio.TimeoutError:
                break
            try:
                config = decode_config_topic(bytes(message.payload))
            except MessageError as error:
                logger.warning("ignoring a malformed run config on %s: %s", message.topic, error)
                continue
            if not isinstance(config, RunConfig) or device_id not in config.devices:
                continue
            if found is None or config.started_at > found.started_at:
                found = config
            if run_id is not None or not message.retain:
                break
            settle_until = loop.time() + 1.0
    if found is None:
        where = f"run {run_id}" if run_id else "any run"
        raise BridgeError(f"no config of {where} listing device {device_id!r} on the broker within {wait_s:.0f} s; "
                          "start `testbed run` first and check --broker (the address the run printed)")
    return found


@dataclass(frozen=True)
class JoinedRun:
    """The run a device joins (found on the broker through its link), and what the device needs of it."""

    endpoint: MqttEndpoint
    config: RunConfig
    board: BoardConfig
    scenario: Scenario


async def join_run(command: str, args: argparse.Namespace) -> JoinedRun | int:
    """The run device `args.name` joins at `args.broker` (`add_run_arguments`), or the exit code after printing why
    it cannot (one line)."""
    try:
        endpoint = attach_endpoint(args)
    except ValueError as error:
        return _fail(command, str(error), EXIT_BAD_ARGUMENTS)
    try:
        config = await find_run_config(endpoint, args.name, args.run)
        scenario = parse_scenario(config.scenario, "the run's config")
        return JoinedRun(endpoint, config, config.board_config(args.name), scenario)
    except (BridgeError, ScenarioError, MessageError) as error:
        return _fail(command, str(error))
    except aiomqtt.MqttError as error:
        if credentials_refused(error):
            return _fail(command, f"the broker at {args.broker} refused {endpoint.username or 'an anonymous client'}: "
                                  f"{str(error).lower()} (check --username and --password-file)", EXIT_BAD_ARGUMENTS)
        return _fail(command, f"cannot reach the broker at {args.broker}: {error}")


async def _attach(args: argparse.Namespace) -> int:
    joined = await join_run("attach", args)
    if isinstance(joined, int):
        return joined
    endpoint, config, board = joined.endpoint, joined.config, joined.board
    profile = joined.scenario.device_profiles()[args.name]
    log_path = args.out / "serial" / f"{args.name}.log"
    bridge = SerialBridge(args.name, profile, args.port, Topics(config.run), endpoint, board,
                          baud=args.baud, log_path=log_path)
    print(f"attach {args.name}: run {config.run}, profile {profile}, port {args.port} at {args.baud} baud; "
          f"serial log {log_path}", flush=True)
    watcher = asyncio.create_task(print_online_changes(
        bridge.connected, lambda: f"attach {bridge.device_id}: board online at version {bridge.board_version}",
        f"attach {bridge.device_id}: board offline"))
    try:
        await run_together(bridge.run(), until_run_ends(endpoint, Topics(config.run), args.name))
    except BridgeError as error:
        return _fail("attach", str(error))
    finally:
        watcher.cancel()
    print(f"attach {args.name}: run {config.run} finished", flush=True)
    return EXIT_OK


async def until_run_ends(endpoint: MqttEndpoint, topics: Topics, device_id: str) -> None:
    """Returns when the run clears its retained config (it ends), or its broker is gone for good."""
    failures = 0
    while failures < RUN_GONE_AFTER_FAILURES:
        try:
            async with endpoint.client(f"{topics.run_id}-{device_id}-watch") as client:
                await client.subscribe(topics.config, qos=1)
                failures = 0
                async for message in client.messages:
                    try:
                        state = decode_config_topic(bytes(message.payload))
                    except MessageError as error:
                        logger.warning("ignoring a malformed message on %s: %s", topics.config, error)
                        continue
                    if state is None or isinstance(state, RunFinished):
                        return
        except aiomqtt.MqttError:
            failures += 1
            await asyncio.sleep(1.0)


async def print_online_changes(connected: asyncio.Event, online: Callable[[], str], offline: str) -> None:
    """Print `online()` each time `connected` is set and `offline` each time it is cleared, until cancelled."""
    while True:
        await connected.wait()
        print(online(), flush=True)
        while connected.is_set():
            await asyncio.sleep(0.5)
        print(offline, flush=True)

