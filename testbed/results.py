"""Run results on disk: results.jsonl as it happens, summary.json and the resolved scenario at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from testbed.core.scenario import Scenario


class DurableJsonLines:
    """An append-only JSON-lines file: each record is written, flushed and fsynced before `append` returns,
    so a run killed at any moment leaves whole lines behind (at most the last one cut short)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def append(self, record: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path} is not open for appending")
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())


class ResultsWriter:
    """Owns a run's output folder; every device record is appended and flushed to disk at once."""

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
        """One device's outcome of one round, durable before this returns."""
        self._records.append(record)

    def write_summary(self, summary: dict[str, Any]) -> None:
        path = self.out_dir / "summary.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(temporary, path)
