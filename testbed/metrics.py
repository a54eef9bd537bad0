"""The run's Prometheus metrics, defined once, and the HTTP exporter that serves them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from prometheus_client import push_to_gateway, CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from testbed.core.events import EVENT_ACTIONS
from testbed.core.messages import DeviceReport
from testbed.errors import OrchestrationError
from testbed.prometheus_targets import TARGETS_DIRECTORY_VARIABLE, targets_directory

DELIVERY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, float("inf"))
ENERGY_PHASES = ("receive", "transmit", "compute", "idle")
LINK_DIRECTIONS = ("downlink", "uplink")
RADIO_PHASES = ("receive", "transmit")
MONITORING_DIR = Path(__file__).resolve().parents[1] / "monitoring"


class LinkCountersView(Protocol):
    """What the link collector reads: `channel.link.LinkCounters` (or anything with the same fields)."""

    segments: int
    payload_bytes: int
    wire_bytes: int
    lost_segments: int
    retransmissions: int
    queueing_delay_s: float
    queue_drops: int


class QuantileView(Protocol):
    """What the timing gauges read: `channel.timing.LatenessSketch` (seconds at a quantile, None if empty)."""

    def quantile(self, q: float) -> float | None: ...


class LinkView(Protocol):
    """A device's link, as `channel.proxy.LinkProxy` exposes it: one counters object per direction."""

    @property
    def downlink_counters(self) -> LinkCountersView: ...

    @property
    def uplink_counters(self) -> LinkCountersView: ...


# (metric name without `_total`, help, LinkCounters field); counters, one series per device link and direction.
LINK_COUNTERS = (
    ("testbed_link_segments", "Segments the link carried (delivered or lost)", "segments"),
    ("testbed_link_payload_bytes", "Payload bytes handed to the link", "payload_bytes"),
    ("testbed_link_wire_bytes", "Bytes on the wire including header overhead and retransmissions", "wire_bytes"),
    ("testbed_link_dropped_segments", "Segments the link dropped (each costs a retransmission)", "lost_segments"),
    ("testbed_link_retransmissions", "Retransmissions the link caused", "retransmissions"),
    ("testbed_link_queue_drops", "Packets tail-dropped by a full bottleneck queue (`queue`, tun backend)",
     "queue_drops"),
    ("testbed_link_queueing_delay_seconds", "Queueing delay summed over all segments (divide by segments)",
     "queueing_delay_s"),
)


@dataclass(frozen=True)
class _WatchedLink:
    device: str
    profile: str
    link: LinkView


