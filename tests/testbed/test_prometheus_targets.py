"""testbed.prometheus_targets: where a run registers, what its file says; the file lives as long as the exporter."""

from __future__ import annotations

import ipaddress
import json
import urllib.parse
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.core.scenario import ScenarioError, parse_scenario
from testbed.core.signing import SigningKey
from testbed.metrics import RunMetrics, monitoring_guide
from testbed.prometheus_targets import (
    TARGETS_DIRECTORY_VARIABLE,
    TargetRegistration,
    run_labels,
    scrape_address,
    target_file_name,
    target_file_text,
    targets_directory,
)
from testbed.run_assembly import RunAssembly

LABELS = run_labels("lowband-20250101-120000-ab12", "lowband", "dpu")


def scenario(**metrics: Any) -> Any:
    return parse_scenario({"name": "targets", "rounds": 1, "devices": [{"profile": "rpi4", "count": 1}],
                           "metrics": metrics})


# --- where ---------------------------------------------------------------------------------------------------

def test_the_folder_is_the_scenarios_then_the_variables_then_the_xdg_state_home(tmp_path: Path) -> None:
    home = Path.home()
    everything = {TARGETS_DIRECTORY_VARIABLE: str(tmp_path / "env"), "XDG_STATE_HOME": str(tmp_path / "state")}
    assert targets_directory(tmp_path / "scenario", everything) == tmp_path / "scenario"
    assert targets_directory("~/targets", everything) == home / "targets"
    assert targets_directory(None, everything) == tmp_path / "env"
    assert targets_directory(None, {TARGETS_DIRECTORY_VARIABLE: "~/t"}) == home / "t"
    assert targets_directory(None, {"XDG_STATE_HOME": str(tmp_path / "state")}) == \
        tmp_path / "state" / "edge-testbed" / "prometheus-targets"
    default = home / ".local" / "state" / "edge-testbed" / "prometheus-targets"
    assert targets_directory(None, {}) == default
    assert targets_directory(None, {TARGETS_DIRECTORY_VARIABLE: "", "XDG_STATE_HOME": ""}) == default
    assert targets_directory(None, {"XDG_STATE_HOME": "relative/state"}) == default  # the XDG spec ignores it


def test_the_scenario_takes_a_targets_dir_and_names_a_bad_one() -> None:
    assert scenario(targets_dir="/tmp/t").metrics.targets_dir == Path("/tmp/t")
    assert scenario().metrics.targets_dir is None
    with pytest.raises(ScenarioError, match=r"metrics\.targets_dir: Input is not a valid path .*\(got 5\)"):
        scenario(targets_dir=5)


# --- what ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("host", "address"), [
    ("127.0.0.1", "127.0.0.1:9464"), ("0.0.0.0", "127.0.0.1:9464"), ("", "127.0.0.1:9464"), ("::", "[::1]:9464"),
    ("::1", "[::1]:9464"), ("192.0.2.7", "192.0.2.7:9464"), ("edge-host", "edge-host:9464"),
])
def test_the_scrape_address_of_a_listen_address(host: str, address: str) -> None:
    assert scrape_address(host, 9464) == address


@given(st.ip_addresses(), st.integers(0, 65535))
def test_a_scrape_address_reads_back_as_the_host_and_port(address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                           port: int) -> None:
    parsed = urllib.parse.urlsplit("//" + scrape_address(str(address), port))
    assert parsed.port == port
    assert parsed.hostname is not None
    expected = "127.0.0.1" if str(address) == "0.0.0.0" else "::1" if str(address) == "::" else str(address)
    assert ipaddress.ip_address(parsed.hostname) == ipaddress.ip_address(expected)


@given(st.dictionaries(st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,20}", fullmatch=True), st.text(max_size=40),
                       max_size=5))
def test_the_file_is_one_file_sd_target_group(labels: dict[str, str]) -> None:
    assert json.loads(target_file_text("127.0.0.1:1", labels)) == [{"targets": ["127.0.0.1:1"], "labels": labels}]


def test_the_file_is_named_after_the_run_and_only_that() -> None:
    assert target_file_name("lowband-20250101-120000-ab12") == "lowband-20250101-120000-ab12.json"
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="a run id names one file"):
            target_file_name(bad)


# --- how long ------------------------------------------------------------------------------------------------

