"""monitoring/: a real Prometheus finds runs by their target files, scrapes a live lowband run and answers every
dashboard panel and the event annotation; config files are sound."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from channel.link import LinkCounters
from testbed.cli import main
from testbed.core.messages import DeviceReport
from testbed.metrics import MetricsExporter, RunMetrics
from testbed.prometheus_targets import (TARGETS_DIRECTORY_VARIABLE, TargetRegistration, run_labels, scrape_address,
                                        targets_directory)
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
TARGET_LABELS = {"run_id", "scenario", "strategy", "job", "instance"}  # what Prometheus adds to a run's series


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def with_grafana_variables(expr: str, overrides: Mapping[str, str] | None = None) -> str:
    """PromQL as Grafana sends it: the dashboard's variables replaced (GRAFANA_VARIABLES, or as `overrides` say)."""
    for variable, replacement in {**GRAFANA_VARIABLES, **(overrides or {})}.items():
        expr = expr.replace(variable, replacement)
    assert "$" not in expr, f"unreplaced Grafana variable: {expr}"
    return expr


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title / refId, PromQL with Grafana's variables replaced) for every target of every panel."""
    return [(f"{panel['title']} / {target['refId']}", with_grafana_variables(target["expr"]))
            for panel in board["panels"] for target in panel.get("targets", [])]


def event_annotation(board: dict[str, Any]) -> dict[str, Any]:
    """The dashboard's one Prometheus annotation: scenario events from testbed_events_total."""
    (annotation,) = [entry for entry in board["annotations"]["list"] if entry.get("datasource", {}).get("type")
                     == "prometheus"]
    return annotation


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


def test_the_event_annotation_is_a_grafana_prometheus_annotation_by_action() -> None:
    annotation = event_annotation(dashboard())
    assert annotation["name"] and annotation["enable"] is True and annotation["hide"] is False
    assert annotation["datasource"] == {"type": "prometheus", "uid": "prometheus"}
    target = annotation["target"]  # the query Grafana (9+) runs; its interval is the annotation's min step
    assert target["datasource"] == annotation["datasource"] and target["refId"]
    assert re.fullmatch(r"\d+s", target["interval"])
    expr = target["expr"]
    # Grafana marks the times a series is above 0: a change of the counter, not its (ever positive) total.
    assert re.fullmatch(r'changes\(testbed_events_total\{run=~"\$run"\}\[\$__rate_interval\]\) > 0', expr), expr
    assert "{{action}}" in annotation["titleFormat"] and "action" in annotation["tagKeys"].split(",")
    assert annotation.get("useValueForTime") is False


async def test_the_event_annotation_reads_what_an_exporter_serves_after_an_event() -> None:
    """Its metric and every label it names are in a real scrape of an exporter that recorded an event."""
    annotation = event_annotation(dashboard())
    metrics = RunMetrics("r", "dpu", "s", 0.05)
    metrics.record_event("outage")
    async with MetricsExporter(metrics.registry, "127.0.0.1", 0) as exporter:
        scraped = await asyncio.to_thread(lambda: urllib.request.urlopen(exporter.url, timeout=10).read().decode())
    samples = [sample for family in text_string_to_metric_families(scraped) for sample in family.samples]
    for name in re.findall(r"testbed_\w+", annotation["target"]["expr"]):
        series = {sample.labels["action"]: sample.value for sample in samples if sample.name == name}
        assert series["outage"] == 1, name
        assert set(series.values()) == {0.0, 1.0}  # every other action is served at 0 before it first fires
    served_labels = {label for sample in samples if sample.name == "testbed_events_total" for label in sample.labels}
    named = set(re.findall(r"\{\{(\w+)\}\}", annotation["titleFormat"] + annotation["textFormat"]))
    named |= set(annotation["tagKeys"].split(",")) | set(re.findall(r"(\w+)=~", annotation["target"]["expr"]))
    assert named <= served_labels | TARGET_LABELS, named - served_labels - TARGET_LABELS


