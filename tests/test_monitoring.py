"""monitoring/: a real Prometheus scrapes a live lowband run and answers every dashboard panel; config files are sound."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from channel.link import LinkCounters
from testbed.cli import main
from testbed.core.messages import DeviceReport
from testbed.metrics import RunMetrics
from testbed.runner import ScenarioRun
from testbed.core.scenario import load_scenario
from tests.conftest import debian_tool, free_port

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "edge-testbed.json"
PANEL_TYPES = {"timeseries", "stat", "table", "barchart", "state-timeline", "status-history", "gauge", "bargauge",
               "heatmap", "histogram", "piechart", "text", "row"}
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m", "$run": ".*"}
ROUNDS = 3


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with Grafana's variables replaced) for every target of every panel."""
    queries = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, replacement in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, replacement)
            assert "$" not in expr, f"unreplaced Grafana variable in {panel['title']}: {expr}"
            queries.append((f"{panel['title']} / {target['refId']}", expr))
    return queries


# --- the files, without any server ---------------------------------------------------------------------------

def test_dashboard_has_grafana_basics() -> None:
    board = dashboard()
    assert board["uid"] == "edge-testbed" and board["title"]
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)) >= 12
    titles = [panel["title"] for panel in board["panels"]]
    assert len(titles) == len(set(titles)), "panel titles name the panels: keep them unique"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        grid = panel["gridPos"]
        assert all(isinstance(grid[key], int) for key in ("h", "w", "x", "y")), panel["title"]
        assert grid["h"] > 0 and grid["w"] > 0 and 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & occupied, f"panel {panel['title']} overlaps another"
        occupied |= cells
        targets = panel["targets"]
        assert targets and len({target["refId"] for target in targets}) == len(targets), panel["title"]
        for target in targets:
            assert target["datasource"]["uid"] == "prometheus" and target["expr"].strip(), panel["title"]
    for variable in board["templating"]["list"]:
        assert variable["datasource"]["uid"] == "prometheus"
    titles = " ".join(panel["title"].lower() for panel in board["panels"])
    for topic in ("fleet accuracy", "per-device accuracy", "bytes", "airtime", "energy", "delivery", "loss",
                  "model versions", "online"):
        assert topic in titles, topic
    assert any("histogram_quantile" in target["expr"] for panel in board["panels"] for target in panel["targets"])


def test_dashboard_uses_only_metrics_the_testbed_defines() -> None:
    class Link:
        downlink_counters = uplink_counters = LinkCounters()

    metrics = RunMetrics("r", "dpu", "s", 0.05)
    metrics.add_device("d", "rpi4", Link())
    metrics.record_round(0, 1, 0.9, 10, 100, 8)
    report = DeviceReport(
        device="d", profile="rpi4", version=1, weights_hash="ab", accuracy=0.9, update_bytes=10, received_bytes=10,
        transmitted_bytes=5, total_received_bytes=10, delivery_seconds=1.0, apply_seconds=0.1, evaluate_seconds=0.1,
        energy_joules=1.0, energy_joules_by_phase={"receive": 1.0}, phase_seconds={"receive": 0.5},
        total_energy_joules=1.0, rejected_updates=1, rejected_by_reason={"unsigned": 1})
    metrics.record_rejections(report)  # as the run does for every report it receives
    metrics.record_device_report(report, 0)
    exported = set(re.findall(r"^(testbed_\w+?)[{ ]", generate_latest(metrics.registry).decode(), flags=re.M))
    used = {name for _, expr in panel_queries(dashboard()) for name in re.findall(r"testbed_\w+", expr)}
    assert used and used <= exported, used - exported


