"""Server-only comparison of update strategies and ratios: the grid of runs and their cells, serial or in processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from server.update_server import RoundOutcome, UpdateServer
from testbed.core.codecs import index_floor_bits
from testbed.core.plugins import STRATEGIES
from testbed.core.scenario import Scenario, ScenarioError, parse_scenario
from testbed.core.wire import decode_update, update_sizes

REFERENCE_STRATEGY = "full"
DPU_STRATEGY = "dpu"
PROGRESS_POLL_S = 0.2
"""How often the parent looks at its worker processes while no round finishes."""
PROGRESS_DRAIN_TIMEOUT_S = 30.0
"""How long the parent waits for a finished cell's last progress messages before it stops showing them."""


class CompareError(ScenarioError):
    """A comparison that cannot go on as asked (a bad --strategies entry, an --out folder of another comparison)."""


@dataclass(frozen=True)
class CompareRow:
    """One round of one strategy at one ratio and seed."""

    strategy: str
    ratio: float
    seed: int
    round: int
    accuracy: float
    best_deployed_accuracy: float
    """The reference's report: test accuracy of the best-validated version so far (RoundOutcome)."""
    sent: bool
    update_bytes: int
    positions: int
    partial_weights: int
    index_bits: int
    value_bits: int
    index_floor_bits: float


@dataclass(frozen=True)
class Contender:
    """One row of a comparison: a registered strategy, with settings of its own for an ablation.

    Written ``dpu`` or ``dpu[lambda=1,reinit=false]``; the settings override the scenario's ``update.<key>``.
    """

    strategy: str
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        """How the contender is written, in the table, compare.csv and the cell file names."""
        if not self.settings:
            return self.strategy
        return f"{self.strategy}[{','.join(f'{key}={value}' for key, value in self.settings)}]"

    @property
    def uses_ratio(self) -> bool:
        """False for full updating and the floors: run once per seed, shown beside every ratio."""
        return self.strategy != REFERENCE_STRATEGY and STRATEGIES.attributes(self.strategy).get("uses_ratio", True)


ABLATION = tuple(Contender(DPU_STRATEGY, (("lambda", lam), ("reinit", reinit)))
                 for lam in ("0.5", "1") for reinit in ("true", "false"))
"""The 2×2 ablation of `--ablation`: λ ∈ {0.5, 1} × re-initialisation on/off."""


def parse_contender(text: str) -> Contender:
    """``name`` or ``name[key=value,…]`` → a Contender of a registered strategy; else a CompareError saying why."""
    text = text.strip()
    name, bracket, rest = text.partition("[")
    name = name.strip()
    if name not in STRATEGIES.names():
        raise CompareError(f"unknown {name or repr(text)}; choose from {', '.join(STRATEGIES.names())}")
    if not bracket:
        return Contender(name)
    if not rest.endswith("]"):
        raise CompareError(f"{text!r}: settings are written name[key=value,...], with a closing ]")
    settings = []
    for assignment in rest[:-1].split(","):
        key, equals, value = (part.strip() for part in assignment.partition("="))
        if not equals or not key or not value:
            raise CompareError(f"{text!r}: {assignment.strip()!r} is not key=value")
        settings.append((key, value))
    return Contender(name, tuple(settings))


def parse_contenders(text: str) -> list[Contender]:
    """A comma-separated list of contenders (commas inside [...] separate settings), duplicates dropped."""
    entries, depth, start = [], 0, 0
    for position, character in enumerate(text + ","):
        depth += {"[": 1, "]": -1}.get(character, 0)
        if character == "," and depth == 0:
            entries.append(text[start:position])
            start = position + 1
    if depth != 0:  # an unclosed [: the rest is one entry, refused by parse_contender
        entries.append(text[start:])
    contenders = [parse_contender(entry) for entry in entries if entry.strip()]
    if not contenders:
        raise CompareError(f"no strategy in {text!r}")
    return list(dict.fromkeys(contenders))


def variant(scenario: Scenario, contender: Contender | str, ratio: float, seed: int) -> Scenario:
    """The scenario with one contender, ratio and seed; validated like `--set`.

    Strategy settings in the scenario (``lambda``, ``reinit``, …) go to each strategy that declares
    them, the others run with their own defaults; a contender's own settings override them.
    """
    contender = contender if isinstance(contender, Contender) else Contender(contender)
    raw = scenario.model_dump(mode="json", by_alias=True, exclude_none=True)
    takes = STRATEGIES.attributes(contender.strategy).get("settings") or ()
    for key in scenario.update.settings:
        if key not in takes:
            del raw["update"][key]
    return parse_scenario(raw, f"{scenario.name}[{contender.label}@{ratio}]",
                          [f"update.strategy={contender.strategy}", f"update.ratio={ratio}", f"seed={seed}",
                           *(f"update.{key}={value}" for key, value in contender.settings)])


