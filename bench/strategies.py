"""Benchmark: strategies compared on digits next to the paper's MNIST-MLP row, and index bits vs the floor."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from testbed.compare import (
    markdown_table,
    paper_reference_table,
    run_comparison,
    summarise,
    write_report,
)
from testbed.core.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "compare-digits.yaml")
    parser.add_argument("--strategies", default="full,dpu,gcpu,lcpu,rpu,pruning,magnitude")
    parser.add_argument("--ratios", default="0.005,0.01,0.05")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-strategies"))
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    strategies = args.strategies.split(",")
    ratios = [float(text) for text in args.ratios.split(",")]
    seeds = [scenario.seed + offset for offset in range(args.seeds)]
    started = time.monotonic()
    rows = run_comparison(scenario, strategies, ratios, seeds,
                          lambda strategy, ratio, seed, outcome: print(
                              f"  {strategy:9s} k={ratio:<6g} seed {seed} round {outcome.round_index:2d} "
                              f"acc {outcome.server_accuracy:.4f}", file=sys.stderr))
    summaries = write_report(rows, args.out, f"{scenario.name}: strategies compared")
    # DPU with the paper's re-initialisation rule, against the same full-updating reference.
    reinit_scenario = load_scenario(args.scenario, ["update.reinit=true"])
    reinit_rows = run_comparison(reinit_scenario, ["full", "dpu"], ratios, seeds)
    reinit_summaries = [s for s in summarise(reinit_rows) if s.strategy == "dpu"]
    print(f"# bench/strategies.py on {args.scenario.name}, {len(seeds)} seeds, "
          f"{time.monotonic() - started:.0f} s")
    print(f"# rerun: python bench/strategies.py --seeds {args.seeds} --ratios {args.ratios}")
    print(markdown_table(summaries))
    print()
    print("DPU with re-initialisation on (update.reinit=true), same seeds:")
    print(markdown_table(reinit_summaries))
    print()
    print(paper_reference_table())
    print()
    print("Index coding vs the floor log2 C(I, k·I), per ratio (DPU updates, all rounds and seeds):")
    for summary in summarise(rows):
        if summary.strategy == "dpu" and summary.index_bits_over_floor is not None:
            print(f"  k = {summary.ratio:g}: index bits / floor = {summary.index_bits_over_floor:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
