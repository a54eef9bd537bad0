"""Run orchestration: broker, exporter, links, fleet and server rounds, wired together for one scenario."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from channel.errors import ChannelError
from devices.agent import DeviceAgent, DeviceConfig
from devices.board_agent import BoardConfig
from devices.fleet import EmulatedFleet, ExternalDevice, FleetMember
from devices.profiles import get_device_profile
from devices.serial_bridge import SerialBridge
from server.update_server import RoundOutcome, UpdateServer
from testbed.broker import EmbeddedBroker
from testbed.inference import TorchInference
from testbed.metrics import MetricsExporter, PushError, RunMetrics, push_metrics
from testbed.core.mqtt import BrokerConnectionError, MqttEndpoint
from testbed.publisher import UpdatePublisher
from testbed.results import ResultsWriter
from testbed.links import DeviceLinks
from testbed.core.scenario import Scenario
from testbed.core.topics import Topics
from testbed.core.wire import full_model_bytes as wire_full_model_bytes
from testbed.core.wire import weights_hash
from testbed.errors import OrchestrationError

logger = logging.getLogger("testbed.runner")

ONLINE_TIMEOUT_S = 60.0
EXTERNAL_ONLINE_TIMEOUT_S = 600.0  # someone has to start `testbed attach` by hand
EXTERNAL_GOODBYE_S = 3.0  # at the end, time for "finished" to reach `testbed attach` bridges through their links
MAX_CATCH_UPS_PER_ROUND = 3

ProgressCallback = Callable[[str, dict[str, Any]], None]


class RunError(OrchestrationError):
    """A run that could not complete (devices missing, a broker that went away, ...)."""


@dataclass
class RoundRecord:
    """The server's side of one round, as kept in summary.json."""

    round: int
    version: int
    sent: bool
    base_version: int | None
    reinitialised: bool
    server_accuracy: float
    validation_accuracy: float
    update_bytes: int
    full_model_bytes: int
    index_bits: int
    selected_weights: int | None
    partial_weights: int
    training_samples: int
    training_seconds: float
    round_seconds: float = 0.0
    devices_updated: int = 0


@dataclass
class RunResult:
    """Where the results went and what they say."""

    out_dir: Path
    summary: dict[str, Any]
    metrics_url: str | None = None
    rounds: list[RoundRecord] = field(default_factory=list)


def derived_seed(seed: int, *stream: int) -> int:
    """A 32-bit seed for one consumer, derived from the scenario seed."""
    return int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0])