def check_contenders(scenario: Scenario, contenders: Sequence[Contender], ratio: float) -> None:
    """Every contender's settings are ones its strategy takes, with valid values; else one CompareError."""
    from server.errors import ServerError
    from server.strategies import make_strategy

    for contender in contenders:
        try:
            make_strategy(variant(scenario, contender, ratio, scenario.seed).update)
        except (ScenarioError, ServerError) as error:
            raise CompareError(f"{contender.label}: {' '.join(str(error).split())}") from None


@dataclass(frozen=True)
class PlannedRun:
    """One server run of the grid, and every label whose rows it gives (ablation rows equal to a named one)."""

    contender: Contender
    ratio: float
    seed: int
    labels: tuple[str, ...]


def plan_runs(scenario: Scenario, contenders: Sequence[Contender], ratios: Sequence[float],
              seeds: Sequence[int]) -> list[PlannedRun]:
    """Seed by seed, contender by contender, ratio by ratio; full and the floors once per seed (at the first
    ratio); contenders whose resolved scenarios are the same run once."""
    runs: dict[str, PlannedRun] = {}
    for seed in seeds:
        for contender in contenders:
            for ratio in (ratios if contender.uses_ratio else ratios[:1]):
                key = _run_key(variant(scenario, contender, ratio, seed))
                first = runs.get(key)
                runs[key] = (PlannedRun(contender, ratio, seed, (contender.label,)) if first is None
                             else replace(first, labels=(*first.labels, contender.label)))
    return list(runs.values())


def _run_key(resolved: Scenario) -> str:
    """What a run depends on: the resolved scenario, its strategy's settings with their defaults filled in."""
    from server.strategies import make_strategy

    raw = resolved.model_dump(mode="json", by_alias=True, exclude={"name"})
    for key in resolved.update.settings:
        del raw["update"][key]
    raw["update"]["settings"] = make_strategy(resolved.update).settings.model_dump(mode="json", by_alias=True)
    return json.dumps(raw, sort_keys=True)


def runs_needed(scenario: Scenario, contenders: Sequence[Contender], ratios: Sequence[float],
                seeds: Sequence[int]) -> int:
    """How many server runs a comparison makes."""
    return len(plan_runs(scenario, contenders, ratios, seeds))


def rows_from_outcome(strategy: str, ratio: float, seed: int, outcome: RoundOutcome) -> CompareRow:
    """Accuracy and the exact bit accounting of one round's encoded payload."""
    if not outcome.sent:
        return CompareRow(strategy, ratio, seed, outcome.round_index, outcome.server_accuracy,
                          outcome.best_deployed_accuracy, False, 0, 0, outcome.partial_count, 0, 0, 0.0)
    sizes = update_sizes(outcome.payload)
    header = decode_update(outcome.payload).header
    return CompareRow(
        strategy=strategy, ratio=ratio, seed=seed, round=outcome.round_index,
        accuracy=outcome.server_accuracy, best_deployed_accuracy=outcome.best_deployed_accuracy, sent=True,
        update_bytes=sizes.total_bytes,
        positions=header.k, partial_weights=header.n, index_bits=sizes.index_bits,
        value_bits=sizes.value_bits, index_floor_bits=index_floor_bits(header.n, header.k),
    )


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
        try:
            temporary.write_text(json.dumps({"scenario": self.scenario_hash, "rows": [asdict(row) for row in rows]}),
                                 encoding="utf-8")
            os.replace(temporary, path)
        except BaseException:  # a Ctrl-C mid-write (the parent saves while its workers run) leaves no half cell
            temporary.unlink(missing_ok=True)
            raise


ProgressCallback = Callable[[CompareRow], None]
"""Called after every round trained: the round's row."""
SkipCallback = Callable[[str, float, int, int], None]
"""Called for a cell taken from the store: strategy, ratio, seed, its rounds."""


def run_cell(scenario: Scenario, run: PlannedRun, on_round: ProgressCallback | None = None) -> list[CompareRow]:
    """One server run of the grid (rows labelled with the run's first label)."""
    server = UpdateServer(variant(scenario, run.contender, run.ratio, run.seed))
    rows: list[CompareRow] = []

    def record(outcome: RoundOutcome) -> None:
        rows.append(rows_from_outcome(run.labels[0], run.ratio, run.seed, outcome))
        if on_round is not None:
            on_round(rows[-1])

    server.run_all(record)
    return rows


