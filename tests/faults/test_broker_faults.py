"""The embedded broker restarted in the middle of a transfer: the run's session and every device reconnect, and the
reports the broker lost are sent again, each recorded once."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.events import read_events
from tests.faults.matrix import FAST_LINK, assert_survived, fault_scenario, run_faults

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_the_embedded_broker_restarted_mid_transfer_does_not_end_the_run(tmp_path: Path) -> None:
    # round 1's update and manifest take about 2 s at 8 kbit/s: 300 ms in, the broker stops for 2 s
    scenario = fault_scenario([{"round": 1, "after": "300ms", "action": "broker_restart", "for": "2s"}],
                              channel={"downlink": {"rate": "8kbit", "delay": "50ms"}, "uplink": FAST_LINK})
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert faults.said("broker-reconnected") and not faults.event_warnings()
    records = read_events(faults.out)
    assert [(record["action"], record["kind"], record["round"]) for record in records] == [
        ("broker_restart", "fire", 1), ("broker_restart", "end", 1)]
    assert records[1]["t"] - records[0]["t"] >= 2.0
    # What the broker had handed to the links still arrives (the links deliver what is on its way); the reports
    # of version 2 met a stopped broker: every device lost its connection and sent its report again.
    assert all(agent.reconnects >= 1 for agent in faults.agents().values())
    assert faults.result.summary["rounds"][1]["round_seconds"] >= 2.0
