"""Metrics pushed to a real Prometheus Pushgateway after every round, and a run that survives a dead one."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.runner import ScenarioRun
from testbed.core.scenario import ScenarioError, parse_scenario
from tests.conftest import debian_tool, free_port, wait_for_port


def pushgateway_binary() -> str:
    return debian_tool("prometheus-pushgateway")


@pytest.fixture
def pushgateway(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "pushgateway.log", "w")
    process = subprocess.Popen([pushgateway_binary(), f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def small_scenario(pushgateway_url: str) -> object:
    return parse_scenario({
        "name": "push", "seed": 2, "rounds": 2, "model": {"hidden": [16]},
        "update": {"epochs": 2, "skip_if_worse": False},
        "devices": [{"profile": "rpi4", "count": 2}],
        "metrics": {"port": 0, "pushgateway": pushgateway_url},
    })


async def test_every_round_is_pushed(pushgateway: str, tmp_path: Path) -> None:
    result = await ScenarioRun(small_scenario(pushgateway), tmp_path / "out").execute()
    assert result.summary["pushgateway"] == {"url": pushgateway, "pushes": 2, "errors": []}
    with urllib.request.urlopen(f"{pushgateway}/metrics", timeout=5) as response:
        text = response.read().decode()
    run_id = result.summary["run_id"]
    assert f'testbed_server_round{{instance="",job="edge-testbed",run="{run_id}",strategy="dpu"}} 1\n' in text
    assert "testbed_device_model_version" in text and "testbed_device_energy_joules_total" in text


async def test_a_dead_pushgateway_is_reported_not_fatal(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = await ScenarioRun(small_scenario(url), tmp_path / "out").execute()
    push = result.summary["pushgateway"]
    assert push["pushes"] == 0 and len(push["errors"]) == 2 and url in push["errors"][0]
    assert all(state["hash_matches_server"] for state in result.summary["devices"].values())


def test_pushgateway_must_be_an_http_url() -> None:
    with pytest.raises(ScenarioError, match="metrics.pushgateway"):
        small_scenario("tcp://127.0.0.1:9091")