def test_provisioning_and_compose_fit_together() -> None:
    datasources = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["uid"] == "prometheus" and source["type"] == "prometheus"
    assert source["url"] == "http://127.0.0.1:9090"
    providers = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/dashboards.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "$TESTBED_DASHBOARDS"
    compose = yaml.safe_load((MONITORING / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"mosquitto", "prometheus", "grafana"}
    grafana = services["grafana"]
    mounts = dict(volume.split(":")[:2] for service in services.values() for volume in service.get("volumes", [])
                  if volume.startswith("./"))
    for source_path in mounts:
        assert (MONITORING / source_path).exists(), source_path
    assert mounts["./grafana/dashboards"] == grafana["environment"]["TESTBED_DASHBOARDS"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    scrape = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["static_configs"][0]["targets"] == ["127.0.0.1:9464"]


def test_monitoring_command_says_where_to_look(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["monitoring"]) == 0
    out = capsys.readouterr().out
    assert str(MONITORING / "compose.yaml") in out and "http://127.0.0.1:3000/d/edge-testbed" in out


# --- a real Prometheus against a live run --------------------------------------------------------------------

def prometheus_binary() -> str:
    return debian_tool("prometheus")


def api(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """(Prometheus base URL, exporter port it scrapes every second), from monitoring/prometheus.yml."""
    binary = prometheus_binary()
    exporter_port, web_port = free_port(), free_port()
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{exporter_port}"]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    promtool = shutil.which("promtool")
    for checked in filter(None, [promtool and MONITORING / "prometheus.yml", promtool and config_file]):
        completed = subprocess.run([promtool, "check", "config", str(checked)], capture_output=True, text=True, timeout=30)
        assert completed.returncode == 0, completed.stdout + completed.stderr
    log = open(tmp_path / "prometheus.log", "w")
    process = subprocess.Popen(
        [binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{web_port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield base, exporter_port
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def wait_for(base: str, query: str, predicate: Any, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = api(base, "/api/v1/query", query=query)["result"]
        if predicate(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


@pytest.mark.slow
async def test_prometheus_scrapes_a_live_lowband_run_and_answers_every_panel(
        prometheus: tuple[str, int], tmp_path: Path) -> None:
    base, exporter_port = prometheus
    scenario = load_scenario(REPO / "scenarios" / "lowband.yaml",
                             [f"rounds={ROUNDS}", f"metrics.port={exporter_port}"])
    answers: dict[str, list[dict[str, Any]]] = {}
    scrape_counts: list[float] = []
    run = ScenarioRun(scenario, tmp_path / "out")

    def query_the_live_run() -> None:
        wait_for(base, "testbed_server_rounds_total",
                 lambda result: bool(result) and float(result[0]["value"][1]) == ROUNDS, timeout_s=20)
        time.sleep(2.5)  # two more scrapes, so every rate() has its latest samples
        scrapes = api(base, "/api/v1/query", query='count_over_time(up{job="testbed"}[5m])')["result"]
        scrape_counts.extend(float(sample["value"][1]) for sample in scrapes)
        for name, expr in panel_queries(dashboard()):
            answers[name] = api(base, "/api/v1/query", query=expr)["result"]

    # The run is held open after its final round while Prometheus scrapes it and every panel is queried
    # live. The queries block, so they run in a thread the run awaits at the step that follows each
    # round's report (its Pushgateway push); blocking the event loop itself in a progress callback
    # would stall the broker, the links and the MQTT keepalives for those seconds.
    assert hasattr(run, "_push_metrics"), "the runner no longer pushes after each round: move this hold"
    push_after_round = run._push_metrics

    async def hold_open_after_the_final_round() -> None:
        if len(run.rounds) == ROUNDS:
            await asyncio.wait_for(asyncio.to_thread(query_the_live_run), 120)
        await push_after_round()

    run._push_metrics = hold_open_after_the_final_round  # type: ignore[method-assign]
    result = await asyncio.wait_for(run.execute(), 240)
    assert all(state["hash_matches_server"] for state in result.summary["devices"].values())

    print(f"prometheus: {scrape_counts[0] if scrape_counts else 0:.0f} scrapes of the live run, "
          f"{sum(bool(series) for series in answers.values())}/{len(answers)} panel queries answered, "
          f"{sum(len(series) for series in answers.values())} series")
    assert scrape_counts and scrape_counts[0] >= 2, scrape_counts
    assert len(answers) == len(panel_queries(dashboard()))
    empty = [name for name, series in answers.items() if not series]
    assert not empty, f"panels without data: {empty}"
    no_number = [name for name, series in answers.items()
                 if not any(math.isfinite(float(sample["value"][1])) for sample in series)]
    assert not no_number, f"panels with only NaN/Inf: {no_number}"

    # What the panels show is what the run did.
    assert len(answers["Per-device accuracy / A"]) == 5
    assert len(answers["Link wire throughput / A"]) == 10  # 5 devices x 2 directions
    assert float(answers["Devices online / A"][0]["value"][1]) == 5
    info = answers["Run / A"][0]["metric"]
    assert (info["scenario"], info["strategy"], info["ratio"]) == ("lowband", "dpu", "0.05")
    final_version = result.summary["server"]["final_version"]
    versions = [float(sample["value"][1]) for sample in answers["Model versions / A"]]
    assert versions == [final_version] * 5
    energy = {(s["metric"]["device"], s["metric"]["phase"]): float(s["value"][1])
              for s in answers["Energy per device and phase / A"]}
    assert len(energy) == 5 * 4
    for device, state in result.summary["devices"].items():
        total = sum(joules for (name, _), joules in energy.items() if name == device)
        assert total == pytest.approx(state["energy_joules"], rel=1e-6)
