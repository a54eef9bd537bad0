"""`broker: mosquitto`: the run starts a real local Mosquitto, runs on it (identities, ACLs, a broker_restart event,
Ctrl-C) and leaves no process and no temp dir behind; without Mosquitto it is one line and exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

import testbed.mosquitto
from testbed.broker import BrokerError
from testbed.broker_access import BrokerAccess, Identity
from testbed.broker_config import broker_access
from testbed.cli import main
from testbed.core.mqtt import BrokerConnectionError, MqttEndpoint
from testbed.core.scenario import parse_scenario
from testbed.events import read_events
from testbed.mosquitto import LocalMosquitto
from testbed.run_summary import RunResult
from testbed.runner import ScenarioRun

from .conftest import debian_tool
from .test_broker_acl import SERVER, assert_each_identity_is_held_to_its_topics, scenario_raw, write_scenario

pytestmark = pytest.mark.timeout(300)

RUN_TIMEOUT_S = 240.0


@pytest.fixture
def mosquitto_installed() -> None:
    """A real Mosquitto; missing, it fails the test in CI (`make test-services` installs it)."""
    debian_tool("mosquitto")


@pytest.fixture
def started(mosquitto_installed: None, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, Path]]:
    """(pid, temp dir) of every Mosquitto LocalMosquitto starts in this test, recorded as it starts."""
    record: list[tuple[int, Path]] = []
    start = LocalMosquitto.start

    async def start_and_record(broker: LocalMosquitto) -> None:
        await start(broker)
        assert broker.pid is not None and broker.log_path is not None
        record.append((broker.pid, broker.log_path.parent))

    monkeypatch.setattr(LocalMosquitto, "start", start_and_record)
    return record


def alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def local_mosquitto_scenario(folder: Path, **fields: Any) -> dict[str, Any]:
    """test_broker_acl's two devices (each with an identity of its own) for 2 rounds, on `broker: mosquitto`."""
    return {**scenario_raw(folder, {"url": "mosquitto"}), **fields}


async def run_recording_progress(raw: dict[str, Any], out: Path) -> tuple[ScenarioRun, RunResult,
                                                                         list[tuple[str, dict[str, Any]]]]:
    progress: list[tuple[str, dict[str, Any]]] = []
    run = ScenarioRun(parse_scenario(raw), out, lambda event, data: progress.append((event, data)))
    return run, await asyncio.wait_for(run.execute(), RUN_TIMEOUT_S), progress


def assert_converged(result: RunResult, out: Path) -> None:
    """Every device on the server's final version and weights, one results record per device and round."""
    summary = result.summary
    final = summary["server"]["final_version"]
    assert {device: (state["final_version"], state["hash_matches_server"]) for device, state in
            summary["devices"].items()} == {device: (final, True) for device in summary["devices"]}
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((record["round"], record["device"]) for record in records) == sorted(
        (round_index, device) for round_index in range(len(summary["rounds"])) for device in summary["devices"])


def assert_nothing_left(started: list[tuple[int, Path]]) -> None:
    assert started, "no mosquitto was started"
    for pid, folder in started:
        assert not alive(pid), f"mosquitto {pid} is still running"
        assert not folder.exists(), f"{folder} was left behind"


async def test_a_run_with_each_device_as_itself_converges_and_leaves_nothing(
        tmp_path: Path, started: list[tuple[int, Path]]) -> None:
    run, result, progress = await run_recording_progress(local_mosquitto_scenario(tmp_path), tmp_path / "out")
    assert run.assembly.access is not None and run.assembly.access.restricts_topics
    assert len(result.summary["rounds"]) == 2
    assert_converged(result, tmp_path / "out")
    [announced] = [data for event, data in progress if event == "broker-started"]
    assert re.fullmatch(r"mosquitto 2\.\d+\.\d+", announced["broker"]), announced
    assert announced["address"] == f"127.0.0.1:{run.assembly.embedded_broker.port}"  # type: ignore[union-attr]
    assert_nothing_left(started)