class _LinkCollector(Collector):
    """Reads every watched link's counters when Prometheus scrapes (no sampling task, always current)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.links: dict[str, _WatchedLink] = {}

    def collect(self) -> Iterator[Metric]:
        labels = ("run", "device", "profile", "direction")
        families = {name: CounterMetricFamily(name, text, labels=labels) for name, text, _ in LINK_COUNTERS}
        mean_delay = GaugeMetricFamily("testbed_link_mean_queueing_delay_seconds",
                                      "Mean queueing delay per segment since the run started", labels=labels)
        for watched in list(self.links.values()):
            for direction in LINK_DIRECTIONS:
                counters = getattr(watched.link, f"{direction}_counters")
                values = [self.run_id, watched.device, watched.profile, direction]
                for name, _, field_name in LINK_COUNTERS:
                    families[name].add_metric(values, float(getattr(counters, field_name)))
                mean_delay.add_metric(values, counters.queueing_delay_s / counters.segments if counters.segments else 0.0)
        yield from families.values()
        yield mean_delay

    def describe(self) -> Iterator[Metric]:
        return iter(())


class RunMetrics:
    """Every metric a run exports; labels are run, device, profile, strategy, phase, direction (all bounded)."""

    def __init__(self, run_id: str, strategy: str, scenario: str = "", ratio: float | None = None) -> None:
        self.run_id = run_id
        self.strategy = strategy
        self.registry = CollectorRegistry()
        device_labels = ("run", "device", "profile")
        phase_labels = ("run", "device", "profile", "phase")
        server_labels = ("run", "strategy")
        r = self.registry
        self.run_info = Info("testbed_run", "What the run is: scenario, strategy, update ratio", ("run",), registry=r)
        self.device_online = Gauge("testbed_device_online", "1 while the device is connected (from its retained status and will)", device_labels, registry=r)
        self.device_accuracy = Gauge("testbed_device_accuracy_ratio", "Accuracy of the device's model on its local test split", device_labels, registry=r)
        self.device_model_version = Gauge("testbed_device_model_version", "Model version the device holds", device_labels, registry=r)
        self.device_energy = Counter("testbed_device_energy_joules_total", "Energy the device spent (modelled or measured)", device_labels, registry=r)
        self.device_phase_energy = Counter("testbed_device_phase_energy_joules_total", "Energy the device spent, by phase (receive, transmit, compute, idle)", phase_labels, registry=r)
        self.device_phase_time = Counter("testbed_device_phase_seconds_total", "Time the device spent, by phase (receive and transmit are its airtime)", phase_labels, registry=r)
        self.device_round_airtime = Gauge("testbed_device_round_airtime_seconds", "Radio time (receive + transmit) of the device's latest round", device_labels, registry=r)
        self.device_received = Counter("testbed_device_received_bytes_total", "Bytes the device received over MQTT", device_labels, registry=r)
        self.device_transmitted = Counter("testbed_device_transmitted_bytes_total", "Bytes the device sent over MQTT (reports, acks)", device_labels, registry=r)
        self.device_delivery = Histogram("testbed_device_update_delivery_seconds", "Time from publishing an update to the device holding all of it", device_labels, buckets=DELIVERY_BUCKETS_S, registry=r)
        self.device_last_delivery = Gauge("testbed_device_last_update_delivery_seconds", "Delivery time of the device's latest update", device_labels, registry=r)
        self.device_rejected = Counter("testbed_device_rejected_updates_total", "Updates, manifests or chunks the device refused, by reason (unsigned, bad_signature, not_newer, ...)", (*device_labels, "reason"), registry=r)
        self.device_nacks = Counter("testbed_device_nacks_total", "Catch-up requests (nacks) the run received from the device", device_labels, registry=r)
        self.server_round = Gauge("testbed_server_round", "Round the server completed last", server_labels, registry=r)
        self.server_accuracy = Gauge("testbed_server_accuracy_ratio", "Server model accuracy on the test split", server_labels, registry=r)
        self.server_model_version = Gauge("testbed_server_model_version", "Latest model version published", server_labels, registry=r)
        self.server_update_bytes = Gauge("testbed_server_update_bytes", "Bytes of the latest encoded update (0 when the round sent nothing)", server_labels, registry=r)
        self.server_index_bits = Gauge("testbed_server_update_index_bits", "Bits of the latest update's index section", server_labels, registry=r)
        self.server_full_model_bytes = Gauge("testbed_server_full_model_bytes", "Bytes of the full model encoded densely", server_labels, registry=r)
        self.server_published = Counter("testbed_server_published_bytes_total", "Update bytes published (broadcasts and catch-ups)", server_labels, registry=r)
        self.server_rounds = Counter("testbed_server_rounds_total", "Rounds the server completed", server_labels, registry=r)
        self.round_lateness = Gauge("testbed_round_release_lateness_seconds", "How late the links released segments against the link model's schedule in the latest round, by quantile (0.5, 0.99)", ("run", "quantile"), registry=r)
        self.round_loop_lag = Gauge("testbed_round_loop_lag_seconds", "How late the run's event loop woke from a sleep in the latest round, by quantile (0.5, 0.99)", ("run", "quantile"), registry=r)
        self.unfaithful_rounds = Counter("testbed_unfaithful_rounds_total", "Rounds whose release lateness p99 exceeded the limit (README: Timing fidelity)", ("run",), registry=r)
        self.events = Counter("testbed_events_total", "Scenario events that fired, by action (link, outage, broker_restart, ...)", ("run", "action"), registry=r)
        self.links = _LinkCollector(run_id)
        r.register(self.links)
        self._rejections_seen: dict[str, dict[str, int]] = {}
        self.run_info.labels(run=run_id).info({"scenario": scenario, "strategy": strategy,
                                               "ratio": "" if ratio is None else f"{ratio:g}"})
        self.server_published.labels(run=run_id, strategy=strategy)
        self.server_rounds.labels(run=run_id, strategy=strategy)
        for action in EVENT_ACTIONS:  # at 0 from the start, so an action's first firing is a change Grafana marks
            self.events.labels(run=run_id, action=action)
        self.unfaithful_rounds.labels(run=run_id)

    def _device(self, device_id: str, profile: str) -> dict[str, str]:
        return {"run": self.run_id, "device": device_id, "profile": profile}

    def add_device(self, device_id: str, profile: str, link: LinkView | None = None) -> None:
        """Announce a device (all its series start at 0, so every panel has data) and, optionally, its link."""
        labels = self._device(device_id, profile)
        self.device_online.labels(**labels).set(0)
        for counter in (self.device_energy, self.device_received, self.device_transmitted, self.device_nacks):
            counter.labels(**labels)
        for phase in ENERGY_PHASES:
            self.device_phase_energy.labels(**labels, phase=phase)
            self.device_phase_time.labels(**labels, phase=phase)
        if link is not None:
            self.links.links[device_id] = _WatchedLink(device_id, profile, link)

    def record_online(self, device_id: str, profile: str, online: bool) -> None:
        self.device_online.labels(**self._device(device_id, profile)).set(1 if online else 0)

    def record_round(self, round_index: int, version: int, accuracy: float, update_bytes: int, full_model_bytes: int,
                     index_bits: int = 0) -> None:
        labels = {"run": self.run_id, "strategy": self.strategy}
        self.server_round.labels(**labels).set(round_index)
        self.server_model_version.labels(**labels).set(version)
        self.server_accuracy.labels(**labels).set(accuracy)
        self.server_update_bytes.labels(**labels).set(update_bytes)
        self.server_index_bits.labels(**labels).set(index_bits)
        self.server_full_model_bytes.labels(**labels).set(full_model_bytes)
        self.server_rounds.labels(**labels).inc()

    def record_round_timing(self, lateness: QuantileView, loop_lag: QuantileView | None, faithful: bool | None) -> None:
        """The latest round's release lateness and loop lag (p50, p99; what was not measured is left as it was)."""
        for gauge, sketch in ((self.round_lateness, lateness), (self.round_loop_lag, loop_lag)):
            for quantile in (0.5, 0.99):
                seconds = None if sketch is None else sketch.quantile(quantile)
                if seconds is not None:
                    gauge.labels(run=self.run_id, quantile=f"{quantile:g}").set(seconds)
        if faithful is False:
            self.unfaithful_rounds.labels(run=self.run_id).inc()

    def record_published(self, payload_bytes: int) -> None:
        self.server_published.labels(run=self.run_id, strategy=self.strategy).inc(payload_bytes)

    def record_device_report(self, report: DeviceReport, previous_total_bytes: int) -> None:
        labels = self._device(report.device, report.profile)
        self.device_online.labels(**labels).set(1)
        self.device_accuracy.labels(**labels).set(report.accuracy)
        self.device_model_version.labels(**labels).set(report.version)
        self.device_energy.labels(**labels).inc(report.energy_joules)
        for phase, joules in report.energy_joules_by_phase.items():
            if phase in ENERGY_PHASES:
                self.device_phase_energy.labels(**labels, phase=phase).inc(max(0.0, joules))
        phase_seconds = report.phase_seconds
        for phase, seconds in phase_seconds.items():
            if phase in ENERGY_PHASES:
                self.device_phase_time.labels(**labels, phase=phase).inc(max(0.0, seconds))
        self.device_round_airtime.labels(**labels).set(sum(phase_seconds.get(phase, 0.0) for phase in RADIO_PHASES))
        self.device_received.labels(**labels).inc(max(0, report.total_received_bytes - previous_total_bytes))
        self.device_transmitted.labels(**labels).inc(report.transmitted_bytes)
        self.device_delivery.labels(**labels).observe(report.delivery_seconds)
        self.device_last_delivery.labels(**labels).set(report.delivery_seconds)

    def record_event(self, action: str) -> None:
        """A scenario event fired (testbed.events); `action` is one of testbed.core.events.EVENT_ACTIONS."""
        self.events.labels(run=self.run_id, action=action).inc()

    def record_nack(self, device_id: str, profile: str) -> None:
        self.device_nacks.labels(**self._device(device_id, profile)).inc()

    def record_rejections(self, report: DeviceReport) -> None:
        """The device's refusals by reason, from the running totals its report carries (labels: known reasons only)."""
        seen = self._rejections_seen.setdefault(report.device, {})
        labels = self._device(report.device, report.profile)
        for reason, total in (report.rejected_by_reason or {}).items():
            if total > seen.get(reason, 0):
                self.device_rejected.labels(**labels, reason=reason).inc(total - seen.get(reason, 0))
                seen[reason] = total


