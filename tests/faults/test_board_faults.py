"""A serial board reset: its bridge drops the line, opens it again, and the board catches up (a board agent in its
own process, over real ptys)."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.pty_cable import PtyCable
from devices.serial_bridge import SerialBridge
from tests.faults.matrix import assert_survived, fault_scenario, run_faults
from tests.test_hil_serial import BOARD, BoardProcess, board, board_status_changes, cable  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_a_board_reset_drops_the_line_and_the_board_catches_up(cable: PtyCable,  # noqa: F811
                                                                      board: BoardProcess,  # noqa: F811
                                                                      tmp_path: Path) -> None:
    scenario = fault_scenario([{"round": 1, "phase": "delivery", "action": "board_reset", "device": BOARD}],
                              overrides=[f"devices=[{{name: {BOARD}, profile: rpi4, serial: '{cable.host_path}'}}, "
                                         "{profile: rpi4, count: 2}]"])
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    bridge = faults.downtime.fleet.member(BOARD)
    assert isinstance(bridge, SerialBridge) and bridge.line_drops == 1
    assert board_status_changes(faults.progress) == [True, False, True]  # ready, line dropped, ready again
    assert any(data["device"] == BOARD for data in faults.said("catch-up"))
    assert "line dropped (board reset)" in (faults.out / "serial" / f"{BOARD}.log").read_text()
    assert board.starts == 1 and board.process is not None and board.process.poll() is None, board.output()
