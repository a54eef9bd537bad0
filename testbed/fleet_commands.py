"""`testbed fleet` (a share of a run's emulated devices, on this host or another) and the run's worker processes."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiomqtt

from devices.errors import DeviceError
from devices.task_groups import run_together
from testbed import event_loop
from testbed.core.fleet_plan import SelectorError, select_devices
from testbed.core.messages import MessageError, RunConfig, decode_config_topic
from testbed.core.mqtt import MqttEndpoint
from testbed.core.scenario import ScenarioError, parse_scenario
from testbed.core.topics import Topics
from testbed.hil_commands import (CONFIG_WAIT_S, EXIT_BAD_ARGUMENTS, EXIT_FAILED, EXIT_OK, broker_address,
                                  read_password_file, until_run_ends)

COMMANDS = ("fleet",)
PASSWORD_VARIABLE = "TESTBED_FLEET_PASSWORD"
"""How the run hands its own worker processes the broker password (never on a command line)."""
STOP_WAIT_S = 10.0

logger = logging.getLogger("testbed.fleet")


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `fleet` on the `testbed` command's subparsers."""
    fleet = commands.add_parser(
        "fleet", help="run a share of a run's emulated devices (their links and agents) in this process",
        description="Finds the run on the broker (its retained config), opens the selected devices' emulated links "
                    "to the broker and runs their agents until the run ends. The scenario lists the selector "
                    "under fleet.remote, so the run waits for these devices.")
    fleet.add_argument("--broker", required=True, metavar="HOST:PORT", help="the run's broker, as reachable from here")
    fleet.add_argument("--devices", required=True, metavar="SELECTOR",
                       help="comma-separated: ranges (rpi4-0..99), cell names or device ids")
    fleet.add_argument("--run", default=None, help="run id (default: the newest run that has the selected devices)")
    fleet.add_argument("--username", default=None, help="MQTT username, when the broker checks identities")
    fleet.add_argument("--password-file", type=Path, default=None, metavar="FILE",
                       help="file whose first line is the MQTT password")
    fleet.add_argument("--worker", default=None, help="name of this worker in the run's link reports "
                                                      "(default: host name and process id)")
    fleet.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)  # a worker the run started
    fleet.add_argument("-v", "--verbose", action="store_true", help="log debug details")


def run(args: argparse.Namespace) -> int:
    """Run `testbed fleet`; returns the exit code."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.parent_pid is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle: it stops its workers
        _die_with_parent(args.parent_pid)
    try:
        return event_loop.run(_fleet(args), unset=event_loop.fleet_loop_default())
    except KeyboardInterrupt:
        return EXIT_OK


def _die_with_parent(parent_pid: int) -> None:
    """End this worker with SIGTERM when the run's process dies, however it dies (Linux; elsewhere the run's end)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the run died before the line above took effect
        raise SystemExit(EXIT_FAILED)


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"testbed fleet: error: {message}", file=sys.stderr)
    return code


def fleet_endpoint(args: argparse.Namespace) -> MqttEndpoint:
    """The broker address and identity of `testbed fleet` (ValueError names the bad option)."""
    endpoint = MqttEndpoint(*broker_address(str(args.broker)))
    password = os.environ.get(PASSWORD_VARIABLE)
    if args.password_file is not None:
        password = read_password_file(args.password_file)
    if args.username is not None:
        endpoint = endpoint.with_credentials(args.username, password or "")
    return endpoint


def selected_devices(config: RunConfig, selector: str) -> list[str]:
    """The devices of `config`'s run that `selector` names (SelectorError if it names none of them)."""
    cells = {str(cell["name"]): list(cell.get("devices", []))
             for cell in config.scenario.get("channel", {}).get("cells", [])}
    return select_devices(selector, list(config.devices), cells)


