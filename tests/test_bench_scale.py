"""bench/scale.py builds a valid scenario for any fleet size and reads a run's results the way they are written."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from testbed.cli import EXIT_OK, main

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
assert spec is not None and spec.loader is not None
scale = importlib.util.module_from_spec(spec)
sys.modules["bench_scale"] = scale  # dataclasses look their module up there
spec.loader.exec_module(scale)


@pytest.mark.parametrize("devices", [10, 1000, 2500])
def test_the_scale_scenario_validates_for_fleets_past_a_thousand(devices: int, capsys) -> None:
    assert main(["validate", str(scale.BASE_SCENARIO), *scale.scenario_overrides(devices, "embedded", 3)]) == EXIT_OK
    assert f"valid, {devices} devices" in capsys.readouterr().out


def test_the_link_floor_is_serialisation_plus_one_delay() -> None:
    assert scale.link_floor_s(125_000) == pytest.approx(1.0 + 0.020)


def test_a_run_folder_is_summarised_into_convergence_and_delivery_over_floor(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({
        "rounds": [{"round_seconds": 1.5}, {"round_seconds": 0.5}],
        "devices": {"rpi4-0": {"hash_matches_server": True}, "rpi4-1": {"hash_matches_server": False}},
        "timing": {"lateness_ms": {"p50": 0.5, "p99": 3.0}}}))
    floor = scale.link_floor_s(1000)
    records = [{"update_sent": True, "delivered": True, "update_bytes": 1000, "delivery_seconds": floor * ratio}
               for ratio in (1.0, 1.2, 2.0)] + [{"update_sent": False, "delivered": False}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    result = scale.ScaleResult(devices=2, broker="embedded", wall_s=3.0, converged=False)
    scale.summarise_run(tmp_path, result)
    assert result.round_seconds == [1.5, 0.5]
    assert not result.converged  # one device is off the server's hash
    assert result.p50_delivery_over_floor == pytest.approx(1.2)
    assert result.lateness_p99_ms == 3.0
    assert result.updates == 3
