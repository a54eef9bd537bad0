"""`testbed compare`: server-only strategy comparison, its table, CSV, plot and CLI errors."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from testbed.cli import EXIT_BAD_SCENARIO, EXIT_OK, main
from testbed.compare import CompareRow, markdown_table, run_comparison, summarise, write_report
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
    # Round 0 is the same full deployment for every strategy: same data, same seed.
    assert len({row.accuracy for row in rows if row.round == 0}) == 1


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
    assert summaries[("full", 0.05)].mean_accuracy_difference_pp == 0.0
    full = {row.round: row.accuracy for row in rows if row.strategy == "full"}
    chosen = [row for row in rows if row.strategy == "dpu" and row.ratio == 0.1 and row.round >= 1]
    expected = sum(100 * (row.accuracy - full[row.round]) for row in chosen) / len(chosen)
    assert summaries[("dpu", 0.1)].mean_accuracy_difference_pp == pytest.approx(expected)
    assert summaries[("dpu", 0.1)].rounds == 2


def test_same_seed_gives_the_same_comparison(rows: list[CompareRow]) -> None:
    again = run_comparison(parse_scenario(SMALL), ["full", "dpu", "rpu", "magnitude"], [0.05, 0.1], [5])
    assert again == rows


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


def test_cli_compare_writes_its_files(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    import yaml

    scenario.write_text(yaml.safe_dump(SMALL))
    code = main(["compare", str(scenario), "--strategies", "dpu,magnitude", "--ratios", "0.05",
                 "--set", "rounds=2", "--out", str(tmp_path / "out")])
    assert code == EXIT_OK
    assert {path.name for path in (tmp_path / "out").iterdir()} == {"compare.csv", "compare.md", "compare.png",
                                                                     "cells"}
    assert "| any | full |" in (tmp_path / "out" / "compare.md").read_text()  # full is added as the reference


def test_cli_compare_shows_progress_keeps_cells_and_a_rerun_skips_them(tmp_path: Path, capsys, monkeypatch) -> None:
    import yaml

    from testbed import compare

    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(SMALL))
    arguments = ["compare", str(scenario), "--strategies", "dpu", "--ratios", "0.05", "--set", "rounds=2",
                 "--out", str(tmp_path / "out")]
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
])
def test_cli_compare_rejects_bad_arguments(arguments: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    scenario = tmp_path / "s.yaml"
    import yaml

    scenario.write_text(yaml.safe_dump(SMALL))
    out = tmp_path / "out"
    assert main(["compare", str(scenario), "--out", str(out), *arguments]) == EXIT_BAD_SCENARIO
    assert message in capsys.readouterr().out.replace("\n", " ")
    assert not out.exists()