async def test_each_identity_is_held_to_its_topics(tmp_path: Path, started: list[tuple[int, Path]]) -> None:
    access = broker_access(parse_scenario(local_mosquitto_scenario(tmp_path)))
    async with LocalMosquitto(access=access) as broker:
        def endpoint(username: str | None, password: str | None) -> MqttEndpoint:
            return MqttEndpoint(broker.host, broker.port, username, password)

        # among the rest: device A's publishes on device B's hello, status, report and nack never arrive
        await assert_each_identity_is_held_to_its_topics(endpoint)
    assert_nothing_left(started)


async def test_the_server_identity_alone_may_do_everything_and_no_one_else_connects(
        started: list[tuple[int, Path]]) -> None:
    access = BrokerAccess(Identity(*SERVER), {})  # broker.username without device_credentials
    async with LocalMosquitto(access=access) as broker:
        server = MqttEndpoint(broker.host, broker.port, *SERVER)
        for stranger in (MqttEndpoint(broker.host, broker.port), MqttEndpoint(broker.host, broker.port, SERVER[0], "x")):
            with pytest.raises(BrokerConnectionError) as refused:
                await stranger.check_connection("stranger", timeout_s=15.0)
            assert refused.value.credentials_refused, refused.value
        async with server.client("as-device", timeout_s=15.0) as device, server.client("as-run", timeout_s=15.0) as run:
            await run.subscribe("testbed/r/device/+/report", qos=1)
            await device.subscribe("testbed/r/manifest", qos=1)
            await device.publish("testbed/r/device/rpi4-0/report", b"report", qos=1, timeout=15.0)
            await run.publish("testbed/r/manifest", b"manifest", qos=1, timeout=15.0)
            async with asyncio.timeout(20):
                assert (await anext(run.messages)).payload == b"report"
                assert (await anext(device.messages)).payload == b"manifest"
    assert_nothing_left(started)


async def test_a_broker_restart_event_restarts_it_and_the_run_converges(
        tmp_path: Path, started: list[tuple[int, Path]]) -> None:
    raw = local_mosquitto_scenario(
        tmp_path, channel={"downlink": {"rate": "20kbit", "delay": "50ms"}},  # a delivery takes about a second
        events=[{"round": 0, "phase": "delivery", "after": "500ms", "action": "broker_restart", "for": "2s"}])
    _, result, progress = await run_recording_progress(raw, tmp_path / "out")
    assert any(event == "broker-reconnected" for event, _ in progress)
    assert not [data for event, data in progress if event == "warning" and "restart" in data["message"]]
    records = read_events(tmp_path / "out")
    assert [(record["action"], record["kind"]) for record in records] == [("broker_restart", "fire"),
                                                                          ("broker_restart", "end")]
    assert records[1]["t"] - records[0]["t"] >= 2.0
    assert len({pid for pid, _ in started}) == 2  # the first process stopped, a second one on the same port
    assert_converged(result, tmp_path / "out")
    assert_nothing_left(started)


