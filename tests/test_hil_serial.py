"""Boards in the loop: scenarios/hil-serial.yaml against a board agent in its own process, over real ptys."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.runner import ScenarioRun
from testbed.core.scenario import load_scenario
from devices.pty_cable import PtyCable

REPO = Path(__file__).resolve().parents[1]
BOARD = "bench-pi"


@pytest.fixture
def cable() -> Iterator[PtyCable]:
    cable = PtyCable()
    yield cable
    cable.close()


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the board's child: SIGKILL when the test process dies, however it dies (a pytest-timeout included); a
    board left behind would read a later test's pty of the same number and garble its serial line."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class BoardProcess:
    """`testbed board` in a child process, on the board end of the cable; restartable (a reboot)."""

    def __init__(self, port: str, state_dir: Path, log_path: Path) -> None:
        self.port, self.state_dir, self.log_path = port, state_dir, log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 — handed to the child
        self.process = subprocess.Popen(
            [sys.executable, "-m", "testbed", "board", "--port", self.port, "--name", BOARD, "--energy", "model",
             "--state-dir", str(self.state_dir), "--sample-period", "0.02"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, preexec_fn=_die_with_parent)
        log.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def board(cable: PtyCable, tmp_path: Path) -> Iterator[BoardProcess]:
    process = BoardProcess(cable.board_path, tmp_path / "board-state", tmp_path / "board.log")
    process.start()
    yield process
    process.kill()


def hil_scenario(cable: PtyCable, rounds: int) -> Any:
    return load_scenario(REPO / "scenarios" / "hil-serial.yaml", [
        f"devices.0.serial={cable.host_path}", f"rounds={rounds}", "metrics.port=0",
        "update.round0=full"])  # a 69 kB first snapshot: the reboot test cuts it halfway over the serial line


def check_all_on_final_version(summary: dict[str, Any]) -> None:
    final = summary["server"]["final_version"]
    assert final >= 1
    for device_id, state in summary["devices"].items():
        assert state["final_version"] == final, (device_id, state)
        assert state["hash_matches_server"], device_id


@pytest.mark.slow
async def test_hil_serial_scenario_with_a_board_in_its_own_process(cable: PtyCable, board: BoardProcess,
                                                                    tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    run = ScenarioRun(hil_scenario(cable, rounds=3), tmp_path / "out", lambda event, data: events.append((event, data)))
    result = await asyncio.wait_for(run.execute(), 300)

    summary = result.summary
    assert set(summary["devices"]) == {BOARD, "rpi4-0", "rpi4-1"}
    check_all_on_final_version(summary)
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    board_records = [record for record in records if record["device"] == BOARD and record.get("delivered")]
    assert len(board_records) == sum(1 for record in summary["rounds"] if record["sent"])
    for record in board_records:
        assert record["hash_matches_server"]
        assert 0.5 < record["accuracy"] <= 1.0
        # measured by the board's integrator from its `model` reader: every phase it went through has energy
        assert record["energy_joules"] > 0 and record["energy_joules_by_phase"]["compute"] > 0
        assert record["delivery_seconds"] > 0
    serial_log = (tmp_path / "out" / "serial" / f"{BOARD}.log").read_text().splitlines()
    assert any(" host>board CONFIG " in line for line in serial_log)
    assert any(" board>host READY " in line for line in serial_log)
    assert any(" host>board UPDATE_CHUNK " in line for line in serial_log)
    assert any(" board>host REPORT " in line for line in serial_log)
    assert any(" board>host LOG " in line and "applied" in line for line in serial_log)
    assert board.process is not None and board.process.poll() is None, board.output()


def board_status_changes(events: list[tuple[str, dict[str, Any]]]) -> list[bool]:
    """The board's online state as the run saw it, repeated values collapsed."""
    changes: list[bool] = []
    for event, data in events:
        if event == "board-status" and data["device"] == BOARD and (not changes or changes[-1] != data["online"]):
            changes.append(data["online"])
    return changes


