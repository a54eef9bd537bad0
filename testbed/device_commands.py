"""`testbed device`: a Linux board (Raspberry Pi, Jetson) joins a run as one of its named devices over the network."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import shlex
import socket
import sys
from pathlib import Path

from devices.board_state import BoardStateStore
from devices.board_updates import BoardConfigRefused, BoardUpdates
from devices.energy_meters import DEFAULT_PERIOD_S, EnergyMeterError, open_energy_meter
from devices.network_board import NetworkBoard
from devices.profiles import get_device_profile
from devices.task_groups import run_together
from testbed.core.plugins import ENERGY_METERS
from testbed.core.scenario import ScenarioError
from testbed.core.signing import SigningKeyError, TrustedKey
from testbed.core.topics import Topics
from testbed.hil_commands import add_run_arguments, board_inference, join_run, print_online_changes, until_run_ends

COMMANDS = ("device",)
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_ARGUMENTS = 2
ROUTE_PROBE = ("192.0.2.1", 9)  # TEST-NET-1: a UDP connect there only asks the kernel which address would be used


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `device` on the `testbed` command's subparsers."""
    device = commands.add_parser(
        "device", help="join a run as one of its devices over the network (on a Raspberry Pi / Jetson)",
        description="The program on a board on the network, for a scenario device with `network: true`: finds the "
                    "run on the broker through the link the run emulates for this device (the address the run "
                    "printed), builds the run's model, applies updates (verify, then swap), evaluates on its local "
                    "test split and reports accuracy and measured energy. Ends when the run ends.")
    device.add_argument("--broker", required=True, metavar="HOST:PORT",
                        help="the device's link endpoint, as the run printed it")
    device.add_argument("--name", required=True, help="the device name in the scenario (devices: [{name: ...}])")
    device.add_argument("--energy", choices=["auto", *ENERGY_METERS.names()], default="auto",
                        help="power reader: jetson (INA3221 sysfs), ina3221, ina219 (I2C), model (the scenario's "
                             "device profile), or auto (default)")
    device.add_argument("--sample-period", type=float, default=DEFAULT_PERIOD_S,
                        help=f"power sampling period in seconds (default {DEFAULT_PERIOD_S})")
    device.add_argument("--sysfs-root", default="/sys", help=argparse.SUPPRESS)
    device.add_argument("--trust", metavar="PUBKEY", default=None,
                        help="apply only updates signed by this key (ed25519:<base64>, or a file holding it); the run "
                             "prints its key in the command to use. Without it the board trusts the key the run's "
                             "config names, i.e. whoever can publish on the broker")
    add_run_arguments(device)
    device.add_argument("--state-dir", type=Path, default=Path.home() / ".local" / "state" / "edge-testbed",
                        help="where the model held is saved, so a restart resumes (default ~/.local/state/edge-testbed)")
    device.add_argument("-v", "--verbose", action="store_true", help="log debug details")


def run(args: argparse.Namespace) -> int:
    """Run `device`; returns the exit code."""
    try:
        return asyncio.run(_device(args))
    except KeyboardInterrupt:
        return EXIT_OK


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"testbed device: error: {message}", file=sys.stderr)
    return code


async def _device(args: argparse.Namespace) -> int:
    try:
        trusted_key = None if args.trust is None else TrustedKey.from_argument(args.trust)
    except SigningKeyError as error:
        return _fail(f"--trust: {error}", EXIT_BAD_ARGUMENTS)
    joined = await join_run("device", args)
    if isinstance(joined, int):
        return joined
    endpoint, config, board = joined.endpoint, joined.config, joined.board
    profile = get_device_profile(joined.scenario.device_profiles()[args.name])
    try:
        meter = open_energy_meter(args.energy, profile, sysfs_root=args.sysfs_root, period_s=args.sample_period)
    except EnergyMeterError as error:
        return _fail(str(error), EXIT_BAD_ARGUMENTS)
    updates = BoardUpdates(args.name, profile, meter, board_inference, BoardStateStore(args.state_dir / args.name),
                           trusted_key, pin_option="testbed device --trust")
    agent = NetworkBoard(endpoint, board, updates)
    trust = (f"updates signed by {trusted_key.text} only" if trusted_key
             else "updates signed by the key the run's config names (pin it with --trust)")
    print(f"device {args.name}: run {config.run} (device {board.device_index}, profile {profile.name}) via "
          f"{args.broker}; energy reader {meter.name} every {meter.period_s * 1000:.0f} ms; state in "
          f"{args.state_dir / args.name}; {trust}", flush=True)
    watcher = asyncio.create_task(print_online_changes(
        agent.connected, lambda: f"device {args.name}: online at version {agent.updates.deployed().receiver.version}",
        f"device {args.name}: offline (reconnecting)"))
    try:
        await run_together(agent.run(), until_run_ends(endpoint, Topics(config.run), f"{args.name}-device"))
    except (BoardConfigRefused, EnergyMeterError, ScenarioError) as error:
        return _fail(str(error))
    finally:
        watcher.cancel()
    print(f"device {args.name}: run {config.run} finished", flush=True)
    return EXIT_OK


# --- what the run prints for the board ----------------------------------------------------------------------

def advertised_host(listen_host: str) -> str:
    """The address a board reaches a link endpoint listening on `listen_host` by: the address itself, or for a
    wildcard (0.0.0.0, ::) this host's address on its default route (its hostname when it has no route)."""
    try:
        address = ipaddress.ip_address(listen_host)
    except ValueError:
        return listen_host
    if not address.is_unspecified:
        return listen_host
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(ROUTE_PROBE if family == socket.AF_INET else ("2001:db8::1", 9))
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostname()


def device_command_line(host: str, port: int, name: str, run_id: str, public_key: str, username: str | None = None,
                        tls: bool = False) -> str:
    """The `testbed device` command a board runs to join run `run_id` as `name` through the link at host:port,
    pinning the run's key."""
    words = ["testbed", "device", "--broker", f"{host}:{port}", "--name", name, "--run", run_id, "--trust", public_key]
    line = shlex.join(words)
    if username is not None:
        line += f" --username {shlex.quote(username)} --password-file FILE"
    if tls:
        line += " --ca-file CA_FILE"
    return line
