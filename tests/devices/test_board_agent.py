"""The board agent over a real pty, driven by a test playing the host: verify-then-swap, lost frames, resends."""

from __future__ import annotations

import asyncio
import json
import os
import time
import tty
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices.board_agent import BoardAgent, board_config_from_payload, board_config_payload
from testbed.core.messages import BoardConfig
from devices.board_state import BoardStateStore
from devices.chunk_repair import REPAIR_QUIET_MIN_S
from devices.energy_meters import EnergyMeter, JetsonEnergyMeter, ModelEnergyMeter
from devices.profiles import get_device_profile
from devices.frame_order import LinkSettings
from devices.reliable_serial import ReliableSerialLink
from devices.serial_framing import (
    FLAG_MORE,
    Frame,
    Hello,
    MessageType,
    SerialFrameError,
    UpdateChunk,
    parse_json_payload,
    parse_log_payload,
)
from devices.serial_link import SerialLink, SerialLinkError, SerialLinkTimeout
from server.update_server import UpdateServer
from testbed.inference import TorchInference
from testbed.core.manifest import UpdateManifest
from testbed.core.messages import DeviceNack, DeviceReport
from testbed.core.signing import SigningKey, TrustedKey
from testbed.core.scenario import parse_scenario
from testbed.core.wire import encode_full_model, encode_update, split_chunks, weights_hash

SCENARIO = parse_scenario({
    "name": "board-test", "seed": 5, "rounds": 3,
    "model": {"hidden": [16]},
    "update": {"strategy": "dpu", "ratio": 0.1, "epochs": 2},
    "devices": [{"name": "bench-pi", "profile": "rpi4", "serial": "/dev/null"}],
})
MAX_FRAME = 2048  # small frames (a report still fits), so 4 KiB chunks travel in pieces
RUN = "run-1"
KEY = SigningKey.generate()
"""The run's signing key: the host's config names its public half."""


def board_config(run_id: str = RUN, key: TrustedKey = KEY.trusted_key) -> BoardConfig:
    return BoardConfig(run=run_id, device="bench-pi", device_index=0, init_seed=SCENARIO.seed, public_key=key.text,
                       scenario=SCENARIO.model_dump(mode="json", by_alias=True))
LINK = LinkSettings(window=16, ack_timeout_s=0.4, max_sends=4)  # a silent end is given up on in 1.6 s


@pytest.fixture(scope="module")
def trained() -> tuple[UpdateServer, list[Any]]:
    server = UpdateServer(SCENARIO)
    return server, [server.run_round(0), server.run_round(1)]


class LossyLink(SerialLink):
    """A serial link whose `drop(frame)` decides which frames never reach the line (a test's lossy cable)."""

    drop: Callable[[Frame], bool] = staticmethod(lambda frame: False)

    async def send(self, frame: Frame) -> None:
        if not self.drop(frame):
            await super().send(frame)