@pytest.mark.slow
async def test_a_board_rebooting_mid_update_and_after_an_update_ends_on_the_final_version(
        cable: PtyCable, board: BoardProcess, tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    loop = asyncio.get_running_loop()

    def reboot() -> None:
        board.kill()
        loop.call_later(0.5, board.start)

    def on_event(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))
        if event == "publishing" and data["round"] == 0:
            loop.call_later(2.0, reboot)  # the 69 kB snapshot takes ~6 s over the serial line: cut it halfway
        if event == "training" and data["round"] == 2:
            reboot()  # after v1 was applied and saved: the board resumes from it

    run = ScenarioRun(hil_scenario(cable, rounds=3), tmp_path / "out", on_event)
    result = await asyncio.wait_for(run.execute(), 300)

    check_all_on_final_version(result.summary)
    assert board.starts == 3
    # online when first ready, offline from each reboot until it is ready again
    assert board_status_changes(events) == [True, False, True, False, True]
    assert any(event == "catch-up" and data["device"] == BOARD for event, data in events)
    serial_log = (tmp_path / "out" / "serial" / f"{BOARD}.log").read_text()
    # v1 (or v2, if round 1 was quick) was applied and saved before the second reboot: the board resumes from it
    assert re.search(r"resumed bench-pi of run \S+ at version [12]\b", serial_log), serial_log[-2000:]
    # the cut transfer was never applied: every report of the board carries the server's hash of its version
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(record["hash_matches_server"] for record in records if record.get("delivered"))


@pytest.mark.slow
async def test_a_silent_board_is_marked_offline_and_catches_up_when_it_answers_again(
        cable: PtyCable, board: BoardProcess, tmp_path: Path) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    loop = asyncio.get_running_loop()

    def on_event(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))
        if event == "training" and data["round"] == 1:
            cable.cut()  # the board stops answering (cable pulled, board hung) for longer than the silence timeout
            loop.call_later(12.0, cable.restore)

    run = ScenarioRun(hil_scenario(cable, rounds=3), tmp_path / "out", on_event)
    result = await asyncio.wait_for(run.execute(), 300)

    check_all_on_final_version(result.summary)
    changes = board_status_changes(events)
    assert changes[-3:] == [True, False, True], changes
    assert cable.bytes_dropped["host>board"] > 0
    serial_log = (tmp_path / "out" / "serial" / f"{BOARD}.log").read_text()
    assert "board silent for" in serial_log


