"""A fleet worker: a share of a run's emulated devices (their seeded links and agents) in a process of its own, and
the link counters it reports to the run over the broker (`testbed/<run>/fleet/<worker>/links`), read back there."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

import aiomqtt

from channel.link import LinkCounters
from channel.timing import LatenessSketch
from devices.agent import DeviceAgent, DeviceConfig
from devices.fleet import EmulatedFleet, ExternalDevice, FleetError
from devices.profiles import get_device_profile
from testbed.core.connect_ramp import ConnectRamp
from testbed.core.messages import RunConfig
from testbed.core.mqtt import MqttEndpoint
from testbed.core.scenario import Scenario
from testbed.core.seeds import Stream, derived_seed
from testbed.core.signing import TrustedKey
from testbed.core.topics import Topics
from testbed.inference import SharedModel, TorchInference
from testbed.links import DeviceLinks
from testbed.loopback_listeners import LoopbackListeners, ephemeral_ports_refusal, link_listen_address

logger = logging.getLogger("testbed.fleet")

LINK_REPORT_PERIOD_S = 0.5
"""How often a worker publishes its links' counters and lateness (the run's metrics lag the worker by at most this),
in a run of up to 1,000 devices (LINK_STATES_PER_S × this); in a larger one, see link_report_period_s."""
LINK_STATES_PER_S = 2000.0
"""The link states a second all workers together send the run, at most, between refreshes. Ten thousand links every
0.5 s took 64% of the run's loop (decoding them, py-spy) and 53% of each worker's (encoding them), and the run fell so
far behind that its rounds stalled (issue 13)."""
RECONNECT_S = 1.0
REFRESH_WAIT_S = 2.0
"""How long the run waits for every worker's fresh report at a round's start and end."""


def link_report_period_s(run_devices: int) -> float:
    """How often each worker of a run of `run_devices` devices reports its links: LINK_REPORT_PERIOD_S, or longer so
    that the run receives at most LINK_STATES_PER_S link states a second. Refreshes (a round's start and end) are
    answered at once whatever the period."""
    return max(LINK_REPORT_PERIOD_S, run_devices / LINK_STATES_PER_S)


def link_reports_topic(topics: Topics, worker: str) -> str:
    """Where worker `worker` publishes its links' counters (QoS 0, not retained: each report holds the totals)."""
    return f"{topics.prefix}fleet/{worker}/links"


def link_reports_filter(topics: Topics) -> str:
    return f"{topics.prefix}fleet/+/links"


def refresh_topic(topics: Topics) -> str:
    """Where the run asks every worker for a report now (at a round's start and end), naming the request."""
    return f"{topics.prefix}fleet/refresh"


LINKS_PER_MESSAGE = 20
"""A worker's report goes out in messages of this many links, one per event-loop pass: encoding a hundred links at
once held the worker's loop (and its links' releases) for tens of milliseconds every LINK_REPORT_PERIOD_S."""
_COUNTER_FIELDS = tuple(counter.name for counter in dataclasses.fields(LinkCounters))


def _counters_state(counters: LinkCounters) -> dict[str, Any]:
    """`dataclasses.asdict` of the flat counters, without its recursive copy."""
    return {name: getattr(counters, name) for name in _COUNTER_FIELDS}


def link_state(link: Any) -> dict[str, Any]:
    """One link's counters both ways and, when it measures it (the proxy backend), its lateness sketch."""
    state: dict[str, Any] = {"downlink": _counters_state(link.downlink_counters),
                             "uplink": _counters_state(link.uplink_counters)}
    if callable(getattr(link, "timing_stats", None)):
        sketch = link.timing_stats()
        # the sketch's exact state (bucket counts), so the run merges and subtracts it as it would the link's own
        state["lateness"] = {"buckets": sketch._buckets, "zero": sketch.zero_count, "count": sketch.count}
    return state


def encode_link_report(worker: str, links: Mapping[str, Any], answers: int | None = None) -> bytes:
    """A worker's report (or one message of it): the totals of `links`, and the refresh request it answers, if any."""
    return json.dumps({"worker": worker, "answers": answers,
                       "links": {device_id: link_state(link) for device_id, link in links.items()}}).encode()


class RemoteLink:
    """A link a worker runs, as the run's metrics and timing read it: the totals of the worker's latest report."""

    def __init__(self) -> None:
        self.downlink_counters = LinkCounters()
        self.uplink_counters = LinkCounters()
        self.lateness = LatenessSketch()

    def update(self, state: Mapping[str, Any]) -> None:
        self.downlink_counters = LinkCounters(**state["downlink"])
        self.uplink_counters = LinkCounters(**state["uplink"])
        lateness = state.get("lateness")
        if lateness is not None:
            sketch = LatenessSketch()
            sketch._buckets = {int(index): int(count) for index, count in lateness["buckets"].items()}
            sketch.zero_count, sketch.count = int(lateness["zero"]), int(lateness["count"])
            self.lateness = sketch


class TimedRemoteLink(RemoteLink):
    """A worker's proxy link: it also says how late it released its segments (testbed.timing_report)."""

    def timing_stats(self) -> LatenessSketch:
        return self.lateness.copy()


def remote_link(timed: bool) -> RemoteLink:
    return TimedRemoteLink() if timed else RemoteLink()


class LinkReports:
    """The run's side: keeps `links` at the workers' latest totals (`run()` until cancelled) and asks every worker
    that has reported for a report now (`refresh()`), so a round's counters and lateness end where it ends."""

    def __init__(self, endpoint: MqttEndpoint, topics: Topics, links: Mapping[str, RemoteLink]) -> None:
        self.endpoint = endpoint
        self.topics = topics
        self.links = links
        self.answered: dict[str, int] = {}
        """Each worker that reported, and the latest refresh request it answered (0: none)."""
        self.requests = 0
        self._client: aiomqtt.Client | None = None
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        while True:
            try:
                async with self.endpoint.client(f"{self.topics.run_id}-fleet-links") as client:
                    await client.subscribe(link_reports_filter(self.topics), qos=0)
                    self._client = client
                    async for message in client.messages:
                        await self.take(bytes(message.payload))
            except aiomqtt.MqttError as error:
                logger.info("fleet link reports: %s; reconnecting", error)
            self._client = None
            await asyncio.sleep(RECONNECT_S)

    async def take(self, payload: bytes) -> None:
        """Apply a worker's report (devices the run does not know are ignored; a malformed report is logged)."""
        try:
            report = json.loads(payload)
            for device_id, state in report["links"].items():
                link = self.links.get(device_id)
                if link is not None:
                    link.update(state)
            worker, answers = str(report["worker"]), report.get("answers")
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            logger.warning("ignoring a malformed fleet link report (%d bytes): %r", len(payload), error)
            return
        async with self._changed:
            self.answered[worker] = max(self.answered.get(worker, 0), int(answers or 0))
            self._changed.notify_all()

    async def refresh(self, timeout_s: float = REFRESH_WAIT_S) -> bool:
        """Ask every worker for its totals now and wait (at most `timeout_s`) until each that ever reported has
        answered; whether all did (if not, the run reads the latest reports, up to a report period old)."""
        client = self._client
        if client is None:
            return False
        self.requests += 1
        request = self.requests
        try:
            await client.publish(refresh_topic(self.topics), str(request).encode(), qos=0, timeout=timeout_s)
        except aiomqtt.MqttError:
            return False

        async def all_answered() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: all(answer >= request for answer in self.answered.values()))

        try:
            await asyncio.wait_for(all_answered(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


async def publish_link_report(client: aiomqtt.Client, topic: str, worker: str, links: Mapping[str, Any],
                              answers: int | None) -> None:
    """Every link's totals in messages of LINKS_PER_MESSAGE links, each encoded in a loop pass of its own; only the
    last says which refresh request it answers, so the run has every link's totals when it sees the answer."""
    items = list(links.items())
    starts = range(0, len(items), LINKS_PER_MESSAGE) if items else range(1)
    for start in starts:
        if start:
            await asyncio.sleep(0)  # let the links' timers due meanwhile run
        last = start + LINKS_PER_MESSAGE >= len(items)
        part = dict(items[start:start + LINKS_PER_MESSAGE])
        await client.publish(topic, encode_link_report(worker, part, answers if last else None), qos=0)


async def publish_link_reports(endpoint: MqttEndpoint, topics: Topics, worker: str, links: Mapping[str, Any],
                               period_s: float = LINK_REPORT_PERIOD_S) -> None:
    """The worker's side: publish every `period_s`, and at once when the run asks, until cancelled."""
    topic = link_reports_topic(topics, worker)
    loop = asyncio.get_running_loop()
    while True:
        try:
            async with endpoint.client(f"{topics.run_id}-fleet-{worker}") as client:
                await client.subscribe(refresh_topic(topics), qos=0)
                messages = client.messages
                next_report = loop.time()
                while True:
                    answers = None
                    try:
                        message = await asyncio.wait_for(anext(messages), max(0.0, next_report - loop.time()))
                        answers = int(bytes(message.payload))
                    except asyncio.TimeoutError:
                        next_report = loop.time() + period_s
                    except ValueError:
                        continue
                    await publish_link_report(client, topic, worker, links, answers)
        except aiomqtt.MqttError as error:
            logger.info("fleet %s: link reports: %s; reconnecting", worker, error)
            await asyncio.sleep(RECONNECT_S)


class WorkerDevice(ExternalDevice):
    """An emulated device a local worker process runs: online when its status says so; it fails (and so the run)
    when its worker exits before the run ends (`worker_ended` gets the reason)."""

    def __init__(self, device_id: str, worker_ended: asyncio.Future[str]) -> None:
        super().__init__(device_id)
        self.worker_ended = worker_ended

    async def run(self) -> None:
        raise FleetError(await asyncio.shield(self.worker_ended))


def emulated_agent(scenario: Scenario, links: DeviceLinks, device_id: str, profile: str, inference: TorchInference,
                   topics: Topics, via: MqttEndpoint, trusted_key: TrustedKey, init_seed: int,
                   connect_ramp: ConnectRamp) -> DeviceAgent:
    """The agent of one emulated device, behind the link `via` reaches (the same in the run and in a worker); its
    connects take turns with the process's other devices' on `connect_ramp`."""
    downlink, uplink = links.parameters(device_id)
    config = DeviceConfig(device_id, get_device_profile(profile), downlink.rate_bps, uplink.rate_bps,
                          round_period_s=scenario.round_period_s, init_seed=init_seed)
    return DeviceAgent(config, topics, via, inference, trusted_key, connect_ramp=connect_ramp)


def device_link_seed(scenario: Scenario, device_index: int) -> int:
    """The seed of device number `device_index`'s own link (the same whichever process opens it)."""
    return derived_seed(scenario.seed, Stream.DEVICE_LINK, device_index)


class FleetWorker:
    """Runs `device_ids` of the run `config` describes: opens their links to `endpoint`, runs their agents, reports
    the links' counters; `run()` until cancelled."""

    def __init__(self, endpoint: MqttEndpoint, config: RunConfig, scenario: Scenario, device_ids: Sequence[str],
                 name: str, on_online: Callable[[int], None] | None = None) -> None:
        self.endpoint = endpoint
        self.config = config
        self.scenario = scenario
        self.device_ids = list(device_ids)
        self.name = name
        self.on_online = on_online or (lambda count: None)
        self.topics = Topics(config.run)
        self.links: dict[str, Any] = {}

    async def run(self) -> None:
        from server.data import device_test_split, load_dataset_arrival
        from server.models import build_model
        from testbed.runner import online_timeout_s

        import torch

        refusal = ephemeral_ports_refusal(len(self.device_ids), processes=1)
        if refusal is not None:  # (a local worker's share passed the run's check; on another host this is the check)
            raise FleetError(f"fleet {self.name}: {refusal}")
        torch.set_num_threads(1)  # the run and the other workers share the cores: one thread each, no oversubscription
        scenario, config = self.scenario, self.config
        seed = int(scenario.seed)
        arrival = await asyncio.to_thread(load_dataset_arrival, scenario.data, seed)
        model = build_model(scenario.model, arrival.num_features, arrival.num_classes, seed,
                            input_shape=arrival.input_shape)
        shared_model = SharedModel(model)
        links = DeviceLinks(scenario.channel, scenario.seed)
        profiles = scenario.device_profiles()
        trusted_key = TrustedKey.from_text(config.public_key)
        async with AsyncExitStack() as stack:
            listeners = stack.enter_context(LoopbackListeners())
            connect_ramp = ConnectRamp()
            agents = []
            for device_id in self.device_ids:
                index = config.devices[device_id]
                listen_host, listen_port = link_listen_address(listeners, scenario.channel.backend,
                                                               links.cell_of(device_id) is not None)
                link = await stack.enter_async_context(links.open(
                    device_id, (self.endpoint.host, self.endpoint.port), seed=device_link_seed(scenario, index),
                    listen_host=listen_host, listen_port=listen_port))
                self.links[device_id] = link
                inference = shared_model.for_device(device_test_split(
                    arrival.test, index, scenario.data.device_test_samples, seed))
                agents.append(emulated_agent(scenario, links, device_id, profiles[device_id], inference, self.topics,
                                             self.endpoint.via(*link.address), trusted_key, config.init_seed,
                                             connect_ramp))
            reports = asyncio.create_task(publish_link_reports(self.endpoint, self.topics, self.name, self.links,
                                                               link_report_period_s(len(config.devices))))
            stack.callback(reports.cancel)
            fleet = await stack.enter_async_context(EmulatedFleet(agents))
            await fleet.wait_online(online_timeout_s(len(agents)))
            self.on_online(len(agents))
            while True:
                await asyncio.sleep(1.0)
                fleet.raise_if_failed()
                if reports.done():
                    raise FleetError(f"fleet {self.name}: link reports ended: {reports.exception()!r}")