class PushError(OrchestrationError):
    """The Pushgateway refused or could not be reached."""


def push_metrics(registry: CollectorRegistry, gateway_url: str, run_id: str, timeout_s: float = 10.0) -> None:
    """Push every metric of the run to a Pushgateway (job `edge-testbed`, grouped by run)."""
    try:
        push_to_gateway(gateway_url, job="edge-testbed", registry=registry, grouping_key={"run": run_id},
                        timeout=timeout_s)
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise PushError(f"push to {gateway_url} failed: {error}") from None


class MetricsExporter:
    """Serves a registry over HTTP (`/metrics`) for the lifetime of an `async with` block."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: Any = None
        self._thread: Any = None

    async def __aenter__(self) -> MetricsExporter:
        try:
            self._server, self._thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as error:
            raise OSError(f"metrics exporter cannot listen on {self.host}:{self.port}: {error.strerror or error} "
                          "(set metrics.port to a free port, or 0 for any)") from None
        self.port = int(self._server.server_port)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None


def monitoring_guide(monitoring_dir: Path = MONITORING_DIR, exporter_port: int = 9464,
                     targets_dir: Path | None = None) -> str:
    """How to start Prometheus + Grafana on this repository's `monitoring/` files, and where to look."""
    folder = monitoring_dir
    targets = targets_dir or targets_directory()
    return f"""\
Live monitoring: the run's exporter -> Prometheus -> Grafana (dashboard "edge-testbed").

  exporter    http://127.0.0.1:{exporter_port}/metrics   (while `testbed run` runs; scenario metrics.port, 0: any)
  targets     {targets}/<run id>.json
              (each run registers its exporter there while it serves; metrics.targets_dir or
              ${TARGETS_DIRECTORY_VARIABLE} choose another folder; a killed run's file shows as a target down)
  Prometheus  http://127.0.0.1:9090                 (scrapes every registered run every 2 s; {folder}/prometheus.yml)
  Grafana     http://127.0.0.1:3000/d/edge-testbed  (anonymous viewer; admin/admin to edit)

With Docker (Mosquitto on 1883, Prometheus, Grafana, all on the host network; Compose 2.18 or later):
  mkdir -p {targets}   # before `up`: Docker would create it owned by root
  docker compose -f {folder}/compose.yaml up -d
  testbed run scenarios/lowband.yaml            # then open the Grafana URL above
  testbed run scenarios/lowband.yaml --set broker=mqtt://127.0.0.1:1883   # the same over the stack's Mosquitto
  docker compose -f {folder}/compose.yaml down

Without Docker (Debian packages `prometheus`, and Grafana from packages.grafana.com):
  mkdir -p {targets}
  ln -sfn {targets} {folder}/targets   # prometheus.yml reads targets/*.json beside itself
  prometheus --config.file={folder}/prometheus.yml --storage.tsdb.path=/tmp/testbed-prometheus \\
      --web.listen-address=127.0.0.1:9090
  GF_PATHS_PROVISIONING={folder}/grafana/provisioning GF_AUTH_ANONYMOUS_ENABLED=true \\
      TESTBED_DASHBOARDS={folder}/grafana/dashboards grafana-server --homepath /usr/share/grafana

Your own Prometheus: add a job that reads the folder (honor_labels keeps the runs' own `run`/`strategy` labels):
  - job_name: testbed
    honor_labels: true
    file_sd_configs: [{{files: ["{targets}/*.json"]}}]

Panels: fleet and per-device accuracy, model versions, update bytes and airtime per round, energy per
device and phase, delivery-time quantiles, link loss / retransmissions / queueing delay, devices online;
scenario events (testbed_events_total) as annotations labelled with their action.
Pick a run with the `run` variable; after the run, `testbed report runs/<dir>` writes report.html and plots.
"""