@pytest.mark.slow
async def test_line_noise_and_corrupted_frames_cost_retries_not_correctness(
        cable: PtyCable, board: BoardProcess, tmp_path: Path) -> None:
    counts = {"host>board": 0, "board>host": 0, "reports cut": 0}

    def corrupt(direction: str, data: bytes) -> bytes:
        counts[direction] += 1
        if direction == "host>board" and len(data) > 500 and counts[direction] % 25 == 0:
            middle = len(data) // 2  # a flipped byte inside an update chunk: bad CRC, the frame is lost
            return data[:middle] + bytes([data[middle] ^ 0x55]) + data[middle + 1:]
        if direction == "board>host" and len(data) > 900 and counts["reports cut"] < 2:
            counts["reports cut"] += 1  # only reports are this long: cut short, the board sends them again
            return data[: len(data) // 2]
        if counts[direction] % 7 == 0:
            return b"\xff\xfe garbage \x00\x13\x37" + data  # noise between frames: the decoder resyncs
        return data

    cable.corrupt = corrupt
    run = ScenarioRun(hil_scenario(cable, rounds=3), tmp_path / "out", lambda event, data: None)
    result = await asyncio.wait_for(run.execute(), 300)

    check_all_on_final_version(result.summary)
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    board_reports = [record for record in records if record["device"] == BOARD and record.get("delivered")]
    assert board_reports and all(record["hash_matches_server"] for record in board_reports)
    assert counts["reports cut"] == 2
    assert board_reports[-1]["accuracy"] > 0.5


@pytest.mark.slow
async def test_testbed_attach_joins_a_running_scenario_from_its_own_process(
        cable: PtyCable, board: BoardProcess, tmp_path: Path) -> None:
    scenario = load_scenario(REPO / "scenarios" / "hil-serial.yaml", [
        "devices.0.serial=null", "devices.0.external=true", "rounds=2", "metrics.port=0"])
    attach_log = tmp_path / "attach.log"
    attach: list[subprocess.Popen[bytes]] = []

    def on_event(event: str, data: dict[str, Any]) -> None:
        if event == "waiting-for-board":  # what the run prints for the user to run on the board's host
            with open(attach_log, "wb") as log:
                attach.append(subprocess.Popen(
                    [sys.executable, "-m", "testbed", "attach", "--port", cable.host_path, "--name", data["device"],
                     "--broker", data["broker"], "--out", str(tmp_path / "attach-out")],
                    stdout=log, stderr=subprocess.STDOUT, cwd=REPO))

    run = ScenarioRun(scenario, tmp_path / "out", on_event)
    try:
        result = await asyncio.wait_for(run.execute(), 300)
        assert len(attach) == 1
        ended = time.monotonic()
        assert await asyncio.to_thread(attach[0].wait, 30) == 0  # it sees the run end and exits by itself
        assert time.monotonic() - ended < 5, "attach should stop on the run's finished message, not time out"
    finally:
        for process in attach:
            process.kill()
            process.wait(10)
    check_all_on_final_version(result.summary)
    output = attach_log.read_text()
    assert f"attach {BOARD}: run {run.run_id}" in output and "board online at version 0" in output
    assert f"run {run.run_id} finished" in output
    serial_log = (tmp_path / "attach-out" / "serial" / f"{BOARD}.log").read_text()
    assert " board>host REPORT " in serial_log


async def test_attach_without_a_run_on_the_broker_fails_with_a_clear_message(mosquitto: tuple[str, int]) -> None:
    from devices.serial_bridge import BridgeError
    from testbed.hil_commands import find_run_config
    from testbed.core.mqtt import MqttEndpoint

    with pytest.raises(BridgeError, match="no config of any run listing device 'nobody'.*start `testbed run` first"):
        await find_run_config(MqttEndpoint(*mosquitto), "nobody", None, wait_s=1.0)


def test_board_and_attach_reject_bad_arguments_with_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from testbed.cli import main

    assert main(["board", "--port", "/dev/null", "--energy", "jetson", "--sysfs-root", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("testbed board: error:") and "INA3221" in error
    assert main(["attach", "--port", "/dev/null", "--name", "x", "--broker", "localhost"]) == 2
    assert "--broker: expected HOST:PORT" in capsys.readouterr().err


async def test_the_bridge_relays_two_identical_reports_from_the_board_twice(mosquitto: tuple[str, int]) -> None:
    """Duplicates are the link's business (by sequence): equal payloads sent twice on purpose both arrive; and the
    latest is sent again when the run asks."""
    import aiomqtt

    from devices.frame_order import LinkSettings
    from devices.reliable_serial import ReliableSerialLink
    from devices.serial_bridge import SerialBridge
    from devices.serial_framing import Hello, MessageType, json_payload
    from devices.serial_link import SerialLink
    from testbed.core.messages import BoardConfig, DeviceReport, ReportRequest
    from testbed.core.mqtt import MqttEndpoint
    from testbed.core.topics import Topics

    link_settings = LinkSettings(window=8, ack_timeout_s=0.5, max_sends=6)
    topics = Topics("identical-reports")
    config = BoardConfig(run="identical-reports", device=BOARD, device_index=0, init_seed=1,
                         public_key="ed25519:" + "A" * 43 + "=", scenario={})
    cable = PtyCable()
    bridge = SerialBridge(BOARD, "rpi4", cable.host_path, topics, MqttEndpoint(*mosquitto), config,
                          link_settings=link_settings,
                          open_link=lambda: SerialLink.open(cable.host_path, 1_000_000, pace=False))
    report = DeviceReport(device=BOARD, profile="rpi4", version=1, weights_hash="ab", accuracy=0.9, update_bytes=1,
                          received_bytes=1, transmitted_bytes=1, total_received_bytes=1, apply_seconds=0.0,
                          evaluate_seconds=0.0, energy_joules=0.0, energy_joules_by_phase={}, phase_seconds={},
                          total_energy_joules=0.0, rejected_updates=0)
    bridge_task = asyncio.create_task(bridge.run())
    try:
        async with aiomqtt.Client(*mosquitto) as client, \
                ReliableSerialLink(await SerialLink.open(cable.board_path, 1_000_000, pace=False), link_settings) as board:
            await client.subscribe(topics.device(BOARD, "report"), qos=1)
            await board.send(MessageType.HELLO, Hello(BOARD, "rpi4").to_payload(), timeout_s=10)
            while (await board.receive(timeout_s=10)).message_type != MessageType.CONFIG:
                pass
            await board.send(MessageType.READY, json_payload({"device": BOARD, "run": config.run, "version": 0,
                                                              "error": None}))
            await asyncio.wait_for(bridge.connected.wait(), 10)
            for _ in range(2):
                await board.send(MessageType.REPORT, report.encode())
            received = []
            async with asyncio.timeout(10):
                async for message in client.messages:
                    received.append(DeviceReport.decode(bytes(message.payload)))
                    if len(received) == 2:
                        break
            assert [item.weights_hash for item in received] == ["ab", "ab"]
            # the run, back from a broker restart, asks again: the bridge sends the board's latest report again
            await client.publish(topics.report_request, ReportRequest(round=0, version=1).encode(), qos=1)
            async with asyncio.timeout(10):
                async for message in client.messages:
                    assert DeviceReport.decode(bytes(message.payload)) == received[-1]
                    break
    finally:
        bridge_task.cancel()
        await asyncio.gather(bridge_task, return_exceptions=True)
        cable.close()
