"""RunMetrics: what each recording call puts in the registry, link counters read at scrape time, bounded labels."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client import generate_latest

from channel.link import LinkCounters
from testbed.core.events import EVENT_ACTIONS
from testbed.core.messages import DeviceReport
from testbed.metrics import ENERGY_PHASES, MetricsExporter, RunMetrics, monitoring_guide


@dataclass
class FakeLink:
    downlink_counters: LinkCounters = field(default_factory=LinkCounters)
    uplink_counters: LinkCounters = field(default_factory=LinkCounters)


def report(device: str = "d0", **changes: Any) -> DeviceReport:
    fields: dict[str, Any] = {
        "device": device, "profile": "rpi4", "version": 2, "weights_hash": "ab", "accuracy": 0.9,
        "update_bytes": 1000, "received_bytes": 1000, "transmitted_bytes": 200, "total_received_bytes": 1500,
        "delivery_seconds": 1.5, "apply_seconds": 0.05, "evaluate_seconds": 0.05, "energy_joules": 3.0,
        "energy_joules_by_phase": {"receive": 1.0, "transmit": 0.5, "compute": 0.25, "idle": 1.25},
        "phase_seconds": {"receive": 2.0, "transmit": 0.5, "compute": 0.1, "idle": 4.0},
        "total_energy_joules": 3.0, "rejected_updates": 0,
    }
    return DeviceReport(**{**fields, **changes})


def value(metrics: RunMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_device_report_fills_gauges_counters_phases_and_histogram() -> None:
    metrics = RunMetrics("r1", "dpu", "lowband", 0.05)
    metrics.record_device_report(report(), previous_total_bytes=500)
    metrics.record_device_report(report(version=3, accuracy=0.95, total_received_bytes=2500, delivery_seconds=7.0),
                                 previous_total_bytes=1500)
    device = {"run": "r1", "device": "d0", "profile": "rpi4"}
    assert value(metrics, "testbed_device_accuracy_ratio", **device) == 0.95
    assert value(metrics, "testbed_device_model_version", **device) == 3
    assert value(metrics, "testbed_device_energy_joules_total", **device) == 6.0
    assert value(metrics, "testbed_device_phase_energy_joules_total", **device, phase="receive") == 2.0
    assert value(metrics, "testbed_device_phase_energy_joules_total", **device, phase="idle") == 2.5
    assert value(metrics, "testbed_device_phase_seconds_total", **device, phase="transmit") == 1.0
    assert value(metrics, "testbed_device_round_airtime_seconds", **device) == 2.5
    assert value(metrics, "testbed_device_received_bytes_total", **device) == 1000 + 1000
    assert value(metrics, "testbed_device_transmitted_bytes_total", **device) == 400
    assert value(metrics, "testbed_device_update_delivery_seconds_count", **device) == 2
    assert value(metrics, "testbed_device_update_delivery_seconds_bucket", **device, le="2.0") == 1
    assert value(metrics, "testbed_device_update_delivery_seconds_bucket", **device, le="10.0") == 2
    assert value(metrics, "testbed_device_last_update_delivery_seconds", **device) == 7.0
    assert value(metrics, "testbed_device_online", **device) == 1


def test_unknown_phases_do_not_become_labels() -> None:
    metrics = RunMetrics("r1", "dpu")
    metrics.record_device_report(report(energy_joules_by_phase={"receive": 1.0, "sneaky-phase": 9.0}), 0)
    text = generate_latest(metrics.registry).decode()
    assert "sneaky-phase" not in text


def test_round_info_and_server_series() -> None:
    metrics = RunMetrics("r1", "dpu", "lowband", 0.05)
    metrics.record_round(0, 1, 0.8, 4000, 4000, 0)
    metrics.record_round(1, 2, 0.85, 300, 4000, 1200)
    server = {"run": "r1", "strategy": "dpu"}
    assert value(metrics, "testbed_server_round", **server) == 1
    assert value(metrics, "testbed_server_rounds_total", **server) == 2
    assert value(metrics, "testbed_server_update_bytes", **server) == 300
    assert value(metrics, "testbed_server_update_index_bits", **server) == 1200
    assert value(metrics, "testbed_server_full_model_bytes", **server) == 4000
    assert value(metrics, "testbed_run_info", run="r1", scenario="lowband", strategy="dpu", ratio="0.05") == 1
    metrics.record_published(300)
    metrics.record_published(50)
    assert value(metrics, "testbed_server_published_bytes_total", **server) == 350


def test_add_device_starts_every_device_series_at_zero_and_status_toggles_online() -> None:
    metrics = RunMetrics("r1", "dpu")
    metrics.add_device("d0", "jetson-nano")
    device = {"run": "r1", "device": "d0", "profile": "jetson-nano"}
    assert value(metrics, "testbed_device_online", **device) == 0
    assert value(metrics, "testbed_device_nacks_total", **device) == 0
    for phase in ENERGY_PHASES:
        assert value(metrics, "testbed_device_phase_energy_joules_total", **device, phase=phase) == 0
    metrics.record_online("d0", "jetson-nano", True)
    assert value(metrics, "testbed_device_online", **device) == 1
    metrics.record_online("d0", "jetson-nano", False)
    assert value(metrics, "testbed_device_online", **device) == 0
    metrics.record_nack("d0", "jetson-nano")
    assert value(metrics, "testbed_device_nacks_total", **device) == 1


def test_link_counters_are_read_when_scraped() -> None:
    metrics = RunMetrics("r1", "dpu")
    link = FakeLink()
    metrics.add_device("d0", "rpi4", link)
    labels = {"run": "r1", "device": "d0", "profile": "rpi4", "direction": "downlink"}
    assert value(metrics, "testbed_link_wire_bytes_total", **labels) == 0
    assert value(metrics, "testbed_link_mean_queueing_delay_seconds", **labels) == 0
    link.downlink_counters.segments = 10
    link.downlink_counters.wire_bytes = 15_000
    link.downlink_counters.lost_segments = 2
    link.downlink_counters.retransmissions = 2
    link.downlink_counters.queueing_delay_s = 0.5
    link.downlink_counters.queue_drops = 3
    link.uplink_counters.payload_bytes = 77
    assert value(metrics, "testbed_link_wire_bytes_total", **labels) == 15_000
    assert value(metrics, "testbed_link_dropped_segments_total", **labels) == 2
    assert value(metrics, "testbed_link_retransmissions_total", **labels) == 2
    assert value(metrics, "testbed_link_queueing_delay_seconds_total", **labels) == 0.5
    assert value(metrics, "testbed_link_queue_drops_total", **labels) == 3
    assert value(metrics, "testbed_link_mean_queueing_delay_seconds", **labels) == pytest.approx(0.05)
    assert value(metrics, "testbed_link_payload_bytes_total", **{**labels, "direction": "uplink"}) == 77


def test_every_metric_follows_naming_and_label_rules() -> None:
    metrics = RunMetrics("r1", "dpu", "s", 0.1)
    metrics.add_device("d0", "rpi4", FakeLink())
    metrics.record_device_report(report(), 0)
    metrics.record_round(0, 1, 0.5, 10, 100, 8)
    allowed_labels = {"run", "device", "profile", "strategy", "phase", "direction", "le", "scenario", "ratio", "action"}
    families = list(text_string_to_metric_families(generate_latest(metrics.registry).decode()))
    assert len(families) >= 25
    for family in families:
        assert family.name.startswith("testbed_"), family.name
        if family.type == "counter":
            assert all(sample.name.endswith(("_total", "_created")) for sample in family.samples), family.name
        for sample in family.samples:
            assert set(sample.labels) <= allowed_labels, (sample.name, sample.labels)
            assert sample.labels.get("run") == "r1", sample.name


def test_every_event_action_is_served_at_zero_before_it_fires() -> None:
    """So that Grafana's annotation (a change of the counter) marks an action's first firing too."""
    metrics = RunMetrics("r1", "dpu")
    metrics.record_event("outage")
    served = {action: value(metrics, "testbed_events_total", run="r1", action=action) for action in EVENT_ACTIONS}
    assert served == {**dict.fromkeys(EVENT_ACTIONS, 0.0), "outage": 1.0}


async def test_exporter_serves_the_registry_and_frees_the_port() -> None:
    metrics = RunMetrics("r1", "dpu")
    metrics.add_device("d0", "rpi4", FakeLink())
    async with MetricsExporter(metrics.registry, "127.0.0.1", 0) as exporter:
        with urllib.request.urlopen(exporter.url, timeout=5) as response:
            text = response.read().decode()
    assert 'testbed_link_wire_bytes_total{device="d0",direction="downlink",profile="rpi4",run="r1"} 0.0' in text
    assert "testbed_run_info{" in text


def test_monitoring_guide_names_the_files_and_urls(tmp_path: object) -> None:
    guide = monitoring_guide(exporter_port=9999)
    assert "http://127.0.0.1:9999/metrics" in guide
    assert "compose.yaml" in guide and "prometheus.yml" in guide and "http://127.0.0.1:3000" in guide


def test_rejections_by_reason_count_what_the_running_totals_add() -> None:
    metrics = RunMetrics("r1", "dpu")
    labels = {"run": "r1", "device": "d0", "profile": "rpi4"}
    metrics.record_rejections(report(rejected_by_reason={"unsigned": 2, "bad_chunk": 1}))
    metrics.record_rejections(report(rejected_by_reason={"unsigned": 2, "bad_chunk": 1}))  # the same report again
    metrics.record_rejections(report(rejected_by_reason={"unsigned": 5, "bad_chunk": 1}))
    assert value(metrics, "testbed_device_rejected_updates_total", **labels, reason="unsigned") == 5
    assert value(metrics, "testbed_device_rejected_updates_total", **labels, reason="bad_chunk") == 1
