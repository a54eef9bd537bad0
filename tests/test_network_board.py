"""Boards over the network: `network: true` devices, the `testbed device` command the run prints, and the board itself."""

from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest
from rich.console import Console

from devices.board_state import BoardStateStore
from devices.board_updates import BoardConfigRefused, BoardUpdates
from devices.energy_meters import open_energy_meter
from devices.network_board import NetworkBoard
from devices.profiles import get_device_profile
from server.update_server import UpdateServer
from testbed.broker_config import scenario_without_secrets
from testbed.cli import _RichProgress
from testbed.core.manifest import UpdateManifest
from testbed.core.messages import BoardConfig, ReportRequest
from testbed.core.mqtt import MqttEndpoint
from testbed.core.scenario import ScenarioError, parse_scenario
from testbed.core.signing import SigningKey
from testbed.core.topics import Topics
from testbed.core.wire import decode_header, encode_full_model, encode_update, split_chunks, weights_hash
from testbed.device_commands import advertised_host, device_command_line
from testbed.hil_commands import board_inference
from testbed.runner import ScenarioRun

REPO = Path(__file__).resolve().parents[1]
BOARD = "net-pi"
SMALL = {
    "name": "network-board", "seed": 5, "rounds": 3, "round_timeout": "120s",
    "data": {"dataset": "digits", "initial_samples": 200, "new_samples_per_round": 80, "validation_samples": 100,
             "test_samples": 200, "device_test_samples": 100},
    "model": {"kind": "mlp", "hidden": [16]},
    "update": {"strategy": "dpu", "ratio": 0.1, "epochs": 2, "chunk_size": "1KiB"},
    "channel": {"downlink": {"rate": "500kbit", "delay": "20ms"}, "uplink": {"rate": "500kbit", "delay": "20ms"}},
    "devices": [{"name": BOARD, "profile": "rpi4", "network": True}, {"profile": "rpi4", "count": 1}],
    "metrics": {"port": 0},
}


