"""Server-only comparison of update strategies and ratios: same data, same seeds, paper-style table."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from server.update_server import RoundOutcome, UpdateServer
from testbed.core.codecs import index_floor_bits
from testbed.core.plugins import STRATEGIES
from testbed.core.scenario import Scenario, ScenarioError, parse_scenario
from testbed.core.wire import decode_update, update_sizes

REFERENCE_STRATEGY = "full"

# Mean accuracy difference to full updating over all rounds, MNIST MLP at k = 0.005, from the DPU
# reference implementation's README (see shared/PAPER.md).
PAPER_MNIST_MLP_K0005 = {"dpu": -0.17, "gcpu": -0.72, "rpu": -4.04, "pruning": -1.45}


@dataclass(frozen=True)
class CompareRow:
    """One round of one strategy at one ratio and seed."""

    strategy: str
    ratio: float
    seed: int
    round: int
    accuracy: float
    sent: bool
    update_bytes: int
    positions: int
    partial_weights: int
    index_bits: int
    value_bits: int
    index_floor_bits: float


@dataclass(frozen=True)
class CompareSummary:
    """A strategy at a ratio, over all update rounds (round ≥ 1) and seeds."""

    strategy: str
    ratio: float
    mean_accuracy: float
    mean_accuracy_difference_pp: float
    mean_update_bytes: float
    index_bits_over_floor: float | None
    rounds: int
    seeds: int


ProgressCallback = Callable[[str, float, int, RoundOutcome], None]
"""Called after every round: strategy, ratio, seed, the round's outcome."""


def variant(scenario: Scenario, strategy: str, ratio: float, seed: int) -> Scenario:
    """The scenario with one strategy, ratio and seed; validated like `--set`.

    Strategy settings in the scenario (``lambda``, ``reinit``, …) go to each strategy that declares
    them; the others run with their own defaults.
    """
    raw = scenario.model_dump(mode="json", by_alias=True, exclude_none=True)
    takes = STRATEGIES.attributes(strategy).get("settings") or ()
    for key in scenario.update.settings:
        if key not in takes:
            del raw["update"][key]
    return parse_scenario(raw, f"{scenario.name}[{strategy}@{ratio}]",
                          [f"update.strategy={strategy}", f"update.ratio={ratio}", f"seed={seed}"])


def rows_from_outcome(strategy: str, ratio: float, seed: int, outcome: RoundOutcome) -> CompareRow:
    """Accuracy and the exact bit accounting of one round's encoded payload."""
    if not outcome.sent:
        return CompareRow(strategy, ratio, seed, outcome.round_index, outcome.server_accuracy, False,
                          0, 0, outcome.partial_count, 0, 0, 0.0)
    sizes = update_sizes(outcome.payload)
    header = decode_update(outcome.payload).header
    return CompareRow(
        strategy=strategy, ratio=ratio, seed=seed, round=outcome.round_index,
        accuracy=outcome.server_accuracy, sent=True, update_bytes=sizes.total_bytes,
        positions=header.k, partial_weights=header.n, index_bits=sizes.index_bits,
        value_bits=sizes.value_bits, index_floor_bits=index_floor_bits(header.n, header.k),
    )


def runs_needed(strategies: Sequence[str], ratios: Sequence[float], seeds: Sequence[int]) -> int:
    """How many server runs a comparison makes (full once per seed)."""
    per_seed = sum(1 if strategy == REFERENCE_STRATEGY else len(ratios) for strategy in strategies)
    return per_seed * len(seeds)


class CompareError(ScenarioError):
    """A comparison that cannot go on as asked (an --out folder holding another comparison's cells)."""


class CellStore:
    """Finished (strategy, ratio, seed) cells of a comparison, one JSON file each under `<out>/cells/`.

    A cell is written atomically as soon as its rounds are done, so an interrupted comparison keeps
    them, and a re-run with the same --out takes them instead of training again. Each cell names the
    scenario it was run with (a hash of the resolved scenario, seed aside): cells of another scenario are
    refused, not mixed in.
    """

    def __init__(self, out_dir: Path, scenario: Scenario) -> None:
        self.folder = Path(out_dir) / "cells"
        raw = scenario.model_dump(mode="json", by_alias=True, exclude_none=True)
        raw.pop("seed", None)
        raw["update"] = {key: value for key, value in raw.get("update", {}).items() if key not in ("strategy", "ratio")}
        self.scenario_hash = hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]

    def _path(self, strategy: str, ratio: float, seed: int) -> Path:
        return self.folder / f"{strategy}_k{ratio:g}_seed{seed}.json"

    def load(self, strategy: str, ratio: float, seed: int) -> list[CompareRow] | None:
        """The rows of a finished cell, or None if it was not run (or not finished)."""
        path = self._path(strategy, ratio, seed)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            raise CompareError(f"{path}: not a finished comparison cell ({error}); remove it to run it again") from None
        if data.get("scenario") != self.scenario_hash:
            raise CompareError(f"{path.parent.parent} holds cells of another scenario (or other settings); "
                               "choose another --out, or remove its cells/ folder")
        return [CompareRow(**row) for row in data["rows"]]

    def save(self, strategy: str, ratio: float, seed: int, rows: Sequence[CompareRow]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(strategy, ratio, seed)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"scenario": self.scenario_hash, "rows": [asdict(row) for row in rows]}),
                             encoding="utf-8")
        os.replace(temporary, path)


SkipCallback = Callable[[str, float, int, int], None]
"""Called for a cell taken from the store: strategy, ratio, seed, its rounds."""