def test_the_file_exists_while_registered_and_is_gone_after_also_on_an_error(tmp_path: Path) -> None:
    warnings: list[str] = []
    folder = tmp_path / "new" / "targets"  # created on demand
    registration = TargetRegistration(folder, LABELS["run_id"], "127.0.0.1:5", LABELS, warnings.append)
    with registration:
        assert [path.name for path in folder.iterdir()] == [f"{LABELS['run_id']}.json"]  # no temporary file left
        assert json.loads(registration.path.read_text()) == [{"targets": ["127.0.0.1:5"], "labels": LABELS}]
    assert list(folder.iterdir()) == []
    with pytest.raises(RuntimeError, match="the run failed"):
        with TargetRegistration(folder, "other-run", "127.0.0.1:6", LABELS, warnings.append) as second:
            assert second.path.exists()
            raise RuntimeError("the run failed")
    assert list(folder.iterdir()) == [] and warnings == []


def test_two_runs_register_side_by_side_and_a_file_removed_by_hand_is_no_error(tmp_path: Path) -> None:
    warnings: list[str] = []
    with TargetRegistration(tmp_path, "run-a", "127.0.0.1:5", LABELS, warnings.append) as first:
        with TargetRegistration(tmp_path, "run-b", "127.0.0.1:6", LABELS, warnings.append):
            assert sorted(path.name for path in tmp_path.iterdir()) == ["run-a.json", "run-b.json"]
            first.path.unlink()
        assert list(tmp_path.iterdir()) == []
    assert warnings == []


def test_a_folder_it_cannot_write_is_one_line_of_warning_not_a_failure(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    warnings: list[str] = []
    with TargetRegistration(not_a_folder, "run-a", "127.0.0.1:5", LABELS, warnings.append) as registration:
        assert not registration.registered
    (warning,) = warnings
    assert warning == (f"Prometheus will not find this run: cannot write {not_a_folder}/run-a.json (not a folder); "
                       f"set metrics.targets_dir or ${TARGETS_DIRECTORY_VARIABLE} to a writable folder")
    assert "\n" not in warning and not_a_folder.read_text() == ""


# --- in the run ----------------------------------------------------------------------------------------------

async def test_the_runs_exporter_is_registered_while_it_serves(tmp_path: Path) -> None:
    targets = tmp_path / "targets"
    spec = scenario(port=0, targets_dir=str(targets))
    progress: list[tuple[str, dict[str, Any]]] = []
    assembly = RunAssembly(spec, "targets-run", tmp_path / "out", RunMetrics("targets-run", "dpu", "targets"),
                           lambda event, data: progress.append((event, data)), SigningKey.generate().trusted_key)
    with pytest.raises(RuntimeError, match="a failure after the exporter started"):
        async with AsyncExitStack() as stack:
            await assembly.exporter(stack)
            assert assembly.metrics_url is not None
            (group,) = json.loads((targets / "targets-run.json").read_text())
            assert group["labels"] == {"run_id": "targets-run", "scenario": "targets", "strategy": "dpu"}
            (address,) = group["targets"]
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:  # what Prometheus scrapes
                assert b'testbed_server_rounds_total{run="targets-run",strategy="dpu"} 0.0' in response.read()
            raise RuntimeError("a failure after the exporter started")
    assert list(targets.iterdir()) == [] and progress == []


async def test_a_run_whose_folder_cannot_be_written_warns_and_serves(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("")
    progress: list[tuple[str, dict[str, Any]]] = []
    assembly = RunAssembly(scenario(port=0, targets_dir=str(blocked)), "warned-run", tmp_path / "out",
                           RunMetrics("warned-run", "dpu"), lambda event, data: progress.append((event, data)),
                           SigningKey.generate().trusted_key)
    async with AsyncExitStack() as stack:
        await assembly.exporter(stack)
        assert assembly.metrics_url is not None
    ((event, data),) = progress
    assert event == "warning" and data["message"].startswith("Prometheus will not find this run: cannot write")


def test_the_guide_says_where_runs_register(tmp_path: Path) -> None:
    guide = monitoring_guide(targets_dir=tmp_path / "targets")
    assert f"{tmp_path / 'targets'}/<run id>.json" in guide
    assert f'files: ["{tmp_path / "targets"}/*.json"]' in guide and "honor_labels: true" in guide
