"""An external Mosquitto killed in the middle of a transfer and restarted: the run reconnects and every device converges."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.core.scenario import parse_scenario
from testbed.runner import ScenarioRun

from .conftest import _mosquitto_binary, free_port

pytestmark = pytest.mark.timeout(240)

DEVICES = 3
ROUNDS = 3


class Mosquitto:
    """A broker this test owns: it can be killed (SIGKILL, nothing saved) and started again on the same port."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.config = folder / "mosquitto.conf"
        run_as = "user root\n" if os.geteuid() == 0 else ""
        self.config.write_text(f"{run_as}listener {self.port} 127.0.0.1\npersistence false\nallow_anonymous true\n")
        self.log = open(folder / "mosquitto.log", "a")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen([_mosquitto_binary(), "-c", str(self.config)], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.log.close()


async def test_a_broker_killed_mid_transfer_and_restarted_does_not_end_the_run(tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path)
    broker.start()
    scenario = parse_scenario({
        "name": "broker-restart", "seed": 6, "rounds": ROUNDS, "round_timeout": "90s",
        "data": {"initial_samples": 200, "new_samples_per_round": 60},
        "update": {"epochs": 2, "ratio": 0.1}, "model": {"hidden": [16]},
        "devices": [{"profile": "rpi4", "count": DEVICES}],
        # round 0's snapshot (about 5 kB) takes about 2 s at 20 kbit/s: the broker dies in the middle of it
        "channel": {"downlink": {"rate": "20kbit", "delay": "50ms"}},
        "broker": {"url": f"mqtt://127.0.0.1:{broker.port}"},
        "metrics": {"enabled": False},
    })
    events: list[tuple[str, dict[str, Any]]] = []
    restarted = asyncio.Event()

    async def restart_mid_transfer() -> None:
        while not any(event == "publishing" for event, _ in events):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        broker.kill()
        await asyncio.sleep(3.0)
        broker.start()
        restarted.set()

    run = ScenarioRun(scenario, tmp_path / "out", lambda event, data: events.append((event, data)))
    chaos = asyncio.create_task(restart_mid_transfer())
    try:
        result = await asyncio.wait_for(run.execute(), 200)
        await asyncio.wait_for(chaos, 10)
    finally:
        chaos.cancel()
        broker.stop()
    assert restarted.is_set()
    assert any(event == "broker-reconnected" for event, _ in events)
    summary = result.summary
    assert len(summary["rounds"]) == ROUNDS
    for device_id, state in summary["devices"].items():
        assert (state["final_version"], state["hash_matches_server"]) == (summary["server"]["final_version"], True), \
            device_id
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert sorted((record["round"], record["device"]) for record in records) == sorted(
        (round_index, device_id) for round_index in range(ROUNDS) for device_id in summary["devices"])
