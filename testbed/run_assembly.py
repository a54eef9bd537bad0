"""The wiring of one run: broker, metrics exporter, a link per device, the device of each kind, the control client."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Protocol

import aiomqtt

from channel.errors import ChannelError
from devices.fleet import ExternalDevice, FleetMember
from devices.serial_bridge import SerialBridge
from server.update_server import UpdateServer
from testbed.broker import EmbeddedBroker, LocalBroker
from testbed.broker_access import BrokerAccess
from testbed.broker_config import broker_access, scenario_without_secrets
from testbed.core.connect_ramp import ConnectRamp
from testbed.core.messages import RunConfig, RunFinished
from testbed.core.mqtt import SERVER_CREDENTIALS_FIELDS, BrokerConnectionError, MqttEndpoint
from testbed.core.scenario import DeviceGroup, MetricsSpec, Scenario, ScenarioError
from testbed.core.signing import TrustedKey
from testbed.core.topics import Topics
from testbed.core.fleet_checks import planned_worker_shares
from testbed.device_commands import advertised_host, device_command_line
from testbed.fleet_commands import WorkerProcesses
from testbed.fleet_worker import (REFRESH_WAIT_S, LinkReports, RemoteLink, WorkerDevice, link_report_period_s,
                                  device_link_seed, emulated_agent, remote_link)
from testbed.inference import SharedModel
from testbed.links import DeviceLinks
from testbed.loopback_listeners import LoopbackListeners, link_listen_address
from testbed.metrics import MetricsExporter, RunMetrics
from testbed.mosquitto import LocalMosquitto
from testbed.prometheus_targets import register_run
from testbed.control_connection import ControlConnection
from testbed.report_collector import DeviceMessages
from testbed.run_summary import RunError

logger = logging.getLogger("testbed.runner")

EXTERNAL_GOODBYE_S = 3.0  # at the end, time for "finished" to reach `testbed attach` bridges through their links
END_RUN_CONFIG_S = 15.0  # the rest of the goodbye: two publishes, or a reconnect and one publish
IDENTITY_CHECKS_AT_ONCE = 8  # device identities checked on an external broker at the start, this many at a time

ProgressCallback = Callable[[str, dict[str, Any]], None]


class BrokerCredentialsError(RunError, ScenarioError):
    """The broker refused an identity the scenario gives: the run cannot start, and the scenario is what to fix."""


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_exposure_warning(metrics: MetricsSpec) -> str | None:
    """The warning a run prints when its Prometheus exporter listens beyond loopback, or None."""
    if not metrics.enabled or is_loopback(metrics.host):
        return None
    return (f"metrics.host {metrics.host} is not a loopback address: the Prometheus exporter (no authentication) "
            "is reachable from the network")


class RunAssembly:
    """Opens what a run runs on, each entered on the caller's AsyncExitStack so it closes when the run ends."""

    def __init__(self, scenario: Scenario, run_id: str, out_dir: Path, metrics: RunMetrics,
                 progress: ProgressCallback, trusted_key: TrustedKey) -> None:
        self.scenario = scenario
        self.trusted_key = trusted_key
        """The public half of the run's signing key: every device applies only what it signed."""
        self.run_id = run_id
        self.topics = Topics(run_id)
        self.out_dir = out_dir
        self.metrics = metrics
        self.progress = progress
        self.profiles = scenario.device_profiles()
        self.external_devices: dict[str, ExternalDevice] = {}
        self.metrics_url: str | None = None
        self.access: BrokerAccess | None = None  # the run's broker identities, once broker() has read them
        self.embedded_broker: LocalBroker | None = None
        """The broker broker() started (embedded amqtt, or a local Mosquitto), if the run started one."""
        self.device_links: dict[str, Any] = {}  # each device's open link (its backend's EmulatedLink), by device id
        self.worker_shares: list[list[str]] = []
        """The emulated devices each local worker process runs (testbed.fleet_worker); none: all in process."""
        self.worker_devices: dict[str, WorkerDevice] = {}
        """Devices a local worker runs, online when their status says so."""
        self.remote_links: dict[str, RemoteLink] = {}
        """The links of devices run by workers (local or `testbed fleet` elsewhere), as their reports give them."""
        self.link_reports: LinkReports | None = None
        self.shared_model: SharedModel | None = None
        """The one torch model (and w⁰) the emulated devices of this process evaluate on, once one needs it."""
        self.connect_ramp = ConnectRamp()
        """The emulated devices of this process connect in turn, at most CONNECTS_IN_FLIGHT at once."""

    async def broker(self, stack: AsyncExitStack) -> MqttEndpoint:
        """The embedded broker or a local Mosquitto (started here, checking the run's identities if it has any) or the
        scenario's external one (checked reachable, and accepting the server's identity and every device's)."""
        spec = self.scenario.broker
        self.access = broker_access(self.scenario)
        if spec.embedded or spec.local_mosquitto:
            started: EmbeddedBroker | LocalMosquitto = (EmbeddedBroker(access=self.access) if spec.embedded
                                                        else LocalMosquitto(access=self.access))
            broker: LocalBroker = await stack.enter_async_context(started)
            self.embedded_broker = broker
            self.progress("broker-started", {"broker": broker.description, "address": f"{broker.host}:{broker.port}"})
            endpoint = MqttEndpoint(broker.host, broker.port)
            server = self.access.server if self.access is not None else None
            return endpoint if server is None else endpoint.with_credentials(server.username, server.password)
        endpoint = MqttEndpoint.from_spec(spec, spec.host, spec.port)
        await self._check_identity(endpoint, f"{self.run_id}-check", "", SERVER_CREDENTIALS_FIELDS)
        devices = list(self.access.devices.items()) if self.access is not None else []
        for start in range(0, len(devices), IDENTITY_CHECKS_AT_ONCE):
            outcomes = await asyncio.gather(*(  # each check ends by itself (its connect has a timeout)
                self._check_identity(endpoint.with_credentials(identity.username, identity.password),
                                     f"{self.run_id}-check-{device_id}", f" as device {device_id!r}",
                                     f"the entry of {device_id!r} in broker.device_credentials")
                for device_id, identity in devices[start:start + IDENTITY_CHECKS_AT_ONCE]), return_exceptions=True)
            failure = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
            if failure is not None:
                raise failure
        return endpoint

    async def _check_identity(self, endpoint: MqttEndpoint, identifier: str, as_whom: str, fields: str) -> None:
        try:
            await endpoint.check_connection(identifier, credentials_fields=fields)
        except BrokerConnectionError as error:
            failure = BrokerCredentialsError if error.credentials_refused else RunError
            raise failure(f"cannot connect to broker {self.scenario.broker.url}{as_whom}: {error.reason}") from error

    def device_endpoint(self, endpoint: MqttEndpoint, device_id: str) -> MqttEndpoint:
        """How a device reaches the broker: as itself when the scenario gives it an identity, else as the run."""
        identity = self.access.devices.get(device_id) if self.access is not None else None
        return endpoint if identity is None else endpoint.with_credentials(identity.username, identity.password)

    async def exporter(self, stack: AsyncExitStack) -> None:
        """The Prometheus exporter, if the scenario enables it, registered for Prometheus (testbed.prometheus_targets)
        while it serves; its URL lands in `metrics_url`."""
        metrics = self.scenario.metrics
        exposure = metrics_exposure_warning(metrics)
        if exposure is not None:
            self.progress("warning", {"message": exposure})
        if metrics.enabled:
            exporter = await stack.enter_async_context(MetricsExporter(self.metrics.registry, metrics.host, metrics.port))
            self.metrics_url = exporter.url
            stack.enter_context(register_run(self.scenario, self.run_id, exporter.host, exporter.port,
                                             lambda message: self.progress("warning", {"message": message})))

    async def fleet_members(self, stack: AsyncExitStack, endpoint: MqttEndpoint, links: DeviceLinks,
                            server: UpdateServer) -> list[FleetMember]:
        """Each device's link to the broker, and behind it the device its kind calls for, in scenario order."""
        members: list[FleetMember] = []
        entries = self.scenario.device_entries()
        self._plan_fleet(links)
        listeners = stack.enter_context(LoopbackListeners())
        for index, (device_id, profile_name) in enumerate(self.profiles.items()):
            seed = device_link_seed(self.scenario, index)
            entry = entries[device_id]
            if device_id in self.remote_links:  # run by a worker process, here or on another host
                self.device_links[device_id] = self.remote_links[device_id]
                self.metrics.add_device(device_id, profile_name, self.remote_links[device_id])
                members.append(self.worker_devices.get(device_id) or self.external_devices[device_id])
                continue
            listen_host, listen_port = (((entry.listen or "127.0.0.1"), 0) if entry.network  # a board on another host
                                        else link_listen_address(listeners, self.scenario.channel.backend,
                                                                 links.cell_of(device_id) is not None))
            try:
                link = await stack.enter_async_context(links.open(device_id, (endpoint.host, endpoint.port), seed=seed,
                                                                  listen_host=listen_host, listen_port=listen_port))
            except ChannelError as error:  # e.g. a kernel without sch_netem: one clear line, not a traceback
                raise RunError(f"channel backend {self.scenario.channel.backend!r} cannot open the link of "
                               f"{device_id}: {error}") from error
            self.device_links[device_id] = link
            self.metrics.add_device(device_id, profile_name, link)
            via = self.device_endpoint(endpoint, device_id).via(*link.address)
            members.append(self._member(entry, device_id, profile_name, index, via, links, server))
        return members

    def _member(self, entry: DeviceGroup, device_id: str, profile_name: str, index: int, via: MqttEndpoint,
                links: DeviceLinks, server: UpdateServer) -> FleetMember:
        """What stands for the device: an emulated agent, a bridge to a serial board, or a board that joins by itself
        (attached by hand, or on the network: then the run says the command that joins it)."""
        if entry.kind == "emulated":
            if self.shared_model is None:
                self.shared_model = SharedModel(server.build_device_model())
            inference = self.shared_model.for_device(server.device_test_split(index))
            return emulated_agent(self.scenario, links, device_id, profile_name, inference, self.topics, via,
                                  self.trusted_key, server.seed, self.connect_ramp)
        if entry.kind == "serial":
            assert entry.serial is not None
            board = self.run_config(server.seed).board_config(device_id)
            return SerialBridge(device_id, profile_name, entry.serial, self.topics, via,
                                board,
                                baud=entry.baud, log_path=self.out_dir / "serial" / f"{device_id}.log",
                                downlink_rate_bps=links.parameters(device_id)[0].rate_bps)
        self.external_devices[device_id] = ExternalDevice(device_id)
        waiting: dict[str, Any] = {"device": device_id, "broker": f"{via.host}:{via.port}", "run_id": self.run_id,
                                   "username": via.username}
        if entry.kind == "network":
            host = advertised_host(via.host)
            waiting.update(broker=f"{host}:{via.port}", network=True, command=device_command_line(
                host, via.port, device_id, self.run_id, self.trusted_key.text, via.username, via.tls_enabled))
        self.progress("waiting-for-board", waiting)
        return self.external_devices[device_id]

    def _plan_fleet(self, links: DeviceLinks) -> None:
        """Which emulated devices run in worker processes (`fleet.workers`) or on other hosts (`fleet.remote`)."""
        scenario = self.scenario
        remote = scenario.remote_devices()
        self.worker_shares = planned_worker_shares(scenario, os.cpu_count() or 1)
        timed = scenario.channel.backend == "proxy"
        for index, share in enumerate(self.worker_shares):
            ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            for device_id in share:
                self.worker_devices[device_id] = WorkerDevice(device_id, ended)
        for device_id in [*self.worker_devices, *remote]:
            self.remote_links[device_id] = remote_link(timed or links.cell_of(device_id) is not None)
        for device_id in remote:
            self.external_devices[device_id] = ExternalDevice(device_id)
        for selector in scenario.fleet.remote:
            self.progress("waiting-for-fleet", {"devices": selector, "run_id": self.run_id})

    async def fleet_workers(self, stack: AsyncExitStack, endpoint: MqttEndpoint) -> None:
        """Start the local worker processes (after the run's config is on the broker: they read it there) and read
        every worker's link reports; both stop when the run ends."""
        if not self.remote_links:
            return
        self.link_reports = LinkReports(endpoint, self.topics, self.remote_links)
        reader = asyncio.create_task(self.link_reports.run())
        stack.push_async_callback(_cancel_task, reader)
        if not self.worker_shares:
            return
        processes = await stack.enter_async_context(WorkerProcesses(endpoint, self.run_id, self.worker_shares,
                                                                    self.out_dir / "fleet"))
        for index, share in enumerate(self.worker_shares):
            watch = asyncio.create_task(self._watch_worker(processes, index, self.worker_devices[share[0]]))
            stack.push_async_callback(_cancel_task, watch)

    async def _watch_worker(self, processes: WorkerProcesses, index: int, device: WorkerDevice) -> None:
        code = await processes.ended(index)
        if not device.worker_ended.done():
            log_path = processes.log_path(index)
            last = last_line(log_path)
            device.worker_ended.set_result(f"fleet worker {index} exited with code {code}"
                                           + (f": {last}" if last else "") + f" (see {log_path})")

    async def refresh_remote_links(self) -> None:
        """Bring the links workers run up to date (before the run reads a round's counters and lateness)."""
        if self.link_reports is not None and not await self.link_reports.refresh():
            logger.info("not every fleet worker answered within %.0f s: its link counters may be up to %.1f s old",
                        REFRESH_WAIT_S, link_report_period_s(len(self.profiles)))

    def run_config(self, init_seed: int) -> RunConfig:
        """The retained config message: how `testbed attach` learns the run's scenario and device numbers."""
        return RunConfig(run=self.run_id, started_at=time.time(), init_seed=init_seed,
                         public_key=self.trusted_key.text,
                         scenario=scenario_without_secrets(self.scenario),
                         devices={device_id: index for index, device_id in enumerate(self.profiles)})

    async def control_connection(self, stack: AsyncExitStack, endpoint: MqttEndpoint, init_seed: int,
                                 messages: DeviceMessages) -> tuple[ControlConnection, asyncio.Task[None]]:
        """The run's own session (kept up across broker restarts, see testbed.control_connection) feeding
        `messages`, and its task; the retained run config is published now and ended when the run closes."""
        connection = ControlConnection(endpoint, f"{self.run_id}-server", messages.subscriptions, messages.take,
                                       on_connected=self._on_control_connected)
        task = await connection.start()
        stack.push_async_callback(_cancel_task, task)
        await connection.publish(self.topics.config, self.run_config(init_seed).encode(), qos=1, retain=True)
        stack.push_async_callback(_end_run_config, connection, endpoint, self.run_id, self.topics.config,
                                  EXTERNAL_GOODBYE_S if self.external_devices else 0.0)
        return connection, task

    def _on_control_connected(self, connections: int) -> None:
        if connections > 1:
            self.progress("broker-reconnected", {"reconnects": connections - 1})


