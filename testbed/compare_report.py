"""What a comparison's rows say: per strategy and ratio the paired differences with intervals, the table, CSV, plot."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from testbed.compare import DPU_STRATEGY, REFERENCE_STRATEGY, CompareError, CompareRow, parse_contender
from testbed.compare_stats import CONFIDENCE, INTERVAL_METHOD, PairedDifference, mean_band, paired_difference

# Mean accuracy difference to full updating over all rounds, MNIST MLP at k = 0.005, from the DPU
# reference implementation's README (see shared/PAPER.md).
PAPER_MNIST_MLP_K0005 = {"dpu": -0.17, "gcpu": -0.72, "rpu": -4.04, "pruning": -1.45}

SeriesBySeed = dict[int, dict[int, float]]
"""Accuracy in percent by seed, then round."""


@dataclass(frozen=True)
class CompareSummary:
    """A strategy at a ratio, over the update rounds (round ≥ 1) and seeds, against full updating and DPU.

    Full updating and the floors take no ratio: their one run per seed is summarised beside every ratio,
    where `versus_dpu` compares it with DPU at that ratio.
    """

    strategy: str
    ratio: float
    uses_ratio: bool
    mean_accuracy: float
    versus_full: PairedDifference | None
    """Paired difference to full updating in percentage points (None for full itself)."""
    versus_dpu: PairedDifference | None
    """Paired difference to DPU at this ratio in points (None for DPU itself, or when DPU was not run)."""
    mean_update_bytes: float
    index_bits_over_floor: float | None
    rounds: int
    seeds: int

    @property
    def mean_accuracy_difference_pp(self) -> float:
        """The paper's figure: mean accuracy difference to full updating, in percentage points."""
        return 0.0 if self.versus_full is None else self.versus_full.mean


def _series(rows: Sequence[CompareRow]) -> SeriesBySeed:
    series: SeriesBySeed = {}
    for row in rows:
        series.setdefault(row.seed, {})[row.round] = 100.0 * row.accuracy
    return series


def _ratios(rows: Sequence[CompareRow]) -> tuple[dict[str, bool], list[float]]:
    """Whether each strategy label takes a ratio, and the ratios to show (the one full ran at, if none does)."""
    uses_ratio = {label: parse_contender(label).uses_ratio for label in dict.fromkeys(row.strategy for row in rows)}
    return uses_ratio, (sorted({row.ratio for row in rows if uses_ratio[row.strategy]})
                        or sorted({row.ratio for row in rows}))


def _shown_at(rows: Sequence[CompareRow], label: str, ratio: float, uses_ratio: bool) -> list[CompareRow]:
    """The rows of `label` shown beside `ratio`: its own at that ratio, or all of a strategy that takes none."""
    return [row for row in rows if row.strategy == label and (row.ratio == ratio or not uses_ratio)]