async def find_fleet_run(endpoint: MqttEndpoint, selector: str, run_id: str | None,
                         wait_s: float = CONFIG_WAIT_S) -> tuple[RunConfig, list[str]]:
    """The retained config of run `run_id` (or of the newest run `selector` selects devices of), and those devices."""
    topic = f"testbed/{run_id}/config" if run_id else "testbed/+/config"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    found: tuple[RunConfig, list[str]] | None = None
    problem = ""
    async with endpoint.client(f"fleet-find-{time.monotonic_ns()}") as client:
        await client.subscribe(topic, qos=1)
        while (remaining := deadline - loop.time()) > 0:
            try:
                message = await asyncio.wait_for(anext(client.messages), remaining)
            except asyncio.TimeoutError:
                break
            try:
                config = decode_config_topic(bytes(message.payload))
                if not isinstance(config, RunConfig):
                    continue
                devices = selected_devices(config, selector)
            except (MessageError, SelectorError) as error:
                problem = f" ({error})"
                continue
            if found is None or config.started_at > found[0].started_at:
                found = (config, devices)
            if run_id is not None or not message.retain:
                break
            deadline = min(deadline, loop.time() + 1.0)  # retained configs of several runs arrive together
    if found is None:
        where = f"run {run_id}" if run_id else "any run"
        raise DeviceError(f"no config of {where} with devices {selector!r} on the broker within {wait_s:.0f} s"
                          f"{problem}; start `testbed run` first and check --broker")
    return found


async def _fleet(args: argparse.Namespace) -> int:
    from testbed.fleet_worker import FleetWorker

    try:
        endpoint = fleet_endpoint(args)
    except ValueError as error:
        return _fail(str(error), EXIT_BAD_ARGUMENTS)
    worker_name = args.worker or f"{os.uname().nodename}-{os.getpid()}"
    try:
        config, devices = await find_fleet_run(endpoint, args.devices, args.run)
        scenario = parse_scenario(config.scenario, "the run's config")
    except (DeviceError, ScenarioError) as error:
        return _fail(str(error))
    except aiomqtt.MqttError as error:
        return _fail(f"cannot reach the broker at {args.broker}: {error}")
    print(f"fleet {worker_name}: run {config.run}, {len(devices)} devices ({devices[0]} … {devices[-1]})", flush=True)

    def online(count: int) -> None:
        print(f"fleet {worker_name}: {count} devices online", flush=True)

    worker = FleetWorker(endpoint, config, scenario, devices, worker_name, on_online=online)
    try:
        await run_together(worker.run(), until_run_ends(endpoint, Topics(config.run), worker_name))
    except DeviceError as error:
        return _fail(str(error))
    print(f"fleet {worker_name}: run {config.run} finished", flush=True)
    return EXIT_OK


class WorkerProcesses:
    """The run's local fleet workers: one `testbed fleet` process per share, stopped (SIGTERM, then SIGKILL) when
    the block ends, however it ends; each writes its output to `log_dir/worker-N.log`."""

    def __init__(self, endpoint: MqttEndpoint, run_id: str, shares: Sequence[Sequence[str]], log_dir: Path) -> None:
        self.endpoint = endpoint
        self.run_id = run_id
        self.shares = [list(share) for share in shares]
        self.log_dir = log_dir
        self.processes: list[asyncio.subprocess.Process] = []

    def log_path(self, index: int) -> Path:
        return self.log_dir / f"worker-{index}.log"

    async def __aenter__(self) -> WorkerProcesses:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        environment = dict(os.environ)
        command = [sys.executable, "-m", "testbed", "fleet", "--broker", f"{self.endpoint.host}:{self.endpoint.port}",
                   "--run", self.run_id, "--parent-pid", str(os.getpid())]
        if self.endpoint.username is not None:
            command += ["--username", self.endpoint.username]
            environment[PASSWORD_VARIABLE] = self.endpoint.password or ""
        try:
            for index, share in enumerate(self.shares):
                with open(self.log_path(index), "wb") as log:
                    self.processes.append(await asyncio.create_subprocess_exec(
                        *command, "--worker", f"worker-{index}", "--devices", ",".join(share),
                        stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT,
                        env=environment))
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Terminate every worker still running and wait for it (killed after STOP_WAIT_S)."""
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), STOP_WAIT_S)
            except asyncio.TimeoutError:
                process.kill()
                await process.wait()

    async def ended(self, index: int) -> int:
        """Waits for worker `index` to exit; its exit code."""
        return await self.processes[index].wait()
