"""Run results on disk: results.jsonl as it happens, summary.json and the resolved scenario at the end."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from testbed.core.scenario import Scenario


class DurableJsonLines:
    """An append-only JSON-lines file with group commit.

    Each record is written and flushed to the kernel before `append` returns, so a process killed at any
    moment (SIGKILL included) leaves whole lines behind, at most the last one cut short. fsync, which only
    matters if the host itself goes down, runs at most once per `fsync_interval_s`: an append after a quiet
    spell syncs at once, appends in a burst are synced together by one timer (a thousand devices reporting
    in a round cost a few fsyncs, not a thousand), and `close` syncs what is left.
    """

    def __init__(self, path: Path, fsync_interval_s: float = 0.1) -> None:
        self.path = Path(path)
        self.fsync_interval_s = fsync_interval_s
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._last_sync = -math.inf
        self._timer: threading.Timer | None = None
        self.syncs = 0  # fsyncs done, for tests and benchmarks

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._file is not None:
                self._file.flush()
                self._sync_locked()
                self._file.close()
                self._file = None

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            if self._file is None:
                raise RuntimeError(f"{self.path} is not open for appending")
            self._file.write(line)
            self._file.flush()
            wait = self._last_sync + self.fsync_interval_s - time.monotonic()
            if wait <= 0:
                self._sync_locked()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._sync_pending)
                self._timer.daemon = True
                self._timer.start()

    def _sync_pending(self) -> None:
        with self._lock:
            self._timer = None
            if self._file is not None:
                self._sync_locked()

    def _sync_locked(self) -> None:
        assert self._file is not None
        os.fsync(self._file.fileno())
        self._last_sync = time.monotonic()
        self.syncs += 1


def keep_records_before(path: Path, next_round: int) -> int:
    """Cut results.jsonl back to the records of rounds before `next_round` (a resumed run redoes the rest), dropping a
    line a kill cut short; rewritten atomically. The number of records kept."""
    return len(keep_json_lines(path, lambda record: isinstance(record.get("round"), int)
                                                    and record["round"] < next_round))


def keep_json_lines(path: Path, keep: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    """Rewrite a JSON-lines file atomically with only the records `keep` accepts (a line a kill cut short, or one
    that is not an object, is dropped); the records kept (none when there is no file)."""
    path = Path(path)
    if not path.exists():
        return []
    kept: list[dict[str, Any]] = []
    lines: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line of a killed run, cut short
        if isinstance(record, dict) and keep(record):
            kept.append(record)
            lines.append(line + "\n")
    temporary = path.with_suffix(".jsonl.tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        file.writelines(lines)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return kept


class ResultsWriter:
    """Owns a run's output folder; every device record is appended and flushed to the kernel at once."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._records = DurableJsonLines(self.out_dir / "results.jsonl")

    def __enter__(self) -> ResultsWriter:
        self._records.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._records.close()

    def write_scenario(self, scenario: Scenario) -> None:
        (self.out_dir / "scenario.yaml").write_text(scenario.to_yaml(), encoding="utf-8")

    def append_record(self, record: dict[str, Any]) -> None:
        """One device's outcome of one round: survives a kill once this returns, fsynced within ~100 ms."""
        self._records.append(record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        path = self.out_dir / "summary.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(temporary, path)