def summarise(rows: Sequence[CompareRow]) -> list[CompareSummary]:
    """Per ratio: full updating, the floors, then every strategy at that ratio (update rounds only)."""
    update_rows = [row for row in rows if row.round >= 1]
    uses_ratio, ratios = _ratios(rows)
    if REFERENCE_STRATEGY not in uses_ratio:
        raise CompareError("the comparison needs the 'full' strategy as its reference")
    full = _series([row for row in update_rows if row.strategy == REFERENCE_STRATEGY])
    summaries: list[CompareSummary] = []
    for ratio in ratios:
        dpu = _series([row for row in update_rows if row.strategy == DPU_STRATEGY and row.ratio == ratio])
        for label in sorted(uses_ratio, key=lambda label: (label != REFERENCE_STRATEGY, uses_ratio[label], label)):
            chosen = _shown_at(update_rows, label, ratio, uses_ratio[label])
            if not chosen:
                continue
            series = _series(chosen)
            with_positions = [row for row in chosen if row.positions > 0]
            floor = sum(row.index_floor_bits for row in with_positions)
            summaries.append(CompareSummary(
                strategy=label, ratio=ratio, uses_ratio=uses_ratio[label],
                mean_accuracy=_mean([row.accuracy for row in chosen]),
                versus_full=None if label == REFERENCE_STRATEGY else paired_difference(series, full),
                versus_dpu=None if label == DPU_STRATEGY or not dpu else paired_difference(series, dpu),
                mean_update_bytes=_mean([row.update_bytes for row in chosen]),
                index_bits_over_floor=(sum(row.index_bits for row in with_positions) / floor) if floor > 0 else None,
                rounds=len({row.round for row in chosen}), seeds=len(series),
            ))
    return summaries


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def write_csv(rows: Sequence[CompareRow], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CompareRow.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def difference_cell(difference: PairedDifference | None) -> str:
    """``−0.13 [−0.75, +0.50] p 0.63 tie``: mean, interval, sign-flip p and the verdict in words."""
    if difference is None:
        return "—"
    if not difference.has_interval:
        return f"{difference.mean:+.2f} (1 seed: no interval)"
    return (f"{difference.mean:+.2f} [{difference.low:+.2f}, {difference.high:+.2f}] "
            f"p {difference.p_sign_flip:.3g} {difference.verdict}")


def interval_note() -> str:
    """How the table's intervals, p-values and verdicts are made (for the text above the table)."""
    return (f"Δ: per seed the mean over update rounds (round ≥ 1) of the accuracy difference in the same round, "
            f"in percentage points; then the mean over the n seeds with its {CONFIDENCE:.0%} interval "
            f"({INTERVAL_METHOD}: rounds of one seed are correlated, so seeds are the replicates) and the "
            "two-sided sign-flip p over seeds (exact up to 16 seeds). 'tie': the interval covers 0; "
            "'higher'/'lower': it lies above/below 0. Full updating and the floors (no-update, biases-only) "
            "take no ratio: the same runs appear beside every k, compared with DPU at that k.")


def markdown_table(summaries: Sequence[CompareSummary]) -> str:
    """The paper-style table: one line per strategy and ratio, each difference with its interval and n."""
    confidence = f"{CONFIDENCE:.0%}"
    lines = [
        f"| ratio k | strategy | mean acc | Δ vs full (pp) [{confidence} t-interval over n seeds] sign-flip p "
        f"| Δ vs dpu (pp) [{confidence} t-interval over n seeds] sign-flip p | n seeds "
        "| mean bytes/round | index bits / log2 C(I, kI) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        floor = "—" if s.index_bits_over_floor is None else f"{s.index_bits_over_floor:.3f}"
        ratio = f"{s.ratio:g}" if s.uses_ratio else "any"
        lines.append(f"| {ratio} | {s.strategy} | {s.mean_accuracy:.4f} | {difference_cell(s.versus_full)} "
                     f"| {difference_cell(s.versus_dpu)} | {s.seeds} | {s.mean_update_bytes:,.0f} | {floor} |")
    return "\n".join(lines)


def paper_reference_table() -> str:
    """The reference row for MNIST-MLP at k = 0.005 (a different data set and model than digits)."""
    cells = " | ".join(f"{name} {value:+.2f}" for name, value in PAPER_MNIST_MLP_K0005.items())
    return f"Paper (DPU reference README), MNIST MLP, k = 0.005, Δ acc vs full (pp): {cells}"


OFF_SCALE_MIN_DEFICIT = 0.10
"""A strategy whose mean accuracy is this far below full updating's (and 3× the median strategy's deficit) is
named below the plot instead of stretching its axis (pruning at small k collapses to chance)."""


def _off_scale(deficits: dict[str, float]) -> set[str]:
    """The labels whose deficit to full updating would flatten every other line of the plot."""
    if not deficits:
        return set()
    ordered = sorted(deficits.values())
    threshold = max(OFF_SCALE_MIN_DEFICIT, 3.0 * ordered[len(ordered) // 2])
    return {label for label, deficit in deficits.items() if deficit > threshold}


def plot_accuracy(rows: Sequence[CompareRow], path: Path) -> None:
    """Test accuracy per round, one panel per ratio: per strategy the mean over seeds and its 95% t band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    uses_ratio, ratios = _ratios(rows)
    figure, axes = plt.subplots(1, len(ratios), figsize=(5 * len(ratios), 4), squeeze=False)
    palette = plt.get_cmap("tab20").colors  # dark and light pairs: the ten dark ones first
    colours = [*palette[0::2], *palette[1::2]]
    handles: dict[str, Any] = {}
    for axis, ratio in zip(axes[0], ratios):
        shown_lows: list[float] = []
        bands = {}
        for label in uses_ratio:
            series = _series(_shown_at(rows, label, ratio, uses_ratio[label]))
            rounds = sorted({r for by_round in series.values() for r in by_round})
            bands[label] = (rounds, [mean_band([by_round[r] / 100.0 for by_round in series.values() if r in by_round])
                                     for r in rounds])
        full_mean = _mean([band[0] for band in bands[REFERENCE_STRATEGY][1]])
        off_scale = _off_scale({label: full_mean - _mean([band[0] for band in label_bands])
                                for label, (_, label_bands) in bands.items() if label != REFERENCE_STRATEGY})
        for number, (label, (rounds, label_bands)) in enumerate(bands.items()):
            if label in off_scale:
                continue
            style = "--" if label == REFERENCE_STRATEGY else (":" if not uses_ratio[label] else "-")
            colour = colours[number % len(colours)]
            (handles[label],) = axis.plot(rounds, [band[0] for band in label_bands], marker="o", markersize=3,
                                          label=label, linestyle=style, color=colour)
            axis.fill_between(rounds, [band[1] for band in label_bands], [band[2] for band in label_bands],
                              color=colour, alpha=0.12, linewidth=0)
            shown_lows += [band[1] for band in label_bands]
        if off_scale:
            below = "".join(f"\n{label}: mean acc {_mean([band[0] for r, band in zip(*bands[label]) if r >= 1]):.3f}"
                            for label in sorted(off_scale))
            axis.text(0.99, 0.02, f"not drawn, far below:{below}", transform=axis.transAxes, fontsize=7,
                      ha="right", va="bottom")
        seeds = len({row.seed for row in rows})
        axis.set_title(f"k = {ratio:g}" + (f" (mean and {CONFIDENCE:.0%} t band over {seeds} seeds)"
                                           if seeds > 1 else " (1 seed)"), fontsize=9)
        axis.set_xlabel("round")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=min(shown_lows) - 0.1 * (1.0 - min(shown_lows)))  # room for the note
    axes[0][0].set_ylabel("test accuracy")
    figure.tight_layout()
    ordered = [label for label in uses_ratio if label in handles]  # every line of any panel, in the table's order
    axes[0][-1].legend([handles[label] for label in ordered], ordered, loc="upper left", bbox_to_anchor=(1.02, 1.0),
                       fontsize=7)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_report(rows: Sequence[CompareRow], out_dir: Path, title: str) -> list[CompareSummary]:
    """compare.csv, compare.md and compare.png in `out_dir`; returns the summary lines."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = summarise(rows)
    write_csv(rows, out_dir / "compare.csv")
    (out_dir / "compare.md").write_text(
        f"# {title}\n\n{interval_note()}\n\n{markdown_table(summaries)}\n\n{paper_reference_table()}\n",
        encoding="utf-8")
    plot_accuracy(rows, out_dir / "compare.png")
    return summaries