# --- the scenario ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "path", "message"), [
    ({"profile": "rpi4", "network": True}, "devices.0", "needs a 'name'"),
    ({"name": "b", "profile": "rpi4", "network": True, "serial": "/dev/ttyACM0"}, "devices.0",
     "'network: true' (a board on the network running `testbed device`) excludes 'serial' and 'external'"),
    ({"name": "b", "profile": "rpi4", "network": True, "external": True}, "devices.0", "excludes 'serial' and 'external'"),
    ({"name": "b", "profile": "rpi4", "listen": "0.0.0.0"}, "devices.0", "'listen' is where a network device's link "
                                                                         "endpoint listens: it needs 'network: true'"),
    ({"name": "b", "profile": "rpi4", "network": True, "listen": "board-host"}, "devices.0.listen",
     "listen must be an IP address of this host"),
])
def test_a_network_device_entry_that_cannot_be_is_one_line_naming_it(entry: dict[str, Any], path: str,
                                                                     message: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        parse_scenario({**SMALL, "devices": [entry]})
    lines = [line for line in str(raised.value).splitlines() if line.strip().startswith(f"{path}:")]
    assert len(lines) == 1 and message in lines[0], str(raised.value)


def test_a_network_device_is_its_own_kind_and_listens_on_loopback_unless_told() -> None:
    scenario = parse_scenario({**SMALL, "devices": [{"name": "b", "profile": "jetson-nano", "network": True},
                                                    {"name": "c", "profile": "rpi4", "network": True,
                                                     "listen": "0.0.0.0"}]})
    first, second = scenario.devices
    assert (first.kind, first.listen, second.kind, second.listen) == ("network", None, "network", "0.0.0.0")


# --- the command the run prints -------------------------------------------------------------------------------

def test_the_printed_command_names_the_endpoint_run_and_key_and_quotes_what_needs_it() -> None:
    key = SigningKey.generate().trusted_key.text
    assert device_command_line("192.168.1.20", 40123, BOARD, "network-board-1", key) == (
        f"testbed device --broker 192.168.1.20:40123 --name {BOARD} --run network-board-1 --trust {key}")
    with_identity = device_command_line("10.0.0.2", 1, "b", "run one", key, username="pi 4", tls=True)
    assert with_identity.endswith(f"--run 'run one' --trust {key} --username 'pi 4' --password-file FILE "
                                  "--ca-file CA_FILE")
    assert shlex.split(with_identity)[3] == "10.0.0.2:1"


def test_a_wildcard_listen_address_is_advertised_as_an_address_of_this_host() -> None:
    assert advertised_host("127.0.0.1") == "127.0.0.1" and advertised_host("10.1.2.3") == "10.1.2.3"
    advertised = advertised_host("0.0.0.0")
    assert advertised != "0.0.0.0" and advertised  # this host's route address, or its name without a route


def test_the_console_prints_the_command_on_one_line_of_its_own(tmp_path: Path) -> None:
    output = tmp_path / "console.txt"
    with open(output, "w") as handle:
        progress = _RichProgress(Console(file=handle, soft_wrap=True, width=60))
        command = device_command_line("127.0.0.1", 40000, BOARD, "run-1", SigningKey.generate().trusted_key.text)
        progress("waiting-for-board", {"device": BOARD, "broker": "127.0.0.1:40000", "run_id": "run-1",
                                       "username": None, "network": True, "command": command})
    lines = output.read_text().splitlines()
    assert lines == [f"waiting for board {BOARD}: its link listens on 127.0.0.1:40000; on the board, run",
                     f"  {command}"]


# --- a whole run with the board as its own process ------------------------------------------------------------

class DeviceProcess:
    """`testbed device` in a child process, started with the command line the run printed."""

    def __init__(self, command: str, state_dir: Path, log_path: Path) -> None:
        words = shlex.split(command)
        assert words[:2] == ["testbed", "device"], command
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "testbed", *words[1:], "--energy", "model", "--sample-period", "0.02",
                 "--state-dir", str(state_dir)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def devices_started() -> Iterator[list[DeviceProcess]]:
    started: list[DeviceProcess] = []
    yield started
    for device in started:
        device.stop()


@pytest.mark.slow
async def test_a_board_joins_over_the_network_with_the_printed_command_and_converges(
        tmp_path: Path, devices_started: list[DeviceProcess]) -> None:
    printed: list[dict[str, Any]] = []

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "waiting-for-board":  # what a user would copy to the board
            printed.append({**data, "listening": run.assembly.device_links[data["device"]].address})
            devices_started.append(DeviceProcess(data["command"], tmp_path / "board-state", tmp_path / "device.log"))

    run = ScenarioRun(parse_scenario(SMALL), tmp_path / "out", on_event)
    result = await asyncio.wait_for(run.execute(), 600)
    assert len(printed) == 1 and printed[0]["device"] == BOARD and printed[0]["network"]
    assert f"--run {run.run_id} --trust {run.signing_key.trusted_key.text}" in printed[0]["command"]
    assert printed[0]["broker"] == "127.0.0.1:{}".format(printed[0]["listening"][1])  # loopback by default
    assert await asyncio.to_thread(devices_started[0].process.wait, 60) == 0, devices_started[0].output()
    output = devices_started[0].output()
    assert f"device {BOARD}: run {run.run_id} (device 0, profile rpi4)" in output
    assert "online at version 0" in output and f"run {run.run_id} finished" in output

    summary = result.summary
    final = summary["server"]["final_version"]
    assert final >= 2
    board = summary["devices"][BOARD]
    assert board["final_version"] == final and board["hash_matches_server"], board
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    delivered = [record for record in records if record["device"] == BOARD and record.get("delivered")]
    assert [record["round"] for record in delivered] == list(range(len(result.rounds)))
    assert all(record["hash_matches_server"] for record in delivered)
    assert delivered[-1]["accuracy"] > 0.3
    # The board's traffic crossed the link the run emulates for it.
    assert run.assembly.device_links[BOARD].downlink_counters.payload_bytes >= sum(
        record["update_bytes"] for record in delivered)


# --- the board against a real broker: forged updates ----------------------------------------------------------

KEY = SigningKey.generate()
SCENARIO = parse_scenario({**SMALL, "rounds": 2})


@pytest.fixture(scope="module")
def trained() -> tuple[UpdateServer, list[Any]]:
    server = UpdateServer(SCENARIO)
    return server, [server.run_round(0), server.run_round(1)]


def board_config(run_id: str, server: UpdateServer) -> BoardConfig:
    return BoardConfig(run=run_id, device=BOARD, device_index=0, init_seed=server.seed,
                       public_key=KEY.trusted_key.text, scenario=scenario_without_secrets(SCENARIO))


def network_board(endpoint: MqttEndpoint, config: BoardConfig, state_dir: Path, trusted: SigningKey) -> NetworkBoard:
    profile = get_device_profile("rpi4")
    updates = BoardUpdates(BOARD, profile, open_energy_meter("model", profile, period_s=0.02), board_inference,
                           BoardStateStore(state_dir), trusted.trusted_key, pin_option="testbed device --trust")
    return NetworkBoard(endpoint, config, updates)


@asynccontextmanager
async def replies_of(endpoint: MqttEndpoint, topics: Topics) -> AsyncIterator[tuple[aiomqtt.Client, asyncio.Queue[
        tuple[str, dict[str, Any]]]]]:
    """A control client publishing as the run would, and the board's reports and nacks as they come."""
    replies: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
    async with endpoint.client(f"{topics.run_id}-control") as control:
        await control.subscribe(topics.devices("report"), qos=1)
        await control.subscribe(topics.devices("nack"), qos=1)

        async def pump() -> None:
            async for message in control.messages:
                kind = topics.parse_device_topic(str(message.topic))
                assert kind is not None
                await replies.put((kind[1], json.loads(bytes(message.payload))))

        task = asyncio.create_task(pump())
        try:
            yield control, replies
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def publish_update(control: aiomqtt.Client, topics: Topics, payload: bytes, base_version: int | None,
                         signer: SigningKey) -> None:
    target = decode_header(payload).target_version
    manifest = UpdateManifest.for_payload(payload, run_id=topics.run_id, round_index=target - 1, key=f"{target}",
                                          base_version=base_version, chunk_size=500, published_at=time.time())
    manifest = manifest.signed(signer)
    await control.publish(topics.manifest, manifest.to_json(), qos=1, retain=True)
    for index, chunk in enumerate(split_chunks(payload, manifest.chunk_size)):
        await control.publish(topics.update_chunk(manifest.key, index), chunk, qos=1)


async def test_a_forged_update_is_refused_and_the_genuine_one_applies(
        mosquitto: tuple[str, int], trained: tuple[UpdateServer, list[Any]], tmp_path: Path) -> None:
    server, (first, second) = trained
    endpoint = MqttEndpoint(*mosquitto)
    topics = Topics(f"network-{time.monotonic_ns()}")
    board = network_board(endpoint, board_config(topics.run_id, server), tmp_path / "state", KEY)
    async with replies_of(endpoint, topics) as (control, replies):
        task = asyncio.create_task(board.run())
        try:
            await asyncio.wait_for(board.connected.wait(), 60)
            # Well formed, right run and model, but signed by a key that is not the run's.
            forged = encode_full_model({name: np.full_like(array, 0.5) for name, array in first.weights.items()}, 5)
            await publish_update(control, topics, forged, None, SigningKey.generate())
            await publish_update(control, topics, encode_full_model(first.weights, 1), None, KEY)
            kind, report = await asyncio.wait_for(replies.get(), 60)
            assert kind == "report" and report["version"] == 1 and report["kind"] == "network"
            assert report["weights_hash"] == weights_hash(first.weights).hex()
            assert report["rejected_by_reason"] == {"bad_signature": 1}
            assert report["measured_energy"]["meter"] == "model" and report["energy_joules"] > 0
            await publish_update(control, topics, encode_update(first.weights, second.weights, 1, 2), 1, KEY)
            kind, report = await asyncio.wait_for(replies.get(), 60)
            assert kind == "report" and report["version"] == 2
            assert report["weights_hash"] == weights_hash(second.weights).hex()
            # the run, back from a broker restart, asks again: the same report comes back
            await control.publish(topics.report_request, ReportRequest(round=1, version=2).encode(), qos=1)
            assert await asyncio.wait_for(replies.get(), 60) == ("report", report)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert BoardStateStore(tmp_path / "state").load(topics.run_id, BOARD).version == 2  # type: ignore[union-attr]


async def test_a_board_pinned_to_another_key_refuses_to_join(
        mosquitto: tuple[str, int], trained: tuple[UpdateServer, list[Any]], tmp_path: Path) -> None:
    server, _ = trained
    config = board_config(f"network-{time.monotonic_ns()}", server)
    board = network_board(MqttEndpoint(*mosquitto), config, tmp_path / "state", SigningKey.generate())
    with pytest.raises(BoardConfigRefused, match=r"trusts only .*testbed device --trust"):
        await asyncio.wait_for(board.run(), 30)
    assert board.updates.deployment is None and not board.connected.is_set()


def test_a_config_with_a_malformed_key_is_refused(trained: tuple[UpdateServer, list[Any]]) -> None:
    server, _ = trained
    bad = board_config("run", server).model_copy(update={"public_key": "ed25519:not-a-key"})
    updates = BoardUpdates(BOARD, get_device_profile("rpi4"), open_energy_meter("model", get_device_profile("rpi4")),
                           board_inference)
    with pytest.raises(BoardConfigRefused, match="bad config"):
        updates.check_trust(bad)


def test_device_rejects_bad_arguments_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from testbed.cli import main

    assert main(["device", "--broker", "localhost", "--name", "x"]) == 2
    assert capsys.readouterr().err.strip() == "testbed device: error: --broker: expected HOST:PORT, got 'localhost'"
    assert main(["device", "--broker", "127.0.0.1:1", "--name", "x", "--trust", "ed25519:nope"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("testbed device: error: --trust:") and len(error.strip().splitlines()) == 1
