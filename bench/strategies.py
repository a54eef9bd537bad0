"""Benchmark: strategies compared on digits next to the paper's MNIST-MLP row, with intervals over seeds."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from testbed.compare import ABLATION, default_jobs, parse_contenders, run_comparison
from testbed.compare_report import interval_note, markdown_table, paper_reference_table, write_report
from testbed.core.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", type=Path, default=REPO / "scenarios" / "compare-digits.yaml")
    parser.add_argument("--strategies", default="full,dpu,gcpu,lcpu,rpu,pruning,magnitude,no-update,biases-only")
    parser.add_argument("--ratios", default="0.005,0.01,0.05")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--jobs", type=int, default=default_jobs())
    parser.add_argument("--out", type=Path, default=Path("runs/bench-strategies"))
    args = parser.parse_args(argv)
    scenario = load_scenario(args.scenario)
    contenders = parse_contenders(args.strategies)
    contenders += [contender for contender in ABLATION if contender not in contenders]  # DPU's 2×2 ablation
    ratios = [float(text) for text in args.ratios.split(",")]
    seeds = [scenario.seed + offset for offset in range(args.seeds)]
    started = time.monotonic()
    rows = run_comparison(scenario, contenders, ratios, seeds,
                          lambda row: print(f"  {row.strategy:30s} k={row.ratio:<6g} seed {row.seed} round "
                                            f"{row.round:2d} acc {row.accuracy:.4f}", file=sys.stderr),
                          jobs=args.jobs)
    summaries = write_report(rows, args.out, f"{scenario.name}: strategies compared")
    print(f"# bench/strategies.py on {args.scenario.name}, {len(seeds)} seeds, {args.jobs} processes, "
          f"{time.monotonic() - started:.0f} s")
    print(f"# rerun: python bench/strategies.py --seeds {args.seeds} --ratios {args.ratios}")
    print(interval_note())
    print()
    print(markdown_table(summaries))
    print()
    print(paper_reference_table())
    print()
    print("Index coding vs the floor log2 C(I, k·I), per ratio (DPU updates, all rounds and seeds):")
    for summary in summaries:
        if summary.strategy == "dpu" and summary.index_bits_over_floor is not None:
            print(f"  k = {summary.ratio:g}: index bits / floor = {summary.index_bits_over_floor:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
