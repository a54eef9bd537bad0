"""Device messages in, per round: wait for every device's report of a version, serving catch-ups to those that nack."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiomqtt

from devices.fleet import EmulatedFleet
from testbed.control_connection import ControlConnection
from testbed.core.messages import (DeviceNack, DeviceReport, DeviceStatus, MessageError, ReportRequest,
                                   decode_device_message)
from testbed.core.topics import Topics
from testbed.metrics import RunMetrics
from testbed.publisher import UpdatePublisher
from testbed.run_summary import RunError

logger = logging.getLogger("testbed.runner")

MAX_CATCH_UPS_PER_ROUND = 3
"""A device's catch-ups in one round, at most (one per version it held, connection it nacked from and repair it
asked for)."""
DEVICE_MESSAGE_KINDS = ("status", "report", "nack")
"""What the run reads from its devices (hello is for people watching the broker)."""

REPORT_REQUEST_TIMEOUT_S = 5.0
"""How long the run tries to publish a report request before it tries again (at the next check, within a second)."""

ProgressCallback = Callable[[str, dict[str, Any]], None]


class FleetPresence(Protocol):
    """Who is part of the run (testbed.device_actions.DeviceDowntime): a round waits only for those who are."""

    def out_of_run(self, device_id: str, until_s: float) -> bool:
        """Whether `device_id` stays out of the run through `until_s` (time.monotonic): it left and has not joined
        again, or it is down with its return due after `until_s`."""


class EveryoneIn:
    """A fleet nobody leaves (no events act on devices): every device is waited for."""

    def out_of_run(self, device_id: str, until_s: float) -> bool:
        return False


StatusCallback = Callable[[str, DeviceStatus], None]
ReportCallback = Callable[[DeviceReport], None]


@dataclass(frozen=True)
class ServedNack:
    """What a nack asked for: a catch-up from `held`, over connection `session` (None: unsaid), for repair `repair`
    (0: none asked; DeviceNack.repair)."""

    held: int
    session: int | None
    repair: int

    def answered_by(self, earlier: ServedNack) -> bool:
        """Whether the catch-up served for `earlier` answers this too: the same held version, from no newer a
        connection (either unsaid counts as the same) and no later a repair."""
        same_session = self.session is None or earlier.session is None or self.session <= earlier.session
        return self.held == earlier.held and same_session and self.repair <= earlier.repair


class DeviceMessages:
    """Reports and nacks from devices, handed over one by one (`take`, by the run's control connection) into
    queues; statuses go to a callback.

    The device named by the topic is the sender (it overrides what the message says); a message that does
    not decode costs only itself: it is logged and dropped.
    """

    def __init__(self, topics: Topics, on_status: StatusCallback | None = None) -> None:
        self.topics = topics
        self.on_status = on_status
        self.reports: asyncio.Queue[DeviceReport] = asyncio.Queue()
        self.nacks: asyncio.Queue[DeviceNack] = asyncio.Queue()
        self.malformed_messages = 0
        self.failed_messages = 0

    @property
    def subscriptions(self) -> list[str]:
        """The topics the run reads its devices' messages from."""
        return [self.topics.devices(kind) for kind in DEVICE_MESSAGE_KINDS]

    async def take(self, topic: str, payload: bytes) -> None:
        """One message from the broker; whatever handling it raises costs only this message."""
        try:
            await self._take(topic, payload)
        except Exception:  # noqa: BLE001 — one message the run cannot handle must not end the run
            self.failed_messages += 1
            logger.exception("dropped a message on %.200s that failed to be handled", topic)

    async def _take(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_device_topic(topic)
        if parsed is None or parsed[1] not in DEVICE_MESSAGE_KINDS:
            return
        device_id, kind = parsed
        try:
            body = decode_device_message(kind, payload)
        except MessageError as error:
            self.malformed_messages += 1
            logger.warning("ignoring a malformed %s message from %.80s: %s", kind, device_id, str(error)[:300])
            return
        if isinstance(body, DeviceReport):
            await self.reports.put(body.model_copy(update={"device": device_id}))
        elif isinstance(body, DeviceNack):
            await self.nacks.put(body.model_copy(update={"device": device_id}))
        elif isinstance(body, DeviceStatus) and self.on_status is not None:
            self.on_status(device_id, body)


class ReportCollector:
    """One round's wait for reports: accepts each device's report of the version sent, answers nacks with catch-ups.

    Every report of a known device, of whatever version, goes to `note_report` first: what a device last said
    it holds is its state in the results. Repair traffic is bounded: nacks from one device for the same held
    version on the same connection and the same repair (DeviceNack.repair) coalesce into one catch-up, and a
    device gets MAX_CATCH_UPS_PER_ROUND a round at most. The wait is for the devices `presence`
    has in the run, looked at again at least once a second: one that leaves stops holding the round (it is
    recorded as not delivered), one that joins is waited for from then on; a device that is in the run but does
    not answer (a link down, a crash it comes back from before the round's deadline) holds it to `round_timeout`.
    """

    def __init__(self, messages: DeviceMessages, pump: asyncio.Task[None], fleet: EmulatedFleet,
                 publisher: UpdatePublisher, metrics: RunMetrics, profiles: dict[str, str],
                 held_version: Callable[[str], int], round_timeout_s: float,
                 progress: ProgressCallback, note_report: ReportCallback = lambda report: None,
                 stop: asyncio.Event | None = None, control: ControlConnection | None = None,
                 presence: FleetPresence | None = None) -> None:
        self.messages = messages
        self.pump = pump
        self.fleet = fleet
        self.publisher = publisher
        self.metrics = metrics
        self.profiles = profiles
        self.held_version = held_version
        self.round_timeout_s = round_timeout_s
        self.progress = progress
        self.note_report = note_report
        self.stop = stop
        """When set (Ctrl-C), a round's wait ends within a second with the reports so far."""
        self.coalesced_nacks = 0
        self.stale_nacks = 0
        self.control = control
        """The run's own session: when it has come back (a broker restart), devices are asked for their reports
        again, as the ones sent while it was away are lost (devices.latest_report)."""
        self.report_requests = 0
        self._sessions_asked = control.connections if control is not None else 0
        self.presence: FleetPresence = presence or EveryoneIn()
        self.not_waited_for: dict[int, set[str]] = {}
        """By round: the devices a wait ended without, as they were out of the run (left, or down past it)."""

    async def collect(self, round_index: int, version: int) -> dict[str, DeviceReport]:
        """Wait until every device in the run reports `version` (or the round times out); the reports by device."""
        deadline = time.monotonic() + self.round_timeout_s
        reports: dict[str, DeviceReport] = {}
        catch_ups: dict[str, list[ServedNack]] = {}
        while not self.messages.nacks.empty():
            # Sent before this version was published: its broadcast answers them, and a device it does not
            # fit (a base it lacks) nacks again, in this round.
            self.messages.nacks.get_nowait()
            self.stale_nacks += 1
        while self._still_waited_for(round_index, reports, deadline):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.stop is not None and self.stop.is_set()):
                break
            await self._ask_again_after_reconnect(round_index, version)
            report_wait = asyncio.create_task(self.messages.reports.get())
            nack_wait = asyncio.create_task(self.messages.nacks.get())
            done, _ = await asyncio.wait({report_wait, nack_wait, self.pump}, timeout=min(remaining, 1.0),
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in (report_wait, nack_wait):
                if task not in done:
                    task.cancel()
                    if task.done() and not task.cancelled():
                        done.add(task)  # it took its message just before the cancel: keep it
            if self.pump in done:
                raise RunError(f"lost the connection to the broker: {self.pump.exception()!r}")
            self.fleet.raise_if_failed()
            if report_wait in done:
                report = report_wait.result()
                if report.device in self.profiles:
                    self.note_report(report)
                if report.device in self.profiles and report.version == version:
                    reports[report.device] = report
                    self.progress("device", {"round": round_index, "report": report.to_dict()})
            if nack_wait in done:
                nack = nack_wait.result()
                if nack.device in self.profiles and nack.device not in reports:
                    await self._answer_nack(round_index, version, nack, catch_ups)
        return reports

    def _still_waited_for(self, round_index: int, reports: dict[str, DeviceReport], deadline: float) -> bool:
        """Whether a device in the run has not reported yet; those out of it are noted (and logged) once a round."""
        waiting = False
        for device_id in self.profiles:
            if device_id in reports:
                continue
            if not self.presence.out_of_run(device_id, deadline):
                waiting = True
            elif device_id not in self.not_waited_for.setdefault(round_index, set()):
                self.not_waited_for[round_index].add(device_id)
                logger.info("round %d does not wait for device %s: it is out of the run", round_index, device_id)
        return waiting

    async def _ask_again_after_reconnect(self, round_index: int, version: int) -> None:
        """If the run's session came back since it last asked, ask every device for its report of `version` again."""
        control = self.control
        if control is None or control.connections <= self._sessions_asked:
            return
        sessions = control.connections
        try:
            await asyncio.wait_for(control.publish(self.messages.topics.report_request,
                                                   ReportRequest(round=round_index, version=version).encode()),
                                   REPORT_REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, aiomqtt.MqttError, RunError) as error:
            logger.info("could not ask the devices for their reports of version %d again (%r); trying again",
                        version, error)
            return
        self._sessions_asked = sessions
        self.report_requests += 1
        logger.info("the run's broker session came back in round %d: asked the devices for their reports of "
                    "version %d again", round_index, version)

    def drain_reports(self) -> None:
        """Note the reports that arrived after the last round's wait (devices' state at the end of the run)."""
        while not self.messages.reports.empty():
            report = self.messages.reports.get_nowait()
            if report.device in self.profiles:
                self.note_report(report)

    async def _answer_nack(self, round_index: int, version: int, nack: DeviceNack,
                           catch_ups: dict[str, list[ServedNack]]) -> None:
        """Serve `nack.device` a catch-up from the version it holds: once per (held version, connection, repair) a
        round, at most MAX_CATCH_UPS_PER_ROUND times."""
        device_id, held = nack.device, nack.version
        if held >= version or held < self.held_version(device_id):
            return  # stale: the device has moved on since it sent this nack
        self.metrics.record_nack(device_id, self.profiles[device_id])
        served = catch_ups.setdefault(device_id, [])
        asked = ServedNack(held, nack.session, nack.repair or 0)
        if any(asked.answered_by(earlier) for earlier in served):
            self.coalesced_nacks += 1  # a catch-up for this is already on its way over this connection
            return
        if len(served) >= MAX_CATCH_UPS_PER_ROUND:
            logger.warning("device %s keeps rejecting version %s: %s", device_id, version, nack.reason)
            return
        served.append(asked)
        catch_up = await self.publisher.publish_catch_up(round_index, device_id, held)
        self.metrics.record_published(catch_up.payload_bytes)
        self.progress("catch-up", {"round": round_index, "device": device_id, "from": held,
                                   "bytes": catch_up.payload_bytes, "reason": nack.reason})