def run_comparison(scenario: Scenario, strategies: Sequence[str], ratios: Sequence[float], seeds: Sequence[int],
                   progress: ProgressCallback | None = None, store: CellStore | None = None,
                   skipped: SkipCallback | None = None) -> list[CompareRow]:
    """Every strategy × ratio × seed on the server only; `full` runs once per seed (it ignores the ratio).

    With a `store`, finished cells are taken from it and each new cell is saved as it finishes.
    """
    rows: list[CompareRow] = []
    for seed in seeds:
        for strategy in strategies:
            for ratio in ([ratios[0]] if strategy == REFERENCE_STRATEGY else ratios):
                stored = None if store is None else store.load(strategy, ratio, seed)
                if stored is not None:
                    rows += stored
                    if skipped is not None:
                        skipped(strategy, ratio, seed, len(stored))
                    continue
                server = UpdateServer(variant(scenario, strategy, ratio, seed))
                cell: list[CompareRow] = []

                def record(outcome: RoundOutcome, strategy: str = strategy, ratio: float = ratio,
                           seed: int = seed, cell: list[CompareRow] = cell) -> None:
                    cell.append(rows_from_outcome(strategy, ratio, seed, outcome))
                    if progress is not None:
                        progress(strategy, ratio, seed, outcome)

                server.run_all(record)
                rows += cell
                if store is not None:
                    store.save(strategy, ratio, seed, cell)
    return rows


def summarise(rows: Sequence[CompareRow]) -> list[CompareSummary]:
    """The paper's figure: mean accuracy difference to full updating over the update rounds (round ≥ 1)."""
    reference = {(row.seed, row.round): row.accuracy for row in rows if row.strategy == REFERENCE_STRATEGY}
    if not reference:
        raise ScenarioError("the comparison needs the 'full' strategy as its reference")
    summaries: list[CompareSummary] = []
    for strategy, ratio in dict.fromkeys((row.strategy, row.ratio) for row in rows):
        chosen = [row for row in rows if row.strategy == strategy and row.ratio == ratio and row.round >= 1]
        with_positions = [row for row in chosen if row.positions > 0]
        floor = sum(row.index_floor_bits for row in with_positions)
        summaries.append(CompareSummary(
            strategy=strategy, ratio=ratio,
            mean_accuracy=_mean([row.accuracy for row in chosen]),
            mean_accuracy_difference_pp=_mean(
                [100.0 * (row.accuracy - reference[(row.seed, row.round)]) for row in chosen]),
            mean_update_bytes=_mean([row.update_bytes for row in chosen]),
            index_bits_over_floor=(sum(row.index_bits for row in with_positions) / floor) if floor > 0 else None,
            rounds=len({row.round for row in chosen}), seeds=len({row.seed for row in chosen}),
        ))
    return sorted(summaries, key=lambda s: (s.strategy != REFERENCE_STRATEGY, s.ratio, s.strategy))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def write_csv(rows: Sequence[CompareRow], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CompareRow.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def markdown_table(summaries: Sequence[CompareSummary]) -> str:
    """The paper-style table: one line per strategy and ratio."""
    lines = [
        "| ratio k | strategy | mean acc | Δ acc vs full (pp) | mean bytes/round | index bits / log2 C(I, kI) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        floor = "—" if s.index_bits_over_floor is None else f"{s.index_bits_over_floor:.3f}"
        ratio = "any" if s.strategy == REFERENCE_STRATEGY else f"{s.ratio:g}"
        lines.append(f"| {ratio} | {s.strategy} | {s.mean_accuracy:.4f} | {s.mean_accuracy_difference_pp:+.2f} "
                     f"| {s.mean_update_bytes:,.0f} | {floor} |")
    return "\n".join(lines)


def paper_reference_table() -> str:
    """The reference row for MNIST-MLP at k = 0.005 (a different data set and model than digits)."""
    cells = " | ".join(f"{name} {value:+.2f}" for name, value in PAPER_MNIST_MLP_K0005.items())
    return f"Paper (DPU reference README), MNIST MLP, k = 0.005, Δ acc vs full (pp): {cells}"


def plot_accuracy(rows: Sequence[CompareRow], path: Path) -> None:
    """Accuracy vs round per strategy, one panel per ratio, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = sorted({row.ratio for row in rows if row.strategy != REFERENCE_STRATEGY}) or sorted({r.ratio for r in rows})
    figure, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 4), squeeze=False, sharey=True)
    for axis, ratio in zip(axes[0], ratios):
        for strategy in dict.fromkeys(row.strategy for row in rows):
            chosen = [row for row in rows if row.strategy == strategy
                      and (row.ratio == ratio or strategy == REFERENCE_STRATEGY)]
            rounds = sorted({row.round for row in chosen})
            means = [_mean([row.accuracy for row in chosen if row.round == r]) for r in rounds]
            axis.plot(rounds, means, marker="o", markersize=3, label=strategy,
                      linestyle="--" if strategy == REFERENCE_STRATEGY else "-")
        axis.set_title(f"k = {ratio:g}")
        axis.set_xlabel("round")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(rows: Sequence[CompareRow], out_dir: Path, title: str) -> list[CompareSummary]:
    """compare.csv, compare.md and compare.png in `out_dir`; returns the summary lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarise(rows)
    write_csv(rows, out_dir / "compare.csv")
    (out_dir / "compare.md").write_text(
        f"# {title}\n\nMean over update rounds (round ≥ 1) and seeds; Δ is the difference to full updating "
        f"in the same round and seed, in percentage points.\n\n{markdown_table(summaries)}\n\n"
        f"{paper_reference_table()}\n", encoding="utf-8")
    plot_accuracy(rows, out_dir / "compare.png")
    return summaries
