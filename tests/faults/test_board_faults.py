"""Faults on a serial board (a board agent in its own process, over real ptys): a reset (its bridge drops the line,
opens it again, and the board catches up), and chunks corrupted, duplicated or reordered on its bridge, before the
serial line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devices.pty_cable import PtyCable
from devices.serial_bridge import SerialBridge
from testbed.core.scenario import Scenario
from tests.faults.matrix import FaultRun, assert_survived, fault_scenario, run_faults
from tests.test_hil_serial import BOARD, BoardProcess, board, board_status_changes, cable  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


def board_scenario(cable: PtyCable, event: dict[str, Any]) -> Scenario:  # noqa: F811 (the fixture's name)
    """The matrix's run with the serial board BOARD on `cable` in place of one rpi4, and `event`."""
    serial = f"{{name: {BOARD}, profile: rpi4, serial: '{cable.host_path}'}}"
    return fault_scenario([event], overrides=[f"devices=[{serial}, {{profile: rpi4, count: 2}}]"])


async def survived_on_board(cable: PtyCable, event: dict[str, Any], out: Path) -> FaultRun:  # noqa: F811
    """The finished run with `event`: it passed what every case of the matrix asserts and performed `event`."""
    faults = await run_faults(board_scenario(cable, event), out)
    assert_survived(faults)
    assert not faults.event_warnings()
    return faults


def bridge_of(faults: FaultRun) -> SerialBridge:
    bridge = faults.downtime.fleet.member(BOARD)
    assert isinstance(bridge, SerialBridge)
    return bridge


def board_catch_ups(faults: FaultRun) -> list[dict[str, Any]]:
    return [data for data in faults.said("catch-up") if data["device"] == BOARD]


def print_round_times(faults: FaultRun) -> None:
    """What the README's matrix quotes (`pytest -s tests/faults/test_board_faults.py`): each round's length and the
    board's delivery time per round, measured."""
    rounds = [f"{record['round_seconds']:.2f}" for record in faults.result.summary["rounds"]]
    delivery = [f"{record['delivery_seconds']:.2f}" for record in faults.records() if record["device"] == BOARD]
    print(f"round seconds {', '.join(rounds)}; {BOARD}'s delivery seconds {', '.join(delivery)}")


def assert_nothing_refused_or_repaired(faults: FaultRun) -> None:
    """The board refused no chunk and asked for no catch-up: nothing was missing, nothing damaged."""
    assert faults.result.summary["devices"][BOARD]["rejected_by_reason"] == {}
    assert not board_catch_ups(faults)


async def test_a_board_reset_drops_the_line_and_the_board_catches_up(cable: PtyCable,  # noqa: F811
                                                                      board: BoardProcess,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    faults = await survived_on_board(cable, {"round": 1, "phase": "delivery", "action": "board_reset", "device": BOARD},
                                     tmp_path / "out")
    assert bridge_of(faults).line_drops == 1
    assert board_status_changes(faults.progress) == [True, False, True]  # ready, line dropped, ready again
    assert board_catch_ups(faults)
    assert "line dropped (board reset)" in (faults.out / "serial" / f"{BOARD}.log").read_text()
    assert board.starts == 1 and board.process is not None and board.process.poll() is None, board.output()


async def test_a_serial_cable_cut_for_4_s_keeps_the_board_away_that_long_and_it_catches_up(
        cable: PtyCable, board: BoardProcess, tmp_path: Path) -> None:  # noqa: F811
    faults = await survived_on_board(cable, {"round": 1, "phase": "delivery", "action": "board_reset",
                                             "device": BOARD, "for": "4s"}, tmp_path / "out")
    assert bridge_of(faults).line_drops == 1
    assert board_status_changes(faults.progress) == [True, False, True]  # ready, cable out, ready again
    assert board_catch_ups(faults)
    # the round waited for the board: its line stayed closed 4 s from the event before the board could catch up
    assert faults.result.summary["rounds"][1]["round_seconds"] >= 4.0
    assert board.starts == 1 and board.process is not None and board.process.poll() is None, board.output()
    print_round_times(faults)


async def test_chunks_corrupted_before_the_serial_line_are_refused_by_digest_and_repaired(
        cable: PtyCable, board: BoardProcess, tmp_path: Path) -> None:  # noqa: F811
    # round 1's update is 4 chunks of 256 B: the first 3 reach the board with 2 bits flipped each (the frames that
    # carry them have good CRCs: the damage came before the line)
    faults = await survived_on_board(cable, {"round": 1, "action": "corrupt", "device": BOARD, "chunks": 3, "bits": 2},
                                     tmp_path / "out")
    assert bridge_of(faults).chunk_faults.corrupted == 3
    devices = faults.result.summary["devices"]
    assert devices[BOARD]["rejected_by_reason"] == {"bad_chunk": 3}
    assert all(devices[device_id]["rejected_by_reason"] == {} for device_id in devices if device_id != BOARD)
    repairs = board_catch_ups(faults)  # asked by the board (APPLY_RESULT) once round 1's update stopped moving
    assert [(data["round"], data["from"]) for data in repairs] == [(1, 1)] and "digest" in repairs[0]["reason"]
    assert board.process is not None and board.process.poll() is None, board.output()
    print_round_times(faults)


async def test_chunks_duplicated_before_the_serial_line_are_taken_once(
        cable: PtyCable, board: BoardProcess, tmp_path: Path) -> None:  # noqa: F811
    faults = await survived_on_board(cable, {"round": 1, "action": "duplicate", "device": BOARD, "chunks": 3},
                                     tmp_path / "out")
    assert bridge_of(faults).chunk_faults.duplicated == 3
    assert_nothing_refused_or_repaired(faults)
    print_round_times(faults)


async def test_chunks_reordered_before_the_serial_line_are_put_in_order(
        cable: PtyCable, board: BoardProcess, tmp_path: Path) -> None:  # noqa: F811
    # a group of 5: round 1's 4 chunks are held until the hold time (1 s) says the rest is not coming, then go to
    # the board shuffled; round 2's first chunk completes the group alone (a group of one keeps its order)
    faults = await survived_on_board(cable, {"round": 1, "action": "reorder", "device": BOARD, "chunks": 5},
                                     tmp_path / "out")
    assert bridge_of(faults).chunk_faults.reordered == 4
    assert_nothing_refused_or_repaired(faults)
    held = next(record for record in faults.records() if (record["round"], record["device"]) == (1, BOARD))
    assert held["delivery_seconds"] >= 1.0  # the chunks waited out the hold time on the bridge
    print_round_times(faults)
