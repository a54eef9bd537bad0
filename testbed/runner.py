"""Run orchestration: one scenario's rounds (train, publish, collect, record) on the wiring of testbed.run_assembly."""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from devices.fleet import EmulatedFleet
from server.update_server import RoundOutcome, UpdateServer
from testbed.core.events import Phase
from testbed.core.messages import DeviceReport, DeviceStatus
from testbed.core.scenario import Scenario
from testbed.core.signing import SigningKey
from testbed.core.topics import Topics
from testbed.core.wire import full_model_bytes as wire_full_model_bytes
from testbed.core.wire import weights_hash
from testbed.links import DeviceLinks
from testbed.metrics import PushError, RunMetrics, push_metrics
from testbed.preflight import check_ports, check_scenario, raise_open_files_limit
from testbed.publisher import UpdatePublisher
from testbed.report_collector import DeviceMessages, ReportCollector
from testbed.results import ResultsWriter, keep_records_before
from testbed.run_checkpoint import RunCheckpoint, scenario_digest
from testbed.event_actions import register_actions
from testbed.run_assembly import RunAssembly
from testbed.run_events import RunEvents
from testbed.run_summary import RoundRecord, RunError, RunRecords, RunResult, host_facts
from testbed.server_restart import ServerRestarts
from testbed.timing_report import LoopLagProbe, RunTiming

__all__ = ["ProgressCallback", "RoundRecord", "RunError", "RunResult", "ScenarioRun", "new_run_id", "run_scenario"]

logger = logging.getLogger("testbed.runner")

ONLINE_TIMEOUT_S = 60.0
ONLINE_TIMEOUT_PER_DEVICE_S = 0.1
EXTERNAL_ONLINE_TIMEOUT_S = 600.0  # someone has to start `testbed attach` by hand


def online_timeout_s(devices: int) -> float:
    """How long the run waits for its emulated fleet to connect: 60 s, and 0.1 s more per device beyond 100
    (a thousand devices connecting at once on two cores took tens of seconds: a fixed 60 s was too short)."""
    return ONLINE_TIMEOUT_S + ONLINE_TIMEOUT_PER_DEVICE_S * max(0, devices - 100)

ProgressCallback = Callable[[str, dict[str, Any]], None]