def compose_interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Compose's `${VAR}` and `${VAR:-default}`, nested (docs.docker.com/reference/compose-file/interpolation)."""
    def variable(start: int) -> tuple[str, int]:  # text[start:] follows "${"; returns the value and where it ends
        name = re.match(r"[A-Za-z_]\w*", text[start:])
        assert name, text[start:]
        at = start + name.end()
        default = ""
        if text.startswith(":-", at):
            default, at = expand(at + 2, stop="}")
        assert text.startswith("}", at), text[at:]
        return environ.get(name.group()) or default, at + 1

    def expand(at: int, stop: str = "") -> tuple[str, int]:
        out = []
        while at < len(text) and not (stop and text.startswith(stop, at)):
            if text.startswith("${", at):
                value, at = variable(at + 2)
                out.append(value)
            else:
                out.append(text[at])
                at += 1
        return "".join(out), at

    return expand(0)[0]


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
    (scrape,) = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"]
    assert scrape["honor_labels"] is True and "static_configs" not in scrape
    (file_sd,) = scrape["file_sd_configs"]
    (pattern,) = file_sd["files"]  # relative to the config file: /etc/prometheus in the container
    assert Path(pattern).name == "*.json" and not Path(pattern).is_absolute()
    config_file = next(argument.split("=", 1)[1] for argument in services["prometheus"]["command"]
                       if argument.startswith("--config.file="))
    in_container = f":{Path(config_file).parent / Path(pattern).parent}"  # where the container reads the targets
    (volume,) = [volume for volume in services["prometheus"]["volumes"] if in_container in volume]
    mounted, _, options = volume.rpartition(in_container)
    assert options == ":ro" and TARGETS_DIRECTORY_VARIABLE in mounted
    home = str(Path.home())
    for environ in ({"HOME": home}, {"HOME": home, "XDG_STATE_HOME": "/state"},
                    {"HOME": home, "XDG_STATE_HOME": "/state", TARGETS_DIRECTORY_VARIABLE: "/mine"}):
        assert Path(compose_interpolate(mounted, environ)) == targets_directory(None, environ), environ


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
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(Prometheus base URL, the targets folder it reads), from monitoring/prometheus.yml; it scrapes every second."""
    binary = prometheus_binary()
    web_port = free_port()
    targets = tmp_path / "targets"
    targets.mkdir()
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    (scrape,) = config["scrape_configs"]
    scrape["file_sd_configs"][0]["files"] = [str(targets / "*.json")]  # the shipped one, read from this folder
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
        yield base, targets
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


def poll(read: Callable[[], Any], predicate: Callable[[Any], bool], timeout_s: float) -> Any:
    """What `read` returns once `predicate` holds for it, or its last answer after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = read()
        if predicate(answer) or time.monotonic() > deadline:
            return answer
        time.sleep(0.25)


def wait_for(base: str, query: str, predicate: Callable[[Any], bool], timeout_s: float) -> list[dict[str, Any]]:
    return poll(lambda: api(base, "/api/v1/query", query=query)["result"], predicate, timeout_s)


def active_targets(base: str, run_id: str) -> list[dict[str, Any]]:
    """The targets Prometheus scrapes for a run (from its target file), with their health."""
    return [target for target in api(base, "/api/v1/targets", state="active")["activeTargets"]
            if target["labels"].get("run_id") == run_id]


def wait_for_targets(base: str, run_id: str, predicate: Callable[[Any], bool],
                     timeout_s: float) -> list[dict[str, Any]]:
    return poll(lambda: active_targets(base, run_id), predicate, timeout_s)


DISCOVERY_TIMEOUT_S = 60.0
"""Prometheus passes discovered targets on at most every 5 s, and re-reads the folder every 10 s without inotify."""


@pytest.mark.slow
async def test_prometheus_finds_a_registered_exporter_marks_its_event_and_forgets_it(
        prometheus: tuple[str, Path]) -> None:
    base, targets = prometheus
    run_id, warnings = "discovered-20250101-120000-ab12", []
    metrics = RunMetrics(run_id, "dpu", "discovery", 0.05)
    annotation = with_grafana_variables(event_annotation(dashboard())["target"]["expr"], {"$run": run_id})
    async with MetricsExporter(metrics.registry, "127.0.0.1", 0) as exporter:  # port 0: any port is found
        registered_at = time.monotonic()
        with TargetRegistration(targets, run_id, scrape_address(exporter.host, exporter.port),
                                run_labels(run_id, "discovery", "dpu"), warnings.append):
            up = await asyncio.to_thread(wait_for, base, f'up{{run_id="{run_id}"}} == 1', bool, DISCOVERY_TIMEOUT_S)
            discovered_s = time.monotonic() - registered_at
            assert up, f"not scraped within {DISCOVERY_TIMEOUT_S:.0f} s: {active_targets(base, run_id)}"
            (series,) = up
            assert series["metric"] == {"__name__": "up", "job": "testbed", "instance": f"127.0.0.1:{exporter.port}",
                                        "run_id": run_id, "scenario": "discovery", "strategy": "dpu"}
            # honor_labels: the run's own labels stand, none renamed exported_*; the target's are added.
            (rounds,) = api(base, "/api/v1/query", query=f'testbed_server_rounds_total{{run_id="{run_id}"}}')["result"]
            assert {key: value for key, value in rounds["metric"].items() if key not in ("job", "instance")} == {
                "__name__": "testbed_server_rounds_total", "run": run_id, "strategy": "dpu", "run_id": run_id,
                "scenario": "discovery"}

            # The annotation marks nothing while no event fired (every action's counter is served at 0) ...
            scraped_twice = f'count_over_time(testbed_events_total{{run_id="{run_id}",action="outage"}}[1m]) >= 2'
            assert await asyncio.to_thread(wait_for, base, scraped_twice, bool, 30)
            assert api(base, "/api/v1/query", query=annotation)["result"] == []
            # ... and the first firing of an action, labelled with that action, once it has been scraped.
            metrics.record_event("outage")
            fired_at = time.monotonic()
            marked = await asyncio.to_thread(wait_for, base, annotation, bool, 30)
            marked_s = time.monotonic() - fired_at
            assert [(sample["metric"]["action"], sample["metric"]["run"], float(sample["value"][1]))
                    for sample in marked] == [("outage", run_id, 1.0)]
        assert list(targets.iterdir()) == []
        removed_at = time.monotonic()
        left = await asyncio.to_thread(wait_for_targets, base, run_id, lambda found: not found, DISCOVERY_TIMEOUT_S)
        forgotten_s = time.monotonic() - removed_at
        assert left == [], f"still scraped {DISCOVERY_TIMEOUT_S:.0f} s after its file was removed"
    assert warnings == []
    print(f"prometheus: exporter on port {exporter.port} scraped {discovered_s:.1f} s after it registered, "
          f"its event annotated {marked_s:.1f} s after it fired, forgotten {forgotten_s:.1f} s after its file went")


