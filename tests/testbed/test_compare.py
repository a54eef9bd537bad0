"""`testbed compare`: server-only strategy comparison, its statistics, table, CSV, plot, processes and CLI errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import yaml

from testbed.cli import EXIT_BAD_SCENARIO, EXIT_OK, main
from testbed.compare import (
    ABLATION,
    CompareError,
    CompareRow,
    Contender,
    parse_contenders,
    plan_runs,
    run_comparison,
)
from testbed.compare_report import interval_note, markdown_table, summarise, write_report
from testbed.compare_stats import t_interval
from testbed.core.scenario import parse_scenario

SMALL = {
    "name": "cmp", "seed": 5, "rounds": 3,
    "data": {"initial_samples": 300, "new_samples_per_round": 300},
    "model": {"hidden": [16]},
    "update": {"epochs": 2},
    "devices": [{"profile": "rpi4", "count": 1}],
}


@pytest.fixture(scope="module")
def rows() -> list[CompareRow]:
    return run_comparison(parse_scenario(SMALL), ["full", "dpu", "rpu", "magnitude"], [0.05, 0.1], [5])


def test_every_strategy_ratio_and_round_is_run_once(rows: list[CompareRow]) -> None:
    keys = [(row.strategy, row.ratio, row.round) for row in rows]
    assert len(keys) == len(set(keys)) == 3 + 3 * 2 * 3
    assert {row.strategy for row in rows} == {"full", "dpu", "rpu", "magnitude"}


def test_bit_accounting_matches_the_payload_and_the_floor(rows: list[CompareRow]) -> None:
    for row in rows:
        if row.strategy != "full" and row.round >= 1 and row.sent:
            assert 0 < row.positions <= math.floor(row.ratio * row.partial_weights)
            assert row.index_floor_bits == pytest.approx(math.log2(math.comb(row.partial_weights, row.positions)))
            assert row.index_bits >= row.index_floor_bits
            assert row.value_bits == 32 * row.positions
            assert row.update_bytes * 8 >= row.index_bits + row.value_bits


def test_summary_is_the_mean_difference_to_full_in_the_same_round(rows: list[CompareRow]) -> None:
    summaries = {(s.strategy, s.ratio): s for s in summarise(rows)}
    full_row = summaries[("full", 0.05)]
    assert full_row.mean_accuracy_difference_pp == 0.0 and full_row.versus_full is None
    full = {row.round: row.accuracy for row in rows if row.strategy == "full"}
    chosen = [row for row in rows if row.strategy == "dpu" and row.ratio == 0.1 and row.round >= 1]
    expected = sum(100 * (row.accuracy - full[row.round]) for row in chosen) / len(chosen)
    dpu = summaries[("dpu", 0.1)]
    assert dpu.mean_accuracy_difference_pp == pytest.approx(expected)
    assert dpu.rounds == 2 and dpu.seeds == 1 and dpu.versus_dpu is None
    assert dpu.versus_full is not None and not dpu.versus_full.has_interval  # one seed: no interval claimed
    line = f"| 0.1 | dpu | {dpu.mean_accuracy:.4f} | {expected:+.2f} (1 seed: no interval) | — | 1 |"
    assert line in markdown_table(summarise(rows))


def test_report_files(rows: list[CompareRow], tmp_path: Path) -> None:
    summaries = write_report(rows, tmp_path, "small")
    with open(tmp_path / "compare.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(rows)
    assert {"strategy", "ratio", "round", "accuracy", "update_bytes", "index_bits", "value_bits"} <= set(read[0])
    text = (tmp_path / "compare.md").read_text()
    assert markdown_table(summaries) in text and "MNIST MLP" in text
    image = (tmp_path / "compare.png").read_bytes()
    assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 10_000


@pytest.fixture(scope="module")
def three_seeds() -> list[CompareRow]:
    return run_comparison(parse_scenario(SMALL), ["full", "dpu", "gcpu", "no-update", "biases-only"], [0.05],
                          [5, 6, 7])


def per_seed(rows: list[CompareRow], strategy: str) -> dict[int, dict[int, float]]:
    series: dict[int, dict[int, float]] = {}
    for row in rows:
        if row.strategy == strategy and row.round >= 1:
            series.setdefault(row.seed, {})[row.round] = 100 * row.accuracy
    return series


def test_differences_are_averaged_per_seed_over_rounds_then_over_seeds(three_seeds: list[CompareRow]) -> None:
    summaries = {s.strategy: s for s in summarise(three_seeds)}
    full, dpu, gcpu = (per_seed(three_seeds, name) for name in ("full", "dpu", "gcpu"))
    by_seed = [sum(gcpu[seed][r] - dpu[seed][r] for r in gcpu[seed]) / len(gcpu[seed]) for seed in (5, 6, 7)]
    mean, low, high = t_interval(by_seed)
    versus_dpu = summaries["gcpu"].versus_dpu
    assert versus_dpu is not None and versus_dpu.seeds == 3  # seeds, not (seed, round) cells
    assert (versus_dpu.mean, versus_dpu.low, versus_dpu.high) == pytest.approx((mean, low, high))
    assert versus_dpu.verdict == ("tie" if low <= 0 <= high else "higher" if low > 0 else "lower")
    to_full = [sum(dpu[seed][r] - full[seed][r] for r in dpu[seed]) / len(dpu[seed]) for seed in (5, 6, 7)]
    assert summaries["dpu"].versus_full.mean == pytest.approx(sum(to_full) / 3)  # type: ignore[union-attr]
    assert summaries["dpu"].versus_dpu is None and summaries["full"].versus_full is None


def test_floors_are_rows_beside_the_ratio_and_compared_with_dpu(three_seeds: list[CompareRow]) -> None:
    summaries = summarise(three_seeds)
    assert [s.strategy for s in summaries] == ["full", "biases-only", "no-update", "dpu", "gcpu"]
    no_update = summaries[2]
    assert not no_update.uses_ratio and no_update.mean_update_bytes == 0 and no_update.index_bits_over_floor is None
    assert no_update.versus_dpu is not None and no_update.versus_dpu.seeds == 3
    for seed in (5, 6, 7):  # the floors keep or build on the full initial deployment
        first = {row.strategy: row.accuracy for row in three_seeds if row.seed == seed and row.round == 0}
        assert first["full"] == first["no-update"] == first["biases-only"]
        assert {row.accuracy for row in three_seeds if row.strategy == "no-update" and row.seed == seed} == {
            first["full"]}
    table = markdown_table(summaries)
    assert "| ratio k | strategy | mean acc | Δ vs full (pp) [95% t-interval over n seeds] sign-flip p " in table
    assert "| n seeds |" in table and "| any | no-update |" in table and "| 0.05 | gcpu |" in table


def test_report_states_the_method_and_draws_bands(three_seeds: list[CompareRow], tmp_path: Path) -> None:
    write_report(three_seeds, tmp_path, "three seeds")
    text = (tmp_path / "compare.md").read_text()
    assert interval_note() in text and "Student t over seeds" in text and "sign-flip" in text
    assert (tmp_path / "compare.png").read_bytes().startswith(b"\x89PNG")


def test_only_a_collapse_far_beyond_the_others_leaves_the_plot_axis() -> None:
    from testbed.compare_report import _off_scale

    # digits at k = 0.005: pruning at chance, the rest within a few points of full updating
    assert _off_scale({"dpu": 0.030, "rpu": 0.033, "no-update": 0.038, "pruning": 0.864}) == {"pruning"}
    assert _off_scale({"dpu": 0.25, "rpu": 0.30, "no-update": 0.36}) == set()  # all far off: all drawn
    assert _off_scale({}) == set()


def test_contenders_are_strategies_with_optional_settings() -> None:
    contenders = parse_contenders(" full,dpu[lambda=1, reinit=false],gcpu,dpu,full")
    assert [c.label for c in contenders] == ["full", "dpu[lambda=1,reinit=false]", "gcpu", "dpu"]
    assert contenders[1] == Contender("dpu", (("lambda", "1"), ("reinit", "false")))
    assert not contenders[0].uses_ratio and contenders[1].uses_ratio
    assert [c.label for c in ABLATION] == ["dpu[lambda=0.5,reinit=true]", "dpu[lambda=0.5,reinit=false]",
                                           "dpu[lambda=1,reinit=true]", "dpu[lambda=1,reinit=false]"]
    for text, message in [("dpu,bogus", "unknown bogus"), ("dpu[lambda=1", "with a closing ]"),
                          ("dpu[lambda]", "'lambda' is not key=value"), (",", "no strategy")]:
        with pytest.raises(CompareError, match=message.replace("[", r"\[")):
            parse_contenders(text)


def test_settings_equal_to_a_named_contender_run_once() -> None:
    # SMALL leaves DPU at its defaults (λ = 0.5, re-init on): that ablation row is the same run as dpu.
    plan = plan_runs(parse_scenario(SMALL), [Contender("full"), Contender("dpu"), *ABLATION], [0.05, 0.1], [5])
    assert [run.labels for run in plan if run.ratio == 0.1] == [
        ("dpu", "dpu[lambda=0.5,reinit=true]"), ("dpu[lambda=0.5,reinit=false]",), ("dpu[lambda=1,reinit=true]",),
        ("dpu[lambda=1,reinit=false]",)]
    assert len(plan) == 1 + 2 * 4


def write_small(tmp_path: Path) -> Path:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(SMALL))
    return scenario


def test_cli_compare_writes_its_files(tmp_path: Path) -> None:
    scenario = write_small(tmp_path)
    code = main(["compare", str(scenario), "--strategies", "dpu,magnitude", "--ratios", "0.05",
                 "--set", "rounds=2", "--out", str(tmp_path / "out")])
    assert code == EXIT_OK
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"compare.csv", "compare.md", "compare.png",
                                                                     "cells"}
    assert "| any | full |" in (tmp_path / "out" / "compare.md").read_text()  # full is added as the reference


def test_cli_compare_shows_progress_keeps_cells_and_a_rerun_skips_them(tmp_path: Path, capsys, monkeypatch) -> None:
    from testbed import compare

    scenario = write_small(tmp_path)
    arguments = ["compare", str(scenario), "--strategies", "dpu", "--ratios", "0.05", "--set", "rounds=2",
                 "--jobs", "1", "--out", str(tmp_path / "out")]
    assert main(arguments) == EXIT_OK
    first = capsys.readouterr().out
    # not a terminal: one line per round, counting up to the total, with an ETA
    assert "[1/4 rounds, ETA ?]" not in first and "[4/4 rounds, ETA 0m00s] dpu k=0.05 seed 5 round 1" in first
    assert sorted(path.name for path in (tmp_path / "out" / "cells").iterdir()) == [
        "dpu_k0.05_seed5.json", "full_k0.05_seed5.json"]
    table = (tmp_path / "out" / "compare.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell was trained again")

    monkeypatch.setattr(compare, "UpdateServer", no_training)
    assert main(arguments) == EXIT_OK
    again = capsys.readouterr().out
    assert "dpu k=0.05 seed 5: finished before, taken from cells/" in again
    assert (tmp_path / "out" / "compare.md").read_text() == table  # the same result from the kept cells
    monkeypatch.undo()
    assert main([*arguments, "--set", "update.epochs=3"]) == EXIT_BAD_SCENARIO  # other settings: cells refused
    assert "holds cells of another scenario" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("arguments, message", [
    (["--strategies", "dpu,bogus"], "unknown bogus"),
    (["--ratios", "0.05,abc"], "not a list of numbers"),
    (["--ratios", "0"], "must be in (0, 1]"),
    (["--ratios", "1.5"], "must be in (0, 1]"),
    (["--seeds", "0"], "at least 1"),
    (["--set", "update.epochs=0"], "update.epochs"),
    (["--jobs", "0"], "--jobs must be at least 1, got 0"),
    (["--strategies", "dpu[lambda=2]"], "--strategies: dpu[lambda=2]: invalid strategy settings update.lambda:"),
    (["--strategies", "dpu[bogus=1]"], "update.bogus: unknown field for strategy dpu"),
    (["--strategies", "rpu[lambda=1]"], "update.lambda: unknown field for strategy rpu"),
    (["--strategies", "dpu[lambda=1"], "--strategies: 'dpu[lambda=1': settings are written name[key=value,...]"),
])
def test_cli_compare_rejects_bad_arguments(arguments: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    scenario = write_small(tmp_path)
    out = tmp_path / "out"
    assert main(["compare", str(scenario), "--out", str(out), *arguments]) == EXIT_BAD_SCENARIO
    assert message in capsys.readouterr().out.replace("\n", " ")
    assert not out.exists()


def test_cli_parallel_runs_give_the_same_files_as_serial_and_resume(tmp_path: Path, capsys) -> None:
    # Two separate runs of the same seeds, so this is also the test that a comparison is deterministic.
    scenario = write_small(tmp_path)
    arguments = ["compare", str(scenario), "--strategies", "dpu,no-update", "--ratios", "0.05", "--seeds", "2",
                 "--set", "rounds=2"]
    assert main([*arguments, "--jobs", "1", "--out", str(tmp_path / "serial")]) == EXIT_OK
    serial = capsys.readouterr().out
    assert main([*arguments, "--jobs", "2", "--out", str(tmp_path / "parallel")]) == EXIT_OK
    parallel = capsys.readouterr().out
    assert "2 worker process(es)" in parallel
    for name in ("compare.csv", "compare.md"):
        assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()

    def statuses(out: str) -> list[str]:  # the round lines without their count and ETA (their order may differ)
        return sorted(line.split("] ", 1)[1] for line in out.splitlines() if line.startswith("["))

    assert len(statuses(parallel)) == 3 * 2 * 2 and statuses(parallel) == statuses(serial)
    assert "[12/12 rounds, ETA 0m00s]" in parallel
    # Resume: two cells lost (as after a Ctrl-C), the rest kept; again in two processes.
    (tmp_path / "parallel" / "cells" / "dpu_k0.05_seed6.json").unlink()
    (tmp_path / "parallel" / "cells" / "full_k0.05_seed5.json").unlink()
    assert main([*arguments, "--jobs", "2", "--out", str(tmp_path / "parallel")]) == EXIT_OK
    resumed = capsys.readouterr().out
    assert resumed.count("finished before, taken from cells/") == 4
    assert "dpu k=0.05 seed 6 round 1" in resumed and "full k=0.05 seed 5 round 1" in resumed
    assert (tmp_path / "parallel" / "compare.csv").read_bytes() == (tmp_path / "serial" / "compare.csv").read_bytes()


def test_cli_ablation_adds_the_two_by_two_rows(tmp_path: Path, capsys) -> None:
    scenario = write_small(tmp_path)
    out = tmp_path / "out"
    assert main(["compare", str(scenario), "--strategies", "dpu", "--ablation", "--ratios", "0.05",
                 "--set", "rounds=2", "--out", str(out)]) == EXIT_OK
    assert "[10/10 rounds" in capsys.readouterr().out  # full and 4 DPU runs: dpu is one of the 2×2
    table = (out / "compare.md").read_text()
    for contender in ABLATION:
        assert f"| 0.05 | {contender.label} |" in table
    with open(out / "compare.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    accuracy = {label: [row["accuracy"] for row in read if row["strategy"] == label]
                for label in ["dpu", *(contender.label for contender in ABLATION)]}
    assert accuracy["dpu"] == accuracy["dpu[lambda=0.5,reinit=true]"]
    assert len({path.name for path in (out / "cells").iterdir()}) == 1 + 5


@pytest.mark.parametrize("stop", ["ctrl-c to the group", "sigterm to the parent"])
def test_ctrl_c_stops_the_worker_processes_and_keeps_finished_cells(tmp_path: Path, stop: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    scenario = write_small(tmp_path)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "testbed.cli", "compare", str(scenario), "--strategies", "dpu", "--ratios",
               "0.05", "--seeds", "40", "--jobs", "2", "--out", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (out / "cells").is_dir() or not any((out / "cells").glob("*.json")):
            assert process.poll() is None and time.monotonic() < deadline, "no cell finished"
            time.sleep(0.2)
        if stop == "ctrl-c to the group":
            os.killpg(process.pid, signal.SIGINT)
        else:  # `kill PID`: only the parent hears it, and must take its workers with it
            os.kill(process.pid, signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output
    assert "interrupted after" in output and "the finished cells are kept in" in output
    deadline = time.monotonic() + 30  # the workers go with it (the resource tracker as soon as it sees the pipe close)
    while (left := _processes_in_group(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == []
    kept = sorted((out / "cells").glob("*.json"))
    assert 0 < len(kept) < 2 * 40 and not list((out / "cells").glob("*.tmp"))
    for path in kept:
        assert len(yaml.safe_load(path.read_text())["rows"]) == SMALL["rounds"]


def _processes_in_group(group: int) -> list[str]:
    """Command lines of the live (not zombie) processes in process group `group`."""
    import os

    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                state, _, process_group = handle.read().rsplit(")", 1)[1].split()[:3]
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                command = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(process_group) == group and state != "Z":
            found.append(command)
    return found


@pytest.mark.parametrize("interrupted", ["writing", "renaming"])
def test_a_ctrl_c_while_a_cell_is_saved_leaves_no_half_cell(tmp_path: Path, monkeypatch, rows, interrupted) -> None:
    """The parent saves a finished cell while its workers run, so a Ctrl-C can land mid-save: the cell is then
    either whole or absent, never a .tmp left behind (a group Ctrl-C in CI once left one)."""
    import os

    from testbed.compare import CellStore

    store = CellStore(tmp_path, parse_scenario(SMALL))
    cell = [row for row in rows if row.strategy == "dpu" and row.ratio == 0.05]

    write_text = Path.write_text

    def half_written(path: Path, text: str, encoding: str | None = None) -> int:
        write_text(path, text[:len(text) // 2], encoding=encoding)
        raise KeyboardInterrupt

    def interrupt(*arguments: object) -> None:
        raise KeyboardInterrupt

    if interrupted == "writing":
        monkeypatch.setattr(Path, "write_text", half_written)
    else:
        monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        store.save("dpu", 0.05, 5, cell)
    monkeypatch.undo()
    assert list((tmp_path / "cells").iterdir()) == [] and store.load("dpu", 0.05, 5) is None
    store.save("dpu", 0.05, 5, cell)
    assert store.load("dpu", 0.05, 5) == cell and [path.name for path in (tmp_path / "cells").iterdir()] == [
        "dpu_k0.05_seed5.json"]