async def test_a_cancelled_run_stops_it(tmp_path: Path, started: list[tuple[int, Path]]) -> None:
    broker_up = asyncio.Event()
    run = ScenarioRun(parse_scenario(local_mosquitto_scenario(tmp_path)), tmp_path / "out",
                      lambda event, _: broker_up.set() if event == "broker-started" else None)
    task = asyncio.create_task(run.execute())
    await asyncio.wait_for(broker_up.wait(), RUN_TIMEOUT_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    assert_nothing_left(started)


def output_until(process: subprocess.Popen[str], prefix: str, timeout_s: float) -> str:
    """What `process` printed up to and including its first line starting with `prefix`."""
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    for line in process.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
    pytest.fail(f"the run ended before printing {prefix!r}:\n" + "".join(lines))


def mosquitto_children(parent: int) -> list[int]:
    """Ids of the live mosquitto processes whose parent is `parent`."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        if name == "mosquitto" and int(fields[1]) == parent and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def test_ctrl_c_in_the_terminal_ends_the_run_and_its_mosquitto(tmp_path: Path, mosquitto_installed: None) -> None:
    scenario = write_scenario(tmp_path, local_mosquitto_scenario(
        tmp_path, rounds=6, channel={"downlink": {"rate": "20kbit", "delay": "100ms"}}))
    out = tmp_path / "out"
    # In a process group of its own, like a terminal's foreground job: Ctrl-C is SIGINT to the whole group.
    process = subprocess.Popen([sys.executable, "-m", "testbed.cli", "run", str(scenario), "--out", str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               env={**os.environ, "COLUMNS": "200"})
    try:
        before = output_until(process, "round 0:", 150.0)  # the first round ended: press Ctrl-C
        brokers = mosquitto_children(process.pid)
        os.killpg(process.pid, signal.SIGINT)
        output = before + process.communicate(timeout=90)[0]
    finally:
        process.kill()
    assert process.returncode == 130, output
    assert re.search(r"^2 devices via mosquitto 2\.\d+\.\d+ on 127\.0\.0\.1:\d+;", output, flags=re.M), output
    assert json.loads((out / "summary.json").read_text())["interrupted"] is True
    assert len(brokers) == 1, brokers
    assert not alive(brokers[0]), "mosquitto outlived the run"


def test_it_stops_one_that_ignores_sigterm(monkeypatch: pytest.MonkeyPatch, started: list[tuple[int, Path]]) -> None:
    monkeypatch.setattr(testbed.mosquitto, "STOP_TIMEOUT_S", 1.0)

    async def scenario() -> float:
        async with LocalMosquitto() as broker:
            assert broker.pid is not None
            os.kill(broker.pid, signal.SIGSTOP)  # a stopped process leaves SIGTERM pending: only SIGKILL ends it
            stopping = time.monotonic()
        return time.monotonic() - stopping

    took = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert took >= 1.0  # it waited for SIGTERM first
    assert_nothing_left(started)


def test_a_start_that_fails_quotes_its_log_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              started: list[tuple[int, Path]]) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where LocalMosquitto makes its private dir
    before = set(mosquitto_children(os.getpid()))  # e.g. the session's shared Mosquitto of tests/conftest.py
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def scenario() -> None:
            async with LocalMosquitto(port=port):
                pass

        with pytest.raises(BrokerError) as failed:
            asyncio.run(asyncio.wait_for(scenario(), 60))
    message = str(failed.value)
    assert "\n" not in message and f"127.0.0.1:{port}" in message
    assert "Address already in use" in message, message  # Mosquitto's own words, from its log
    assert not started  # it never accepted: the recorder saw no start succeed
    assert set(mosquitto_children(os.getpid())) <= before  # none of its own left behind
    assert not list(temp.iterdir())


@pytest.fixture
def no_mosquitto(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A host without Mosquitto: an empty PATH, and no /usr/sbin/mosquitto to fall back on."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(testbed.mosquitto, "FALLBACK_BINARIES", (tmp_path / "no-such" / "mosquitto",))


@pytest.mark.parametrize("command", [["validate", "--resolve"], ["run"]])
def test_without_mosquitto_it_is_one_line_and_exit_2(command: list[str], tmp_path: Path, no_mosquitto: None,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path = write_scenario(tmp_path, local_mosquitto_scenario(tmp_path))
    out = tmp_path / "out"
    assert main([*command, str(path), *(["--out", str(out)] if command == ["run"] else [])]) == 2
    output = capsys.readouterr()
    lines = (output.out + output.err).strip().splitlines()
    assert len(lines) == 1, lines
    assert "mosquitto is not installed" in lines[0] and "apt-get install mosquitto" in lines[0] \
        and "broker: embedded" in lines[0], lines[0]
    assert not out.exists()  # nothing was loaded, nothing written


async def test_without_mosquitto_the_broker_itself_says_so(no_mosquitto: None) -> None:
    with pytest.raises(BrokerError, match=r"apt-get install mosquitto"):
        async with LocalMosquitto():
            pass


async def test_a_local_mosquitto_is_plain_mqtt_on_loopback(started: list[tuple[int, Path]]) -> None:
    async with LocalMosquitto() as broker:
        assert broker.host == "127.0.0.1" and broker.running
        async with aiomqtt.Client(broker.host, broker.port, identifier="plain", timeout=10) as client:
            await client.subscribe("check/#", qos=1)
            await client.publish("check/1", b"ok", qos=1)
            message = await asyncio.wait_for(anext(client.messages), 10)
            assert message.payload == b"ok"
    assert not broker.running
    assert_nothing_left(started)