def new_run_id(scenario: Scenario) -> str:
    return f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class _DeviceMessages:
    """Reports and nacks from devices, read off the control client into queues."""

    def __init__(self, topics: Topics, on_status: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        self.topics = topics
        self.on_status = on_status
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.nacks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def pump(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            parsed = self.topics.parse_device_topic(str(message.topic))
            if parsed is None:
                continue
            device_id, kind = parsed
            try:
                body = json.loads(bytes(message.payload))
            except (UnicodeDecodeError, json.JSONDecodeError):
                logger.warning("ignoring malformed %s message from %s", kind, device_id)
                continue
            if not isinstance(body, dict):
                continue
            body["device"] = device_id
            if kind == "report":
                await self.reports.put(body)
            elif kind == "nack":
                await self.nacks.put(body)
            elif kind == "status" and self.on_status is not None:
                self.on_status(device_id, body)


class ScenarioRun:
    """One run of a scenario; `execute()` does it all and returns the results."""

    def __init__(self, scenario: Scenario, out_dir: Path, progress: ProgressCallback | None = None) -> None:
        self.scenario = scenario
        self.out_dir = Path(out_dir)
        self.progress = progress or (lambda event, data: None)
        self.run_id = new_run_id(scenario)
        self.topics = Topics(self.run_id)
        self.profiles = scenario.device_profiles()
        self.metrics = RunMetrics(self.run_id, scenario.update.strategy, scenario.name, scenario.update.ratio)
        self.rounds: list[RoundRecord] = []
        self.device_state: dict[str, dict[str, Any]] = {
            device_id: {"profile": profile, "final_version": 0, "final_accuracy": None, "energy_joules": 0.0,
                        "bytes_received": 0, "weights_hash": None, "rounds_missed": 0}
            for device_id, profile in self.profiles.items()
        }
        self.external_devices: dict[str, ExternalDevice] = {}
        self.boards_seen_online: set[str] = set()
        self.board_devices = [device_id for device_id, entry in scenario.device_entries().items()
                              if entry.kind != "emulated"]
        self.metrics_url: str | None = None
        self.pushes = 0
        self.push_errors: list[str] = []

    async def execute(self) -> RunResult:
        scenario = self.scenario
        self.progress("preparing", {"run_id": self.run_id})
        server = await asyncio.to_thread(UpdateServer, scenario)
        links = DeviceLinks(scenario.channel, scenario.seed)
        downlink, uplink = links.default
        async with AsyncExitStack() as stack:
            results = stack.enter_context(ResultsWriter(self.out_dir))
            results.write_scenario(scenario)
            endpoint = await self._broker(stack)
            if scenario.metrics.enabled:
                exporter = await stack.enter_async_context(
                    MetricsExporter(self.metrics.registry, scenario.metrics.host, scenario.metrics.port)
                )
                self.metrics_url = exporter.url
            agents: list[FleetMember] = []
            entries = scenario.device_entries()
            for index, (device_id, profile_name) in enumerate(self.profiles.items()):
                try:
                    link = await stack.enter_async_context(links.open(
                        device_id, (endpoint.host, endpoint.port), seed=derived_seed(scenario.seed, 1, index)))
                except ChannelError as error:  # e.g. a kernel without sch_netem: one clear line, not a traceback
                    raise RunError(f"channel backend {scenario.channel.backend!r} cannot open the link of "
                                   f"{device_id}: {error}") from error
                self.metrics.add_device(device_id, profile_name, link)
                entry = entries[device_id]
                if entry.kind == "emulated":
                    inference = TorchInference(server.build_device_model(), server.device_test_split(index))
                    device_downlink, device_uplink = links.parameters(device_id)
                    config = DeviceConfig(device_id, get_device_profile(profile_name), device_downlink.rate_bps,
                                          device_uplink.rate_bps, init_seed=server.seed)
                    agents.append(DeviceAgent(config, self.topics, endpoint.via(*link.address), inference))
                elif entry.kind == "serial":
                    assert entry.serial is not None
                    agents.append(SerialBridge(
                        device_id, profile_name, entry.serial, self.topics, endpoint.via(*link.address),
                        self._board_config(device_id, index, server.seed), baud=entry.baud,
                        log_path=self.out_dir / "serial" / f"{device_id}.log"))
                else:
                    self.external_devices[device_id] = ExternalDevice(device_id)
                    agents.append(self.external_devices[device_id])
                    self.progress("waiting-for-board", {"device": device_id, "broker": f"{link.address[0]}:{link.address[1]}",
                                                        "run_id": self.run_id})
            control = await stack.enter_async_context(endpoint.client(f"{self.run_id}-server"))
            await control.publish(self.topics.config, json.dumps(self._run_config(server.seed)), qos=1, retain=True)
            stack.push_async_callback(_end_run_config, control, self.topics.config,
                                      EXTERNAL_GOODBYE_S if self.external_devices else 0.0)
            messages = _DeviceMessages(self.topics, self._record_status)
            await control.subscribe(self.topics.devices("status"), qos=1)
            await control.subscribe(self.topics.devices("report"), qos=1)
            await control.subscribe(self.topics.devices("nack"), qos=1)
            pump = asyncio.create_task(messages.pump(control), name="device-messages")
            stack.push_async_callback(_cancel, pump)
            fleet = await stack.enter_async_context(EmulatedFleet(agents))
            self.progress("starting", {"devices": len(agents), "broker": f"{endpoint.host}:{endpoint.port}",
                                       "metrics": self.metrics_url, "downlink": downlink.description, "uplink": uplink.description,
                                       "rounds": server.rounds})
            await fleet.wait_online(EXTERNAL_ONLINE_TIMEOUT_S if self.external_devices else ONLINE_TIMEOUT_S)
            publisher = UpdatePublisher(control, self.topics, scenario.update.chunk_size, server.initial_weights)
            for round_index in range(server.rounds):
                await self._round(round_index, server, publisher, messages, fleet, pump, results)
            summary = self._summary(server, publisher)
            results.write_summary(summary)
        return RunResult(self.out_dir, summary, self.metrics_url, self.rounds)

    async def _broker(self, stack: AsyncExitStack) -> MqttEndpoint:
        spec = self.scenario.broker
        if spec.embedded:
            broker = await stack.enter_async_context(EmbeddedBroker())
            return MqttEndpoint(broker.host, broker.port)
        endpoint = MqttEndpoint.from_spec(spec, spec.host, spec.port)
        try:
            await endpoint.check_connection(f"{self.run_id}-check")
        except BrokerConnectionError as error:
            raise RunError(f"cannot connect to broker {spec.url}: {error.reason}") from error
        return endpoint

    async def _round(self, round_index: int, server: UpdateServer, publisher: UpdatePublisher,
                     messages: _DeviceMessages, fleet: EmulatedFleet, pump: asyncio.Task[None],
                     results: ResultsWriter) -> None:
        self.progress("training", {"round": round_index})
        outcome: RoundOutcome = await asyncio.to_thread(server.run_round, round_index)
        started = time.monotonic()
        full_model_bytes = wire_full_model_bytes(outcome.weights)
        reports: dict[str, dict[str, Any]] = {}
        update_bytes = index_bits = 0
        if outcome.sent:
            published = await publisher.publish_version(round_index, outcome.version, outcome.weights,
                                                        outcome.base_version, outcome.payload)
            update_bytes, index_bits = published.payload_bytes, published.index_bits
            self.metrics.record_published(update_bytes)
            self.progress("publishing", {"round": round_index, "version": outcome.version,
                                         "update_bytes": update_bytes, "full_model_bytes": full_model_bytes})
            reports = await self._collect_reports(round_index, outcome.version, publisher, messages, fleet, pump)
        else:
            self.progress("skipped", {"round": round_index, "version": outcome.version,
                                      "validation_accuracy": outcome.validation_accuracy})
        self.metrics.record_round(round_index, outcome.version, outcome.server_accuracy, update_bytes, full_model_bytes,
                                  index_bits)
        expected_hash = weights_hash(outcome.weights).hex()
        for device_id, profile in self.profiles.items():
            record = self._device_record(round_index, outcome, device_id, profile, reports.get(device_id), expected_hash)
            results.append_record(record)
        record = RoundRecord(
            round=round_index, version=outcome.version, sent=outcome.sent, base_version=outcome.base_version,
            reinitialised=outcome.reinitialised, server_accuracy=outcome.server_accuracy,
            validation_accuracy=outcome.validation_accuracy, update_bytes=update_bytes,
            full_model_bytes=full_model_bytes, index_bits=index_bits, selected_weights=outcome.selected,
            partial_weights=outcome.partial_count, training_samples=outcome.training_samples,
            training_seconds=outcome.seconds, round_seconds=time.monotonic() - started, devices_updated=len(reports),
        )
        self.rounds.append(record)
        self.progress("round", {"record": record, "reports": reports})
        await self._push_metrics()

    async def _push_metrics(self) -> None:
        """Push to the scenario's Pushgateway, if any; a failure is logged, counted and reported, not fatal."""
        url = self.scenario.metrics.pushgateway
        if url is None:
            return
        try:
            await asyncio.to_thread(push_metrics, self.metrics.registry, url, self.run_id)
            self.pushes += 1
        except PushError as error:
            logger.warning("%s", error)
            self.push_errors.append(str(error))
            self.progress("push-failed", {"error": str(error)})

    async def _collect_reports(self, round_index: int, version: int, publisher: UpdatePublisher,
                               messages: _DeviceMessages, fleet: EmulatedFleet,
                               pump: asyncio.Task[None]) -> dict[str, dict[str, Any]]:
        """Wait until every device reports `version`, serving catch-ups to those that nack."""
        deadline = time.monotonic() + self.scenario.round_timeout_s
        reports: dict[str, dict[str, Any]] = {}
        catch_ups: dict[str, int] = {}
        while len(reports) < len(self.profiles):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            report_wait = asyncio.create_task(messages.reports.get())
            nack_wait = asyncio.create_task(messages.nacks.get())
            done, _ = await asyncio.wait({report_wait, nack_wait, pump}, timeout=min(remaining, 1.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in (report_wait, nack_wait):
                if task not in done:
                    task.cancel()
            if pump in done:
                raise RunError(f"lost the connection to the broker: {pump.exception()!r}")
            fleet.raise_if_failed()
            if report_wait in done:
                report = report_wait.result()
                if report.get("device") in self.profiles and report.get("version") == version:
                    reports[report["device"]] = report
                    self.progress("device", {"round": round_index, "report": report})
            if nack_wait in done:
                nack = nack_wait.result()
                device_id = nack.get("device")
                if device_id not in self.profiles or device_id in reports:
                    continue
                held = nack.get("version")
                held = held if isinstance(held, int) and not isinstance(held, bool) else -1
                if held >= version or held < self.device_state[device_id]["final_version"]:
                    continue  # stale: the device has moved on since it sent this nack
                self.metrics.record_nack(device_id, self.profiles[device_id])
                if catch_ups.get(device_id, 0) >= MAX_CATCH_UPS_PER_ROUND:
                    logger.warning("device %s keeps rejecting version %s: %s", device_id, version, nack.get("reason"))
                    continue
                catch_ups[device_id] = catch_ups.get(device_id, 0) + 1
                catch_up = await publisher.publish_catch_up(round_index, device_id, held)
                self.metrics.record_published(catch_up.payload_bytes)
                self.progress("catch-up", {"round": round_index, "device": device_id, "from": held,
                                           "bytes": catch_up.payload_bytes, "reason": nack.get("reason")})
        return reports

    def _record_status(self, device_id: str, status: dict[str, Any]) -> None:
        if device_id in self.profiles and isinstance(status.get("online"), bool):
            self.metrics.record_online(device_id, self.profiles[device_id], status["online"])
            if device_id in self.external_devices:
                self.external_devices[device_id].set_online(status["online"])
            if device_id in self.board_devices and (status["online"] or device_id in self.boards_seen_online):
                self.boards_seen_online.add(device_id)  # "offline" before the board was ever ready is no news
                self.progress("board-status", {"device": device_id, "online": status["online"]})

    def _scenario_data(self) -> dict[str, Any]:
        return self.scenario.model_dump(mode="json", by_alias=True, exclude_none=True)

    def _board_config(self, device_id: str, index: int, init_seed: int) -> BoardConfig:
        """What a board taking part as `device_id` needs to build its model and local test split."""
        return BoardConfig(self.run_id, device_id, index, init_seed, self._scenario_data())

    def _run_config(self, init_seed: int) -> dict[str, Any]:
        """The retained config message: how `testbed attach` learns the run's scenario and device numbers."""
        return {"run": self.run_id, "started_at": time.time(), "init_seed": init_seed, "scenario": self._scenario_data(),
                "devices": {device_id: index for index, device_id in enumerate(self.profiles)}}

    def _device_record(self, round_index: int, outcome: RoundOutcome, device_id: str, profile: str,
                       report: dict[str, Any] | None, expected_hash: str) -> dict[str, Any]:
        state = self.device_state[device_id]
        record: dict[str, Any] = {"run": self.run_id, "round": round_index, "device": device_id, "profile": profile,
                                  "server_version": outcome.version, "update_sent": outcome.sent,
                                  "delivered": report is not None}
        if report is None:
            if outcome.sent:
                state["rounds_missed"] += 1
            return record
        self.metrics.record_device_report(report, state["bytes_received"])
        state.update(final_version=report["version"], final_accuracy=report["accuracy"],
                     energy_joules=report["total_energy_joules"], bytes_received=report["total_received_bytes"],
                     weights_hash=report["weights_hash"])
        record.update({
            key: report[key] for key in (
                "version", "accuracy", "energy_joules", "energy_joules_by_phase", "phase_seconds",
                "delivery_seconds", "received_bytes", "transmitted_bytes", "update_bytes",
                "apply_seconds", "evaluate_seconds", "weights_hash", "rejected_updates",
            )
        })
        record["hash_matches_server"] = report["weights_hash"] == expected_hash
        return record

    def _summary(self, server: UpdateServer, publisher: UpdatePublisher) -> dict[str, Any]:
        final_hash = weights_hash(publisher.versions[publisher.latest_version]).hex()
        return {
            "scenario": self.scenario.name,
            "run_id": self.run_id,
            "seed": self.scenario.seed,
            "strategy": self.scenario.update.strategy,
            "ratio": self.scenario.update.ratio,
            "rounds": [vars(record) for record in self.rounds],
            "devices": {
                device_id: {**state, "hash_matches_server": state["weights_hash"] == final_hash}
                for device_id, state in self.device_state.items()
            },
            "pushgateway": None if self.scenario.metrics.pushgateway is None else {
                "url": self.scenario.metrics.pushgateway, "pushes": self.pushes, "errors": self.push_errors,
            },
            "server": {
                "final_version": publisher.latest_version,
                "final_accuracy": self.rounds[-1].server_accuracy if self.rounds else None,
                "weights_hash": final_hash,
                "published_bytes": publisher.published_bytes,
            },
        }


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, aiomqtt.MqttError):
        pass


async def _end_run_config(client: aiomqtt.Client, topic: str, goodbye_s: float) -> None:
    """Tell `testbed attach` bridges the run is over, then delete the retained config (an empty retained payload).

    `goodbye_s` keeps the links up that long, so the message crosses the emulated links before they close.
    """
    try:
        await client.publish(topic, b'{"finished": true}', qos=1, timeout=5.0)
        await asyncio.sleep(goodbye_s)
        await client.publish(topic, b"", qos=1, retain=True, timeout=5.0)
    except aiomqtt.MqttError as error:
        logger.warning("could not clear the retained %s: %s", topic, error)


async def run_scenario(scenario: Scenario, out_dir: Path, progress: ProgressCallback | None = None) -> RunResult:
    """Run a scenario end to end and write its results to `out_dir`."""
    return await ScenarioRun(scenario, out_dir, progress).execute()
