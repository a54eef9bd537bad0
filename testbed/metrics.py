"""The run's Prometheus metrics, defined once, and the HTTP exporter that serves them."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

DELIVERY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, float("inf"))


class RunMetrics:
    """Every metric a run exports; labels are run, device, profile, strategy (all bounded)."""

    def __init__(self, run_id: str, strategy: str) -> None:
        self.run_id = run_id
        self.strategy = strategy
        self.registry = CollectorRegistry()
        device_labels = ("run", "device", "profile")
        server_labels = ("run", "strategy")
        r = self.registry
        self.device_accuracy = Gauge("testbed_device_accuracy_ratio", "Accuracy of the device's model on its local test split", device_labels, registry=r)
        self.device_model_version = Gauge("testbed_device_model_version", "Model version the device holds", device_labels, registry=r)
        self.device_energy = Counter("testbed_device_energy_joules_total", "Energy the device spent (modelled or measured)", device_labels, registry=r)
        self.device_received = Counter("testbed_device_received_bytes_total", "Bytes the device received over MQTT", device_labels, registry=r)
        self.device_delivery = Histogram("testbed_device_update_delivery_seconds", "Time from publishing an update to the device holding all of it", device_labels, buckets=DELIVERY_BUCKETS_S, registry=r)
        self.device_last_delivery = Gauge("testbed_device_last_update_delivery_seconds", "Delivery time of the device's latest update", device_labels, registry=r)
        self.device_rejected = Counter("testbed_device_rejected_updates_total", "Updates the device rejected (nacks)", device_labels, registry=r)
        self.server_round = Gauge("testbed_server_round", "Round the server completed last", server_labels, registry=r)
        self.server_accuracy = Gauge("testbed_server_accuracy_ratio", "Server model accuracy on the test split", server_labels, registry=r)
        self.server_model_version = Gauge("testbed_server_model_version", "Latest model version published", server_labels, registry=r)
        self.server_update_bytes = Gauge("testbed_server_update_bytes", "Bytes of the latest encoded update", server_labels, registry=r)
        self.server_full_model_bytes = Gauge("testbed_server_full_model_bytes", "Bytes of the full model encoded densely", server_labels, registry=r)
        self.server_published = Counter("testbed_server_published_bytes_total", "Update bytes published (broadcasts and catch-ups)", server_labels, registry=r)

    def record_round(self, round_index: int, version: int, accuracy: float, update_bytes: int, full_model_bytes: int) -> None:
        labels = {"run": self.run_id, "strategy": self.strategy}
        self.server_round.labels(**labels).set(round_index)
        self.server_model_version.labels(**labels).set(version)
        self.server_accuracy.labels(**labels).set(accuracy)
        self.server_update_bytes.labels(**labels).set(update_bytes)
        self.server_full_model_bytes.labels(**labels).set(full_model_bytes)

    def record_published(self, payload_bytes: int) -> None:
        self.server_published.labels(run=self.run_id, strategy=self.strategy).inc(payload_bytes)

    def record_device_report(self, report: dict[str, Any], previous_total_bytes: int) -> None:
        labels = {"run": self.run_id, "device": report["device"], "profile": report["profile"]}
        self.device_accuracy.labels(**labels).set(report["accuracy"])
        self.device_model_version.labels(**labels).set(report["version"])
        self.device_energy.labels(**labels).inc(report["energy_joules"])
        self.device_received.labels(**labels).inc(max(0, report["total_received_bytes"] - previous_total_bytes))
        self.device_delivery.labels(**labels).observe(report["delivery_seconds"])
        self.device_last_delivery.labels(**labels).set(report["delivery_seconds"])

    def record_nack(self, device_id: str, profile: str) -> None:
        self.device_rejected.labels(run=self.run_id, device=device_id, profile=profile).inc()


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
