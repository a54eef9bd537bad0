"""Modelled quantities come from the model and the seed only: two runs of one scenario give the same bytes and joules."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.profiles import get_device_profile
from testbed.core.scenario import parse_scenario
from testbed.runner import ScenarioRun

pytestmark = pytest.mark.timeout(240)

SCENARIO = {
    "name": "energy", "seed": 9, "rounds": 3, "round_period": "30s", "round_timeout": "60s",
    "data": {"initial_samples": 200, "new_samples_per_round": 60},
    "update": {"epochs": 2, "ratio": 0.1}, "model": {"hidden": [16]},
    "devices": [{"profile": "rpi4", "count": 1}, {"profile": "jetson-nano", "count": 1}],
    "channel": {"downlink": {"rate": "50kbit", "delay": "20ms"}},
    "metrics": {"enabled": False},
}


async def test_two_runs_give_the_same_modelled_bytes_and_energy(tmp_path: Path) -> None:
    summaries = []
    for attempt in range(2):
        result = await ScenarioRun(parse_scenario(SCENARIO), tmp_path / f"run{attempt}").execute()
        summaries.append(result.summary["devices"])
    first, second = summaries
    for device_id in first:
        assert first[device_id]["bytes_received"] == second[device_id]["bytes_received"], device_id
        assert first[device_id]["energy_joules"] == second[device_id]["energy_joules"], device_id
    # idle is counted over the round period, not over the host's wall time: 3 rounds × 30 s at idle power at most
    for device_id, state in first.items():
        profile = get_device_profile(state["profile"])
        assert 3 * 30 * profile.idle_power_w * 0.9 < state["energy_joules"] < 3 * 30 * profile.radio_tx_power_w