class Host:
    """The test's end of the line: a reliable link like the bridge's; collects what the board says."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.logs: list[str] = []
        self.wire: LossyLink | None = None
        self.link: ReliableSerialLink | None = None

    async def open(self) -> Host:
        """A new session (a bridge that reopened the port); the previous link is closed first."""
        await self.close()
        self.wire = LossyLink.from_fd(self.fd, close_fd=False, pace=False, max_frame_bytes=MAX_FRAME)
        self.link = ReliableSerialLink(self.wire, LINK)
        await self.link.__aenter__()
        return self

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()

    def lose(self, drop: Callable[[Frame], bool]) -> None:
        assert self.wire is not None
        self.wire.drop = drop  # type: ignore[method-assign]

    async def send(self, message_type: MessageType, payload: bytes, flags: int = 0) -> None:
        assert self.link is not None
        await self.link.send(message_type, payload, flags=flags, timeout_s=10)

    async def expect(self, message_type: MessageType, timeout_s: float = 20.0) -> Frame:
        """The next message of `message_type` (logs kept, other messages skipped)."""
        assert self.link is not None
        deadline = time.monotonic() + timeout_s
        while True:
            frame = await self.link.receive(max(0.01, deadline - time.monotonic()))
            if frame.message_type == MessageType.LOG:
                self.logs.append(parse_log_payload(frame.payload))
            if frame.message_type == message_type:
                return frame

    async def configure(self, run_id: str = RUN, key: TrustedKey = KEY.trusted_key) -> dict[str, Any]:
        await self.send(MessageType.HELLO, b"")  # who is there? (as the bridge asks)
        await self.expect(MessageType.HELLO)
        await self.send(MessageType.CONFIG, board_config_payload(board_config(run_id, key)))
        return parse_json_payload((await self.expect(MessageType.READY)).payload)

    async def send_update(self, payload: bytes, target: int, base: int | None, *, chunk_size: int = 4096,
                          signing_key: SigningKey = KEY) -> None:
        chunks = split_chunks(payload, chunk_size)
        manifest = UpdateManifest.for_payload(payload, run_id=RUN, round_index=target - 1, key=str(target),
                                              base_version=base, chunk_size=chunk_size,
                                              published_at=time.time()).signed(signing_key)
        await self.send(MessageType.MANIFEST, manifest.to_json())
        room = MAX_FRAME - 64
        for index, chunk in enumerate(chunks):
            pieces = [chunk[start:start + room] for start in range(0, len(chunk), room)]
            for number, piece in enumerate(pieces):
                await self.send(MessageType.UPDATE_CHUNK, UpdateChunk(str(target), index, piece).to_payload(),
                                flags=FLAG_MORE if number < len(pieces) - 1 else 0)


def is_chunk(index: int) -> Callable[[Frame], bool]:
    def matches(frame: Frame) -> bool:
        return frame.message_type == MessageType.UPDATE_CHUNK and UpdateChunk.from_payload(frame.payload).index == index
    return matches


class BoardOnPty:
    """A BoardAgent on one end of a pty, and a Host on the other."""

    def __init__(self, server: UpdateServer, state_dir: Path, meter: EnergyMeter | None = None,
                 trusted_key: TrustedKey | None = None) -> None:
        self.meter = meter
        self.trusted_key = trusted_key
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.server = server
        self.state = BoardStateStore(state_dir)
        self.agent = self.new_agent()
        self.task: asyncio.Task[None] | None = None

    def new_agent(self) -> BoardAgent:
        async def open_link() -> SerialLink:
            return SerialLink.from_fd(self.slave, close_fd=False, pace=False, max_frame_bytes=MAX_FRAME)

        def setup(config: BoardConfig) -> TorchInference:
            assert config.device == "bench-pi"
            return TorchInference(self.server.build_device_model(), self.server.device_test_split(config.device_index))

        profile = get_device_profile("rpi4")
        return BoardAgent("pty", board_name="bench-pi", profile=profile, meter=self.meter or ModelEnergyMeter(profile, 0.01),
                          setup=setup, state=self.state, max_frame_bytes=MAX_FRAME, open_link=open_link,
                          link_settings=LINK, trusted_key=self.trusted_key)

    async def restart(self) -> None:
        """A reboot: the agent process ends and a new one starts with the same state folder."""
        await self.stop()
        self.agent = self.new_agent()
        self.task = asyncio.create_task(self.agent.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
def meter() -> EnergyMeter | None:
    return None  # the profile's model; a test overrides this fixture for a hardware reader


@pytest.fixture
async def board(trained: tuple[UpdateServer, list[Any]], tmp_path: Path,
                meter: EnergyMeter | None) -> AsyncIterator[tuple[BoardOnPty, Host]]:
    server, _ = trained
    setup = BoardOnPty(server, tmp_path / "state", meter)
    setup.task = asyncio.create_task(setup.agent.run())
    host = await Host(setup.master).open()
    try:
        yield setup, host
    finally:
        await setup.stop()
        await host.close()
        os.close(setup.master)
        os.close(setup.slave)


async def test_board_applies_updates_sent_in_pieces_and_reports_measured_energy(board, trained) -> None:
    setup, host = board
    _, (first, second) = trained
    hello = Hello.from_payload((await host.expect(MessageType.HELLO)).payload)
    assert (hello.board, hello.profile, hello.version, hello.run) == ("bench-pi", "rpi4", 0, "")
    assert "energy:model" in hello.capabilities
    ready = await host.configure()
    assert ready == {"device": "bench-pi", "run": RUN, "version": 0, "error": None}

    await host.send_update(encode_full_model(first.weights, 1), 1, None)
    frame = await host.expect(MessageType.REPORT)
    report = parse_json_payload(frame.payload)
    assert DeviceReport.decode(frame.payload).version == 1  # the typed report the run decodes
    assert report["version"] == 1 and report["weights_hash"] == weights_hash(first.weights).hex()
    measured = report["measured_energy"]
    assert measured["meter"] == "model" and measured["sample_count"] >= 2 and measured["sampling_period_s"] == 0.01
    # the model reader's power per phase, integrated: receive at the radio's power, apply/evaluate at compute's
    profile = get_device_profile("rpi4")
    # the model reader's power is a step per phase and the integral interpolates between samples, so each
    # phase's energy lies between the lowest and the highest power the profile has, times its duration
    powers = (profile.idle_power_w, profile.radio_rx_power_w, profile.radio_tx_power_w, profile.compute_power_w)
    for phase, seconds in measured["seconds_by_phase"].items():
        joules = measured["joules_by_phase"][phase]
        assert min(powers) * seconds * 0.999 <= joules <= max(powers) * seconds * 1.001, phase
    assert measured["seconds_by_phase"]["receive"] > 0 and measured["seconds_by_phase"]["evaluate"] > 0
    assert report["energy_joules"] == pytest.approx(sum(report["energy_joules_by_phase"].values()))
    assert report["energy_joules_by_phase"]["compute"] == pytest.approx(
        measured["joules_by_phase"]["apply"] + measured["joules_by_phase"]["evaluate"])

    await host.send_update(encode_update(first.weights, second.weights, 1, 2), 2, 1)
    frame = await host.expect(MessageType.REPORT)
    assert parse_json_payload(frame.payload)["weights_hash"] == weights_hash(second.weights).hex()
    saved = setup.state.load(RUN, "bench-pi")
    assert saved is not None and saved.version == 2
    assert weights_hash(saved.weights) == weights_hash(second.weights)


async def test_frames_lost_on_the_line_are_asked_for_again_and_the_update_applies(board, trained) -> None:
    setup, host = board
    _, (first, _) = trained
    await host.configure()
    lost: list[Frame] = []

    def first_send_of_chunk_0(frame: Frame) -> bool:
        if not is_chunk(0)(frame) or any(frame is seen for seen in lost):
            return False
        lost.append(frame)
        return True

    host.lose(first_send_of_chunk_0)
    await host.send_update(encode_full_model(first.weights, 1), 1, None)
    report = parse_json_payload((await host.expect(MessageType.REPORT)).payload)
    assert report["version"] == 1 and report["weights_hash"] == weights_hash(first.weights).hex()
    assert lost and host.link is not None and host.link.protocol.frames_resent >= len(lost)
    assert setup.agent.sessions == 1


async def test_frames_that_never_come_end_the_link_and_nothing_is_applied(board, trained) -> None:
    setup, host = board
    _, (first, _) = trained
    await host.configure()
    host.lose(is_chunk(0))  # every send of chunk 0 is lost: the board asks, then gives the host up
    payload = encode_full_model(first.weights, 1)
    with pytest.raises(SerialLinkError):  # PeerUnresponsive on whichever end gives up first
        await host.send_update(payload, 1, None)
        await host.expect(MessageType.REPORT, timeout_s=5)
    assert setup.agent.deployment is not None and setup.agent.deployment.receiver.version == 0
    # a new session (the board's, the host's, or both): the host configures again and sends the update again
    await host.open()
    assert (await host.configure())["version"] == 0
    await host.send_update(payload, 1, None)
    frame = await host.expect(MessageType.REPORT)
    assert parse_json_payload(frame.payload)["version"] == 1


async def test_a_corrupted_update_is_rejected_whole(board, trained) -> None:
    setup, host = board
    _, (first, _) = trained
    await host.configure()
    deployment = setup.agent.deployment
    assert deployment is not None
    before = weights_hash(deployment.receiver.weights)
    payload = bytearray(encode_full_model(first.weights, 1))
    payload[-5] ^= 0xFF  # signed as it is, but its body no longer matches the header's hash
    await host.send_update(bytes(payload), 1, None)
    result = DeviceNack.decode((await host.expect(MessageType.APPLY_RESULT)).payload)
    assert result.version == 0 and "bad_update" in result.reason
    assert deployment.receiver.version == 0 and weights_hash(deployment.receiver.weights) == before
    assert setup.agent.rejected_updates == 1


async def test_a_host_that_is_not_the_run_cannot_make_the_board_apply_its_update(board, trained) -> None:
    """A host on the serial line signs with its own key: the board, not pinned, trusts the config's key, so a
    forged update signed by another key is refused; the genuine one still applies."""
    setup, host = board
    _, (first, _) = trained
    await host.configure()
    constant = {name: np.full_like(array, 0.25) for name, array in first.weights.items()}
    await host.send_update(encode_full_model(constant, 1000), 1000, None, signing_key=SigningKey.generate())
    await host.send(MessageType.UPDATE_CHUNK, b"\x00garbage")  # not even a chunk
    await host.send_update(encode_full_model(first.weights, 1), 1, None)
    report = DeviceReport.decode((await host.expect(MessageType.REPORT)).payload)
    assert report.version == 1 and report.weights_hash == weights_hash(first.weights).hex()
    # its chunks are held unchecked within the small unannounced budget, never assembled: only the garbage counts
    assert report.rejected_by_reason == {"bad_chunk": 1, "bad_signature": 1}


async def test_a_board_pinned_to_a_key_refuses_a_run_that_names_another(trained, tmp_path: Path) -> None:
    server, (first, _) = trained
    setup = BoardOnPty(server, tmp_path / "state", trusted_key=KEY.trusted_key)
    setup.task = asyncio.create_task(setup.agent.run())
    host = await Host(setup.master).open()
    try:
        impostor = SigningKey.generate()
        ready = await host.configure(key=impostor.trusted_key)  # a host that hands the board its own key
        assert "trusts only" in ready["error"] and setup.agent.deployment is None
        assert (await host.configure())["error"] is None  # the run's key: configured
        await host.send_update(encode_full_model(first.weights, 1), 1, None)
        assert DeviceReport.decode((await host.expect(MessageType.REPORT)).payload).version == 1
    finally:
        await setup.stop()
        await host.close()
        os.close(setup.master)
        os.close(setup.slave)


async def test_a_report_the_host_never_acknowledged_is_sent_again_after_the_next_config(board, trained) -> None:
    setup, host = board
    _, (first, _) = trained
    await host.configure()
    host.lose(lambda frame: frame.message_type == MessageType.ACK)  # the host's ACKs never reach the board
    await host.send_update(encode_full_model(first.weights, 1), 1, None)
    original = await host.expect(MessageType.REPORT)
    with pytest.raises(SerialLinkTimeout):  # sent again (lost ACKs), but delivered once: same sequence
        await host.expect(MessageType.REPORT, timeout_s=LINK.ack_timeout_s * 2)
    assert setup.agent.frames_resent >= 1
    # the board gives the silent host up, reopens, and sends the report again once configured
    await host.open()
    assert (await host.configure())["version"] == 1
    again = await host.expect(MessageType.REPORT, timeout_s=5)
    assert again.payload == original.payload
    with pytest.raises(SerialLinkTimeout):
        await host.expect(MessageType.REPORT, timeout_s=1)


async def test_a_config_repeated_while_a_report_is_in_flight_does_not_duplicate_it(board, trained) -> None:
    setup, host = board
    _, (first, _) = trained
    await host.configure()
    host.lose(lambda frame: frame.message_type == MessageType.ACK)  # the report stays unacknowledged for now
    await host.send_update(encode_full_model(first.weights, 1), 1, None)
    await host.expect(MessageType.REPORT)
    await host.send(MessageType.CONFIG, board_config_payload(board_config()))  # what a bridge does after each hello
    assert parse_json_payload((await host.expect(MessageType.READY)).payload)["version"] == 1
    host.lose(lambda frame: False)
    with pytest.raises(SerialLinkTimeout):  # the board's link sends it again under its own sequence: one delivery
        await host.expect(MessageType.REPORT, timeout_s=LINK.ack_timeout_s * 3)
    assert setup.agent.sessions == 1


async def test_equal_messages_sent_twice_are_answered_twice(board) -> None:
    _, host = board
    await host.expect(MessageType.HELLO)
    await host.send(MessageType.PING, b"same")
    await host.send(MessageType.PING, b"same")
    assert [(await host.expect(MessageType.PONG)).payload for _ in range(2)] == [b"same", b"same"]


async def test_frames_before_the_config_are_ignored_and_a_bad_config_is_answered(board, trained) -> None:
    setup, host = board
    _, (first, _) = trained
    await host.expect(MessageType.HELLO)
    await host.send_update(encode_full_model(first.weights, 1), 1, None)
    await host.send(MessageType.CONFIG, b'{"run": 1}')
    ready = parse_json_payload((await host.expect(MessageType.READY)).payload)
    assert "bad config" in ready["error"]
    assert any("not configured" in line for line in host.logs)
    assert setup.agent.deployment is None
    with pytest.raises(SerialFrameError, match="invalid board config message: device: missing; device_index: missing"):
        board_config_from_payload(zlib.compress(json.dumps({"run": "r"}).encode()))
    with pytest.raises(SerialFrameError, match="config is not zlib-compressed JSON"):
        board_config_from_payload(b'{"run": "r"}')
    with pytest.raises(SerialFrameError, match="truncated"):
        board_config_from_payload(zlib.compress(json.dumps({"run": "r"}).encode())[:-6])
    bomb = zlib.compress(b" " * (8 * 1024 * 1024), 9)  # 8 KiB that would inflate to 8 MiB
    with pytest.raises(SerialFrameError, match="inflates beyond"):
        board_config_from_payload(bomb)


async def test_a_rebooted_board_resumes_from_its_saved_version(board, trained) -> None:
    setup, host = board
    _, (first, _) = trained
    await host.configure()
    await host.send_update(encode_full_model(first.weights, 1), 1, None)
    await host.expect(MessageType.REPORT)
    await setup.restart()
    hello = Hello.from_payload((await host.expect(MessageType.HELLO)).payload)
    assert (hello.version, hello.run) == (0, "")  # not configured yet after the reboot
    ready = await host.configure()
    assert ready["version"] == 1
    assert any("resumed bench-pi of run run-1 at version 1" in line for line in host.logs)
    deployment = setup.agent.deployment
    assert deployment is not None and weights_hash(deployment.receiver.weights) == weights_hash(first.weights)
    # a different run starts from w⁰, not from another run's weights
    await setup.restart()
    assert (await host.configure(run_id="run-2"))["version"] == 0


def test_board_state_survives_only_whole(tmp_path: Path) -> None:
    store = BoardStateStore(tmp_path)
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    store.save("r", "d", 3, weights)
    saved = store.load("r", "d")
    assert saved is not None and saved.version == 3 and np.array_equal(saved.weights["w"], weights["w"])
    assert store.load("other-run", "d") is None and store.load("r", "other-device") is None
    store.save("r", "d", 4, {"w": weights["w"] + 1})
    assert len(list(tmp_path.glob("weights-*.npz"))) == 1  # older versions are removed
    (tmp_path / "state.json").write_text("{not json")
    assert store.load("r", "d") is None  # unreadable state: start from version 0, get a catch-up


class TestOnAJetson:
    """The board agent with the Jetson reader, on a fake INA3221 sysfs tree (VDD_IN: 5 V x 1.2 A = 6 W)."""

    @pytest.fixture
    def meter(self, tmp_path: Path) -> EnergyMeter:
        hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
        hwmon.mkdir(parents=True)
        for name, value in (("in1_label", "VDD_IN"), ("in1_input", 5000), ("curr1_input", 1200), ("in1_enable", 1),
                            ("in2_label", "VDD_CPU_GPU_CV"), ("in2_input", 5000), ("curr2_input", 400),
                            ("in2_enable", 1), ("name", "ina3221")):
            (hwmon / name).write_text(f"{value}\n")
        return JetsonEnergyMeter(tmp_path / "sys", period_s=0.01)

    async def test_reported_energy_is_the_input_rails_power_integrated_over_the_phases(self, board, trained) -> None:
        _, host = board
        _, (first, _) = trained
        hello = Hello.from_payload((await host.expect(MessageType.HELLO)).payload)
        assert "energy:jetson" in hello.capabilities
        await host.configure()
        await host.send_update(encode_full_model(first.weights, 1), 1, None)
        report = parse_json_payload((await host.expect(MessageType.REPORT)).payload)
        measured = report["measured_energy"]
        # the round may be short (no waiting on the line): at least the sampler's reading and the closing one
        assert measured["meter"] == "jetson" and measured["sample_count"] >= 2
        seconds = sum(measured["seconds_by_phase"].values())
        # constant 6 W on the input rail (not 6 + 2 W, the sum of rails): the integral is exact
        assert report["energy_joules"] == pytest.approx(6.0 * seconds, rel=1e-9)
        for phase, joules in measured["joules_by_phase"].items():
            assert joules == pytest.approx(6.0 * measured["seconds_by_phase"][phase], rel=1e-9, abs=1e-12)


async def test_a_chunk_refused_by_its_digest_is_repaired_once_the_update_stops(board, trained) -> None:
    """A chunk damaged before the serial line (its frame's CRC is good) fails its signed digest: the board waits
    until the update has stopped moving, then asks for a catch-up once; the catch-up applies."""
    setup, host = board
    _, (first, _) = trained
    await host.configure()
    payload = encode_full_model(first.weights, 1)
    chunks = split_chunks(payload, 4096)
    damaged = bytearray(chunks[1])
    damaged[7] ^= 0x10
    manifest = UpdateManifest.for_payload(payload, run_id=RUN, round_index=0, key="1", base_version=None,
                                          chunk_size=4096, published_at=time.time()).signed(KEY)
    await host.send(MessageType.MANIFEST, manifest.to_json())
    for index, chunk in enumerate([chunks[0], bytes(damaged), *chunks[2:]]):
        room = MAX_FRAME - 64
        pieces = [chunk[start:start + room] for start in range(0, len(chunk), room)]
        for number, piece in enumerate(pieces):
            last_sent = time.monotonic()  # the board takes this piece after now
            await host.send(MessageType.UPDATE_CHUNK, UpdateChunk("1", index, piece).to_payload(),
                            flags=FLAG_MORE if number < len(pieces) - 1 else 0)
    nack = DeviceNack.decode((await host.expect(MessageType.APPLY_RESULT, timeout_s=30)).payload)
    assert nack.version == 0 and "digest" in nack.reason and nack.repair == 1
    assert time.monotonic() - last_sent >= REPAIR_QUIET_MIN_S  # it waited for the update to stop moving
    assert any("does not match its digest" in line for line in host.logs), host.logs
    deployment = setup.agent.deployment
    assert deployment is not None and deployment.receiver.version == 0
    assert deployment.receiver.rejected_by_reason == {"bad_chunk": 1} and setup.agent.damage.repairs_asked == 1
    await host.send_update(payload, 1, None)  # the run's catch-up
    report = DeviceReport.decode((await host.expect(MessageType.REPORT)).payload)
    assert report.version == 1 and report.weights_hash == weights_hash(first.weights).hex()
    assert setup.agent.damage.repairs_asked == 1 and setup.agent.damage.next_check_s() is None
