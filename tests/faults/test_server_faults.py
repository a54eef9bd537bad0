"""The update server restarted (scenario event server_restart): rebuilt from the run's last checkpoint with its MQTT
session reconnected, before round 0 (no checkpoint yet), in the middle of a transfer and in a round's report phase;
each interrupted round is repeated, every device ends on the final hash an uninterrupted server computes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from server.update_server import UpdateServer
from testbed.core.wire import weights_hash
from testbed.events import read_events
from tests.faults.matrix import FAST_LINK, assert_survived, fault_scenario, run_faults

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_the_server_restarted_before_mid_transfer_and_at_report_ends_on_the_uninterrupted_hash(
        tmp_path: Path) -> None:
    # round 1's update takes about 2 s at 8 kbit/s: 300 ms into its delivery the server restarts
    scenario = fault_scenario([{"at": "0s", "action": "server_restart"},
                               {"round": 1, "phase": "delivery", "after": "300ms", "action": "server_restart"},
                               {"round": 2, "phase": "report", "action": "server_restart"}],
                              channel={"downlink": {"rate": "8kbit", "delay": "50ms"}, "uplink": FAST_LINK})
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()
    restarts = faults.said("server-restarted")
    assert [data["round"] for data in restarts] == [0, 1, 2]
    assert [(record["action"], record["kind"], record["round"]) for record in read_events(faults.out)] == [
        ("server_restart", "fire", None), ("server_restart", "fire", 1), ("server_restart", "fire", 2)]
    uninterrupted = UpdateServer(scenario).run_all()[-1]
    summary = faults.result.summary
    assert (summary["server"]["final_version"], summary["server"]["weights_hash"]) == (
        uninterrupted.version, weights_hash(uninterrupted.weights).hex())
    # rounds 1 and 2 were repeated; round 0 too if the first restart came while it trained (the event fires at 0 s)
    trained = Counter(data["round"] for data in faults.said("training"))
    assert trained[1] == trained[2] == 2 and trained[0] in (1, 2), trained
    assert faults.said("broker-reconnected")  # the run's own session came back after each restart