def new_run_id(scenario: Scenario) -> str:
    return f"{scenario.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class ScenarioRun:
    """One run of a scenario; `execute()` does it all and returns the results."""

    def __init__(self, scenario: Scenario, out_dir: Path, progress: ProgressCallback | None = None,
                 signing_key: SigningKey | None = None, resume: RunCheckpoint | None = None) -> None:
        self.scenario = scenario
        self.resume = resume
        """The checkpoint of the run this one continues (`testbed run --resume`), or None for a new run."""
        self.scenario_digest = scenario_digest(scenario)
        """What this run's checkpoints belong to (testbed.run_checkpoint)."""
        self.signing_key = signing_key or SigningKey.generate()
        """Signs every manifest of the run; devices get its public half with their configuration."""
        self.out_dir = Path(out_dir)
        self.progress = progress or (lambda event, data: None)
        self.run_id = new_run_id(scenario) if resume is None else resume.run_id
        self.topics = Topics(self.run_id)
        self.profiles = scenario.device_profiles()
        self.metrics = RunMetrics(self.run_id, scenario.update.strategy, scenario.name, scenario.update.ratio)
        self.records = RunRecords(scenario, self.run_id, self.profiles)
        if resume is not None:
            self.records.restore(resume.records)
        self.assembly = RunAssembly(scenario, self.run_id, self.out_dir, self.metrics, self._progress,
                                    self.signing_key.trusted_key)
        self.boards_seen_online: set[str] = set()
        self.board_devices = [device_id for device_id, entry in scenario.device_entries().items()
                              if entry.kind != "emulated"]
        self.events: RunEvents | None = None
        """The scenario's events (testbed.run_events), from when every device is online to the end of the run."""
        self.current_round: int | None = None
        self.timing: RunTiming | None = None
        """How late the links and the event loop were, per round (testbed.timing_report); set once devices are up."""
        self.stop_requested = asyncio.Event()
        """Set by Ctrl-C (or `request_stop`): the round in progress ends, the summary is written, the run returns."""
        self.round_interrupted = asyncio.Event()
        """Set by a stop or a server restart: the wait for reports in progress ends within a second."""
        self.server_restarts: ServerRestarts | None = None
        """The `server_restart` event's restarts (testbed.server_restart); set once devices are up."""

    def request_stop(self) -> None:
        """End the run after the round in progress (its wait for reports ends within a second)."""
        if not self.stop_requested.is_set():
            self.stop_requested.set()
            self.round_interrupted.set()
            self.progress("interrupting", {})

    @property
    def metrics_url(self) -> str | None:
        return self.assembly.metrics_url

    @property
    def rounds(self) -> list[RoundRecord]:
        return self.records.rounds

    def _progress(self, event: str, data: dict[str, Any]) -> None:
        self.progress(event, data)  # looked up on each event: callers may set `progress` after construction
        if event == "device" and data.get("round") == self.current_round:
            self._phase_reached(data["round"], "report")  # the round's first report: its report phase

    def _phase_reached(self, round_index: int, phase: Phase) -> None:
        if self.events is not None:
            self.events.phase_reached(round_index, phase)

    async def execute(self) -> RunResult:
        """Run every round (or until a stop is requested); a first Ctrl-C requests the stop, a second one aborts."""
        loop = asyncio.get_running_loop()
        handles_sigint = threading.current_thread() is threading.main_thread()
        if handles_sigint:
            def on_sigint() -> None:
                loop.remove_signal_handler(signal.SIGINT)  # a second Ctrl-C is a KeyboardInterrupt, as usual
                self.request_stop()

            loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            return await self._execute()
        finally:
            if handles_sigint:
                loop.remove_signal_handler(signal.SIGINT)

    async def _execute(self) -> RunResult:
        started_at, started = time.time(), time.monotonic()
        scenario = check_scenario(self.scenario)
        check_ports(scenario)
        raise_open_files_limit(scenario)
        assembly = self.assembly
        self.progress("preparing", {"run_id": self.run_id})
        server = await asyncio.to_thread(UpdateServer, scenario)
        if self.resume is not None:
            server.restore(self.resume.server)
            keep_records_before(self.out_dir / "results.jsonl", server.next_round)
        links = DeviceLinks(scenario.channel, scenario.seed)
        downlink, uplink = links.default
        async with AsyncExitStack() as stack:
            results = stack.enter_context(ResultsWriter(self.out_dir))
            results.write_scenario(scenario)
            endpoint = await assembly.broker(stack)
            await assembly.exporter(stack)
            members = await assembly.fleet_members(stack, endpoint, links, server)
            messages = DeviceMessages(self.topics, self._record_status)
            stack.push_async_callback(self._close_restarted_session)  # after the session's own goodbye
            control, pump = await assembly.control_connection(stack, endpoint, server.seed, messages)
            await assembly.fleet_workers(stack, endpoint)
            fleet = await stack.enter_async_context(EmulatedFleet(members))
            self.progress("starting", {"devices": len(members), "broker": f"{endpoint.host}:{endpoint.port}",
                                       "signing_key": self.signing_key.trusted_key.text,
                                       "metrics": self.metrics_url, "downlink": downlink.description,
                                       "uplink": uplink.description, "rounds": server.rounds})
            await fleet.wait_online(EXTERNAL_ONLINE_TIMEOUT_S if assembly.external_devices
                                    else online_timeout_s(len(members)))
            self.timing = timing = RunTiming(assembly.device_links, await stack.enter_async_context(LoopLagProbe()))
            self.events = await stack.enter_async_context(RunEvents(
                scenario, self.out_dir, self.metrics, self._progress,
                resumed_round=server.next_round if self.resume is not None else None))
            self.server_restarts = ServerRestarts(scenario, self.out_dir, control, pump, messages, self._progress,
                                                  self.round_interrupted)
            presence = register_actions(self.events, scenario, assembly.embedded_broker, fleet,
                                        assembly.device_links, self.server_restarts)
            publisher = UpdatePublisher(control, self.topics, scenario.update.chunk_size, self.signing_key,
                                        server.initial_weights)
            collector = ReportCollector(messages, pump, fleet, publisher, self.metrics, self.profiles,
                                        self.records.held_version, scenario.round_timeout_s, self._progress,
                                        note_report=self._note_report, stop=self.round_interrupted,
                                        control=control, presence=presence)
            if self.resume is not None:
                publisher.restore(self.resume.publisher)
                await self._catch_up_resumed_devices(server.next_round - 1, publisher, collector)
            for round_index in range(server.next_round, server.rounds):
                if self.stop_requested.is_set():
                    break
                server = await self._round(round_index, server, publisher, collector, results)
            collector.drain_reports()
            final_hash = weights_hash(publisher.versions[publisher.latest_version]).hex()
            summary = self.records.summary(publisher.latest_version, final_hash, publisher.published_bytes,
                                           interrupted=self.stop_requested.is_set(), rounds_planned=server.rounds)
            summary["host"] = host_facts(started_at, time.monotonic() - started)
            timing.add_to_summary(summary)
            results.write_summary(summary)
        return RunResult(self.out_dir, summary, self.metrics_url, self.records.rounds)

    async def _round(self, round_index: int, server: UpdateServer, publisher: UpdatePublisher,
                     collector: ReportCollector, results: ResultsWriter) -> UpdateServer:
        """Run, publish, collect and record one round; the server it ends on (a restarted one after server_restart)."""
        server, outcome = await self._train(round_index, server, collector)
        if self.stop_requested.is_set():
            return server  # stopped while training: this round's result is neither sent nor recorded
        started = time.monotonic()
        self.current_round = round_index
        assert self.timing is not None
        await self.assembly.refresh_remote_links()
        self.timing.start_round()
        full_model_bytes = wire_full_model_bytes(outcome.weights)
        reports: dict[str, DeviceReport] = {}
        update_bytes = index_bits = 0
        if outcome.sent:
            update_bytes, index_bits = await self._publish(round_index, outcome, publisher, full_model_bytes)
            reports = await collector.collect(round_index, outcome.version)
            while self.server_restarts is not None and self.server_restarts.requested:
                # The server restarted in the round: it is repeated on the restored server (the same outcome, as
                # rounds are deterministic under the seed); the reports so far stand, the others are awaited.
                server, outcome = await self._train(round_index, server, collector)
                if self.stop_requested.is_set():
                    break
                await self._publish(round_index, outcome, publisher, full_model_bytes)
                remaining = [device_id for device_id in self.profiles if device_id not in reports]
                reports.update(await self._collect_from(collector, remaining, round_index, outcome.version))
            self._phase_reached(round_index, "report")  # also when no device reported
        else:
            self._phase_reached(round_index, "report")  # nothing to publish: the round passes its phases
            self.progress("skipped", {"round": round_index, "version": outcome.version,
                                      "validation_accuracy": outcome.validation_accuracy})
        await self.assembly.refresh_remote_links()
        timing = self.timing.end_round()
        self.metrics.record_round(round_index, outcome.version, outcome.server_accuracy, update_bytes, full_model_bytes,
                                  index_bits)
        self.metrics.record_round_timing(timing.lateness, timing.loop_lag, timing.faithful)
        expected_hash = weights_hash(outcome.weights).hex()
        for device_id in self.profiles:
            report = reports.get(device_id)
            if report is not None:
                self.metrics.record_device_report(report, self.records.devices[device_id].bytes_received)
            results.append_record({**self.records.device_record(round_index, outcome, device_id, report, expected_hash),
                                   "timing_faithful": timing.faithful})
        record = RoundRecord(
            round=round_index, version=outcome.version, sent=outcome.sent, base_version=outcome.base_version,
            reinitialised=outcome.reinitialised, server_accuracy=outcome.server_accuracy,
            validation_accuracy=outcome.validation_accuracy, update_bytes=update_bytes,
            full_model_bytes=full_model_bytes, index_bits=index_bits, selected_weights=outcome.selected,
            partial_weights=outcome.partial_count, training_samples=outcome.training_samples,
            training_seconds=outcome.seconds, round_seconds=time.monotonic() - started, devices_updated=len(reports),
            timing=timing.to_dict(),
        )
        self.records.rounds.append(record)
        checkpoint = RunCheckpoint(self.run_id, self.scenario_digest, server.checkpoint_state(),
                                   publisher.checkpoint_state(), self.records.to_saveable())
        await asyncio.to_thread(checkpoint.save, self.out_dir)
        self.progress("round", {"record": record, "reports": {device: report.to_dict()
                                                              for device, report in reports.items()}})
        warning = timing.warning(f"round {round_index}")
        if warning is not None:
            logger.info("%s", warning)
            self.progress("warning", {"message": warning})
        await self._push_metrics()
        return server

    async def _close_restarted_session(self) -> None:
        if self.server_restarts is not None:
            await self.server_restarts.close()

    async def _train(self, round_index: int, server: UpdateServer,
                     collector: ReportCollector) -> tuple[UpdateServer, RoundOutcome]:
        """Train round `round_index`; a server restart asked for before or meanwhile is performed first (a new
        server from the last checkpoint, the session reconnected) and the round trained again on it."""
        restarts = self.server_restarts
        while True:
            if restarts is not None and restarts.requested:
                server = await restarts.perform(round_index)
                collector.pump = restarts.pump
                if not self.stop_requested.is_set():
                    self.round_interrupted.clear()
            self.progress("training", {"round": round_index})
            outcome: RoundOutcome = await asyncio.to_thread(server.run_round, round_index)
            if restarts is None or not restarts.requested or self.stop_requested.is_set():
                return server, outcome

    async def _publish(self, round_index: int, outcome: RoundOutcome, publisher: UpdatePublisher,
                       full_model_bytes: int) -> tuple[int, int]:
        """Publish the round's update (its publish and delivery phases); its payload bytes and index bits."""
        self._phase_reached(round_index, "publish")
        published = await publisher.publish_version(round_index, outcome.version, outcome.weights,
                                                    outcome.base_version, outcome.payload)
        self.metrics.record_published(published.payload_bytes)
        self.progress("publishing", {"round": round_index, "version": outcome.version,
                                     "update_bytes": published.payload_bytes, "full_model_bytes": full_model_bytes})
        self._phase_reached(round_index, "delivery")
        return published.payload_bytes, published.index_bits

    async def _collect_from(self, collector: ReportCollector, device_ids: list[str], round_index: int,
                            version: int) -> dict[str, DeviceReport]:
        """Wait for the reports of `version` from `device_ids` only (the others reported already, or cannot)."""
        waiting = copy.copy(collector)
        waiting.profiles = {device_id: self.profiles[device_id] for device_id in device_ids}
        return await waiting.collect(round_index, version)

    async def _catch_up_resumed_devices(self, round_index: int, publisher: UpdatePublisher,
                                        collector: ReportCollector) -> None:
        """A resumed run's emulated devices are fresh, on w⁰: each gets a catch-up to the deployed version (what a
        device that nacked from w⁰ would get), and the run waits for their reports before its next round."""
        version = publisher.latest_version
        emulated = {device_id: profile for device_id, profile in self.profiles.items()
                    if device_id not in self.board_devices}
        if version == 0 or not emulated:
            return
        for device_id in emulated:
            catch_up = await publisher.publish_catch_up(round_index, device_id, 0)
            self.metrics.record_published(catch_up.payload_bytes)
            self.progress("catch-up", {"round": round_index, "device": device_id, "from": 0,
                                       "bytes": catch_up.payload_bytes,
                                       "reason": "the run resumed from its checkpoint"})
        await self._collect_from(collector, list(emulated), round_index, version)

    async def _push_metrics(self) -> None:
        """Push to the scenario's Pushgateway, if any; a failure is logged, counted and reported, not fatal."""
        url = self.scenario.metrics.pushgateway
        if url is None:
            return
        try:
            await asyncio.to_thread(push_metrics, self.metrics.registry, url, self.run_id)
            self.records.pushgateway.pushes += 1
        except PushError as error:
            logger.warning("%s", error)
            self.records.pushgateway.errors.append(str(error))
            self.progress("push-failed", {"error": str(error)})

    def _note_report(self, report: DeviceReport) -> None:
        """Any report of a known device: its latest standing and its refusals by reason."""
        self.records.note_report(report)
        self.metrics.record_rejections(report)

    def _record_status(self, device_id: str, status: DeviceStatus) -> None:
        if device_id not in self.profiles:
            return
        self.metrics.record_online(device_id, self.profiles[device_id], status.online)
        external = self.assembly.external_devices.get(device_id) or self.assembly.worker_devices.get(device_id)
        if external is not None:
            external.set_online(status.online)
        if device_id in self.board_devices and (status.online or device_id in self.boards_seen_online):
            self.boards_seen_online.add(device_id)  # "offline" before the board was ever ready is no news
            self.progress("board-status", {"device": device_id, "online": status.online})


async def run_scenario(scenario: Scenario, out_dir: Path, progress: ProgressCallback | None = None,
                       signing_key: SigningKey | None = None, resume: RunCheckpoint | None = None) -> RunResult:
    """Run a scenario end to end and write its results to `out_dir` (updates signed with a fresh key unless given);
    with `resume` (testbed.run_checkpoint.read_resumable), continue that run after its last checkpointed round."""
    return await ScenarioRun(scenario, out_dir, progress, signing_key, resume).execute()
