"""Run results on disk: results.jsonl as it happens, summary.json and the resolved scenario at the end."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from testbed.core.scenario import Scenario


class ResultsWriter:
    """Owns a run's output folder; every device record is appended and flushed to disk at once."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self._records: Any = None

    def __enter__(self) -> ResultsWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._records = open(self.out_dir / "results.jsonl", "a", encoding="utf-8")
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._records is not None:
            self._records.close()
            self._records = None

    def write_scenario(self, scenario: Scenario) -> None:
        (self.out_dir / "scenario.yaml").write_text(scenario.to_yaml(), encoding="utf-8")

    def append_record(self, record: dict[str, Any]) -> None:
        """One device's outcome of one round, durable before this returns."""
        self._records.write(json.dumps(record, sort_keys=True) + "\n")
        self._records.flush()
        os.fsync(self._records.fileno())

    def write_summary(self, summary: dict[str, Any]) -> None:
        path = self.out_dir / "summary.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        os.replace(temporary, path)
