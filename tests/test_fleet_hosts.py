"""Two hosts as two network namespaces joined by a veth: the run and a Mosquitto in one, `testbed fleet` running
part of the emulated devices in the other, every device converging (issue 13 item 5). Needs root."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from channel.netns import NetworkNamespace
from tests.channel.test_netem import netns  # noqa: F401 - the fixture: skip (fail when CI=true) without namespaces
from tests.test_fleet_workers import SMALL

REPO = Path(__file__).resolve().parents[1]
BROKER_PORT = 1883  # the namespace is this test's own: no other listener can hold the port there


@pytest.fixture
def two_hosts(netns: None) -> Iterator[tuple[NetworkNamespace, NetworkNamespace, str, str]]:
    """Namespaces A and B with a veth between them: (A, B, A's address, B's address); deleted after the test."""
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    a_address, b_address = f"{subnet}.1", f"{subnet}.2"
    with NetworkNamespace() as host_a, NetworkNamespace() as host_b:
        suffix = secrets.token_hex(3)
        a_end, b_end = f"fa{suffix}", f"fb{suffix}"
        host_a.ip("link", "add", a_end, "type", "veth", "peer", "name", b_end, "netns", host_b.name)
        host_a.ip("addr", "add", f"{a_address}/30", "dev", a_end)
        host_b.ip("addr", "add", f"{b_address}/30", "dev", b_end)
        host_a.ip("link", "set", a_end, "up")
        host_b.ip("link", "set", b_end, "up")
        yield host_a, host_b, a_address, b_address


def _in(namespace: NetworkNamespace, args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as output:
        return subprocess.Popen(["ip", "netns", "exec", namespace.name, *args], stdout=output,
                                stderr=subprocess.STDOUT, cwd=REPO)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.mark.slow
def test_a_fleet_worker_on_another_host_runs_its_devices_and_every_device_converges(
        two_hosts: tuple[NetworkNamespace, NetworkNamespace, str, str], tmp_path: Path) -> None:
    host_a, host_b, a_address, _ = two_hosts
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    config = tmp_path / "mosquitto.conf"
    config.write_text(f"user root\nlistener {BROKER_PORT} {a_address}\nallow_anonymous true\npersistence false\n")
    started: list[subprocess.Popen[bytes]] = []
    try:
        started.append(_in(host_a, [mosquitto, "-c", str(config)], tmp_path / "mosquitto.log"))
        scenario: dict[str, Any] = {**SMALL, "broker": f"mqtt://{a_address}:{BROKER_PORT}",
                                    "fleet": {"remote": ["cell-a", "jetson-nano-0..1"]}}
        path = tmp_path / "scenario.yaml"
        path.write_text(yaml.safe_dump(scenario))
        run = _in(host_a, [sys.executable, "-m", "testbed", "run", str(path), "--out", str(tmp_path / "out")],
                  tmp_path / "run.log")
        started.append(run)
        fleet = _in(host_b, [sys.executable, "-m", "testbed", "fleet", "--broker", f"{a_address}:{BROKER_PORT}",
                             "--devices", "cell-a,jetson-nano-0..1", "--worker", "host-b"], tmp_path / "fleet.log")
        started.append(fleet)
        assert run.wait(600) == 0, (tmp_path / "run.log").read_text()[-3000:]
        assert fleet.wait(60) == 0, (tmp_path / "fleet.log").read_text()[-3000:]
    finally:
        for process in reversed(started):
            _stop(process)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["server"]["final_version"] == 2
    for device, fields in summary["devices"].items():
        assert fields["final_version"] == 2 and fields["hash_matches_server"], (device, fields)
    fleet_output = (tmp_path / "fleet.log").read_text()
    assert f"fleet host-b: run {summary['run_id']}, 4 devices (rpi4-2 … jetson-nano-1)" in fleet_output
    assert "fleet host-b: 4 devices online" in fleet_output
    # the remote devices' links are on host B: their counters reached the run (per-device lateness in the summary)
    assert all(summary["devices"][device]["timing"]["segments"] > 0
               for device in ("rpi4-2", "rpi4-3", "jetson-nano-0", "jetson-nano-1"))