async def _cancel_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


class _Publishes(Protocol):
    async def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...,
                      timeout: float = ...) -> Any: ...


async def _end_run_config(client: _Publishes, endpoint: MqttEndpoint, run_id: str, topic: str,
                          goodbye_s: float) -> None:
    """Tell `testbed attach` bridges the run is over, then delete the retained config (an empty retained payload).

    `goodbye_s` keeps the links up that long, so the message crosses the emulated links before they close.
    The whole goodbye is bounded (END_RUN_CONFIG_S more); if the run's own client has lost its connection,
    a short-lived client clears the retained config instead, so no stale config is left on the broker.
    """
    async def goodbye() -> None:
        try:
            await client.publish(topic, RunFinished().encode(), qos=1, timeout=5.0)
            await asyncio.sleep(goodbye_s)
            await client.publish(topic, b"", qos=1, retain=True, timeout=5.0)
            return
        except aiomqtt.MqttError as error:
            logger.info("the run's client could not end %s (%s); clearing it with a new connection", topic, error)
        async with endpoint.client(f"{run_id}-cleanup", timeout_s=5.0) as cleanup:
            await cleanup.publish(topic, b"", qos=1, retain=True, timeout=5.0)

    try:
        await asyncio.wait_for(goodbye(), goodbye_s + END_RUN_CONFIG_S)
    except (aiomqtt.MqttError, asyncio.TimeoutError) as error:
        logger.warning("could not clear the retained %s: %s", topic, error or "timed out")


def last_line(path: Path, tail_bytes: int = 4096) -> str:
    """The last non-empty line of a log file (from its last `tail_bytes`, at most 300 characters), or ''."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - tail_bytes))
            lines = [line.strip() for line in log.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