def default_jobs() -> int:
    """One worker process per core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def run_comparison(scenario: Scenario, contenders: Sequence[Contender | str], ratios: Sequence[float],
                   seeds: Sequence[int], progress: ProgressCallback | None = None, store: CellStore | None = None,
                   skipped: SkipCallback | None = None, jobs: int = 1) -> list[CompareRow]:
    """Every contender × ratio × seed on the server only; full and the floors once per seed (they take no ratio).

    With a `store`, finished cells are taken from it and each new cell is saved as it finishes. With
    `jobs` > 1 the runs go to that many worker processes; the rows (in plan order) are the same.
    """
    chosen = [entry if isinstance(entry, Contender) else parse_contender(entry) for entry in contenders]
    plan = plan_runs(scenario, chosen, ratios, seeds)
    rows_of: dict[PlannedRun, list[CompareRow]] = {}

    def finish(run: PlannedRun, rows: list[CompareRow]) -> None:
        rows_of[run] = rows
        if store is not None:
            for label in run.labels:
                store.save(label, run.ratio, run.seed, [replace(row, strategy=label) for row in rows])

    pending = []
    for run in plan:
        stored = None if store is None else next(
            (rows for label in run.labels if (rows := store.load(label, run.ratio, run.seed)) is not None), None)
        if stored is None:
            pending.append(run)
            continue
        finish(run, [replace(row, strategy=run.labels[0]) for row in stored])
        if skipped is not None:
            skipped(run.labels[0], run.ratio, run.seed, len(stored))
    workers = min(jobs, len(pending))
    if workers <= 1:
        for run in pending:
            finish(run, run_cell(scenario, run, progress))
    else:
        _run_in_processes(scenario, pending, workers, progress, finish)
    return [replace(row, strategy=label) for run in plan for label in run.labels for row in rows_of[run]]


_worker_progress: Any = None
"""In a worker process: the queue its rounds' rows go to (set by `_start_worker`)."""


def _start_worker(progress: Any, torch_threads: int) -> None:
    global _worker_progress
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it terminates the workers
    import torch

    _worker_progress = progress
    torch.set_num_threads(torch_threads)


def _run_in_worker(scenario: Scenario, run: PlannedRun) -> list[CompareRow]:
    return run_cell(scenario, run, _worker_progress.put)


def _run_in_processes(scenario: Scenario, pending: Sequence[PlannedRun], workers: int,
                      progress: ProgressCallback | None,
                      finish: Callable[[PlannedRun, list[CompareRow]], None]) -> None:
    """Run `pending` in `workers` spawned processes; rows of each round come back through a queue as they finish.

    On an error or Ctrl-C the workers are terminated; the cells finished by then are kept (`finish`).
    """
    context = multiprocessing.get_context("spawn")  # not fork: torch's thread pools do not survive a fork
    rounds_queue = context.Queue()
    pool = context.Pool(workers, initializer=_start_worker,
                        initargs=(rounds_queue, max(1, default_jobs() // workers)))
    expected = received = 0
    previous_sigterm = _interrupt_on_sigterm()
    try:
        running = {pool.apply_async(_run_in_worker, (scenario, run)): run for run in pending}
        while running:
            received += _show_rounds(rounds_queue, progress, PROGRESS_POLL_S)
            for result in [result for result in running if result.ready()]:
                rows = result.get()  # a worker's error is raised here
                finish(running.pop(result), rows)
                expected += len(rows)
        while received < expected:  # the last rounds' rows may still be on their way
            shown = _show_rounds(rounds_queue, progress, PROGRESS_DRAIN_TIMEOUT_S)
            if shown == 0:
                break
            received += shown
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _interrupt_on_sigterm() -> Any:
    """While workers run, SIGTERM (`kill PID`) interrupts like Ctrl-C, so the workers are terminated with their
    parent instead of running on alone; the previous handler, or None off the main thread (no handler set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _show_rounds(rounds_queue: Any, progress: ProgressCallback | None, wait_s: float) -> int:
    """Wait up to `wait_s` for a row, then pass it and every other queued row to `progress`; how many were passed."""
    passed = 0
    try:
        row = rounds_queue.get(timeout=wait_s)
        while True:
            if progress is not None:
                progress(row)
            passed += 1
            row = rounds_queue.get_nowait()
    except queue.Empty:
        return passed