KILLED_RUN = """
import asyncio, sys
from pathlib import Path
from testbed.metrics import MetricsExporter, RunMetrics
from testbed.prometheus_targets import TargetRegistration, run_labels, scrape_address

async def serve(targets: Path, run_id: str) -> None:
    metrics = RunMetrics(run_id, "dpu", "killed")
    async with MetricsExporter(metrics.registry, "127.0.0.1", 0) as exporter:
        with TargetRegistration(targets, run_id, scrape_address(exporter.host, exporter.port),
                                run_labels(run_id, "killed", "dpu"), print):
            await asyncio.sleep(600)

asyncio.run(serve(Path(sys.argv[1]), sys.argv[2]))
"""


@pytest.mark.slow
def test_the_file_of_a_killed_run_is_a_target_down_and_nothing_more(prometheus: tuple[str, Path]) -> None:
    base, targets = prometheus
    run_id = "killed-20250101-120000-cd34"
    process = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(targets), run_id], cwd=REPO)
    try:
        up = wait_for(base, f'up{{run_id="{run_id}"}} == 1', bool, DISCOVERY_TIMEOUT_S)
        assert up, f"the run was not scraped: {active_targets(base, run_id)}"
    finally:
        process.kill()  # SIGKILL: no clean-up runs
        process.wait(timeout=20)
    assert (targets / f"{run_id}.json").exists()
    down = wait_for(base, f'up{{run_id="{run_id}"}} == 0', bool, 30)
    assert down, "the killed run's target is not reported down"
    (target,) = active_targets(base, run_id)
    assert target["health"] == "down" and "connection refused" in target["lastError"]
    (targets / f"{run_id}.json").unlink()  # what the README says to do with such a file
    assert wait_for_targets(base, run_id, lambda found: not found, DISCOVERY_TIMEOUT_S) == []


@pytest.mark.slow
async def test_prometheus_scrapes_a_live_lowband_run_and_answers_every_panel(
        prometheus: tuple[str, Path], tmp_path: Path) -> None:
    base, targets = prometheus
    scenario = load_scenario(REPO / "scenarios" / "lowband.yaml",
                             [f"rounds={ROUNDS}", "metrics.port=0", f"metrics.targets_dir={targets}"])
    answers: dict[str, list[dict[str, Any]]] = {}
    scrape_counts: list[float] = []
    run = ScenarioRun(scenario, tmp_path / "out")

    def query_the_live_run() -> None:
        wait_for(base, "testbed_server_rounds_total",
                 lambda result: bool(result) and float(result[0]["value"][1]) == ROUNDS, timeout_s=20)
        time.sleep(2.5)  # two more scrapes, so every rate() has its latest samples
        scrapes = api(base, "/api/v1/query", query=f'count_over_time(up{{run_id="{run.run_id}"}}[5m])')["result"]
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
    renamed = {name for name, series in answers.items() for sample in series
               if any(label.startswith("exported_") for label in sample["metric"])}
    assert not renamed, f"labels renamed exported_* (honor_labels off?): {renamed}"
    assert list(targets.iterdir()) == [], "the run left its target file"

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
