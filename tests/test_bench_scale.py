"""bench/scale.py builds a valid scenario for any fleet size and reads a run's results the way they are written."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
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


def test_the_scale_scenario_carries_the_setups_links_and_workers(capsys) -> None:
    setup = scale.ScaleSetup(broker="mosquitto", workers=2, rate="100kbit", delay="50ms")
    overrides = scale.scenario_overrides(200, "mosquitto", 3, setup)
    assert "fleet.workers=2" in overrides
    assert 'channel.downlink={"rate": "100kbit", "delay": "50ms"}' in overrides
    assert main(["validate", str(scale.BASE_SCENARIO), *overrides]) == EXIT_OK
    assert "valid, 200 devices" in capsys.readouterr().out


def test_the_link_floor_is_serialisation_plus_one_delay() -> None:
    assert scale.ScaleSetup().link_floor_s(125_000) == pytest.approx(1.0 + 0.020)
    assert scale.ScaleSetup(rate="100kbit", delay="50ms").link_floor_s(12_500) == pytest.approx(1.0 + 0.050)


@pytest.mark.parametrize("text", ["100", "fastkbit", "10 parsecs"])
def test_a_bad_rate_or_delay_is_one_line(text: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        scale.main(["--rate", text])
    assert exit_info.value.code == 2
    assert f"{text!r} is not a rate or a time: write e.g. 100kbit or 50ms" in capsys.readouterr().err


def test_an_unknown_event_loop_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit):
        scale.main(["--loops", "default,trio"])
    assert "--loops 'default,trio': each must be auto, default or uvloop" in capsys.readouterr().err


def test_the_process_tree_holds_the_child_and_its_rss_counts() -> None:
    import subprocess
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 20
        while child.pid not in scale._process_tree(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert child.pid in scale._process_tree(os.getpid())
        assert scale.tree_rss_kib(os.getpid()) > scale._status_kib(os.getpid(), "VmRSS")
    finally:
        child.kill()
        child.wait(timeout=20)


def _result(setup: scale.ScaleSetup, p99: float | None, wall: float) -> scale.ScaleResult:
    return scale.ScaleResult(devices=200, setup=setup, wall_s=wall, converged=True, lateness_p50_ms=1.0,
                             lateness_p99_ms=p99)


def test_the_loop_ratio_is_of_medians_over_repeats() -> None:
    default, fast = scale.ScaleSetup(loop="default"), scale.ScaleSetup(loop="uvloop")
    results = [_result(default, 100.0, 30.0), _result(fast, 50.0, 20.0), _result(default, 300.0, 50.0),
               _result(fast, 70.0, 30.0), _result(default, 200.0, 40.0), _result(fast, 1000.0, 25.0)]
    (line,) = scale.loop_ratios(results)
    assert line == ("uvloop / default loop, embedded, 1 worker(s), N=200: lateness p50 1.00, p99 0.35, wall 0.62 "
                    "(medians of 3 and 3 runs)")  # 70/200, 25/40


def test_a_loop_ratio_without_lateness_on_one_side_is_a_dash() -> None:
    default, fast = scale.ScaleSetup(loop="default"), scale.ScaleSetup(loop="uvloop")
    (line,) = scale.loop_ratios([_result(default, None, 30.0), _result(fast, 50.0, 15.0)])
    assert "p99 —, wall 0.50" in line


def test_the_goals_are_judged_on_the_median_of_repeats_with_every_run_shown() -> None:
    setup = scale.ScaleSetup()
    results = [_result(setup, p99, 20.0) for p99 in (7.4, 10.7, 6.3)]
    for result, ratio in zip(results, (1.01, 1.03, 1.02)):
        result.p50_delivery_over_floor = ratio
    results.append(_result(scale.ScaleSetup(loop="default"), 9.5, 20.0))  # run once: no median line
    (line,) = scale.goal_medians(results)
    assert line == ("median of 3 runs, embedded, 1 worker, testbed's loops, N=200: lateness p99 7.4 (7.4, 10.7, 6.3) "
                    "≤ 10: met; p50 delivery / floor 1.02 (1.01, 1.03, 1.02) ≤ 1.1: met; converged 3 of 3")
    results[0].lateness_p99_ms, results[2].converged = 12.0, False
    (line,) = scale.goal_medians(results[:3])
    assert "lateness p99 10.7 (12.0, 10.7, 6.3) > 10: MISSED" in line and line.endswith("converged 2 of 3")
    results[1].p50_delivery_over_floor = None
    assert "p50 delivery / floor: not measured in every run" in scale.goal_medians(results[:3])[0]


def test_a_run_folder_is_summarised_into_convergence_and_delivery_over_floor(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text(json.dumps({
        "rounds": [{"round_seconds": 1.5}, {"round_seconds": 0.5}],
        "devices": {"rpi4-0": {"hash_matches_server": True}, "rpi4-1": {"hash_matches_server": False}},
        "timing": {"lateness_ms": {"p50": 0.5, "p99": 3.0}, "loop_lag_ms": {"p50": 0.2, "p99": 4.0},
                   "faithful": True}}))
    setup = scale.ScaleSetup()
    floor = setup.link_floor_s(1000)
    records = [{"update_sent": True, "delivered": True, "update_bytes": 1000, "delivery_seconds": floor * ratio}
               for ratio in (1.0, 1.2, 2.0)] + [{"update_sent": False, "delivered": False}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    result = scale.ScaleResult(devices=2, setup=setup, wall_s=3.0, converged=False)
    scale.summarise_run(tmp_path, result)
    assert result.round_seconds == [1.5, 0.5]
    assert not result.converged  # one device is off the server's hash
    assert result.p50_delivery_over_floor == pytest.approx(1.2)
    assert (result.lateness_p50_ms, result.lateness_p99_ms, result.loop_lag_p99_ms) == (0.5, 3.0, 4.0)
    assert result.faithful is True
    assert result.updates == 3


def test_auto_leaves_the_loop_to_the_testbed_and_the_others_set_it_everywhere() -> None:
    base = {"PATH": "/bin", "TESTBED_EVENT_LOOP": "uvloop"}  # a caller's own setting never leaks into `auto`
    assert scale.child_environment(scale.ScaleSetup(), base) == {"PATH": "/bin"}
    assert scale.child_environment(scale.ScaleSetup(loop="default"), base)["TESTBED_EVENT_LOOP"] == "default"
    assert scale.ScaleSetup().label == "embedded, 1 worker, testbed's loops"
    assert scale.ScaleSetup(broker="mosquitto", workers=2, loop="uvloop").label == "mosquitto, 2 workers, uvloop loop"
