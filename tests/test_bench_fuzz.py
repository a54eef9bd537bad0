"""bench/fuzz.py --quick: every target sees rejections and acceptances and raises nothing but its documented errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from testbed.core.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"wire", "codecs", "manifest", "receiver", "topics", "serial-frames", "serial-payloads", "serial-link",
           "messages"}


def load_fuzz(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/fuzz.py as a module (bench/ is not a package); registered while the test runs, as dataclasses need."""
    spec = importlib.util.spec_from_file_location("bench_fuzz", ROOT / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_quick_fuzz_meets_only_documented_errors(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    done = subprocess.run([sys.executable, "bench/fuzz.py", "--quick", "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "# rerun: python bench/fuzz.py --seed 1 --quick" in done.stdout
    assert "other exceptions: 0 (target 0) -> met" in done.stdout
    rows = {row["target"]: row for row in json.loads(out.read_text())["targets"]}
    assert set(rows) == TARGETS
    assert sum(row["inputs"] for row in rows.values()) == 3000
    for name, row in rows.items():
        assert row["other"] == 0, (name, row["failures"])
        assert row["rejected"] + row["accepted"] + row["ignored"] == row["inputs"], row
        # Both outcomes seen, with a margin: a target whose inputs all bounce (or all pass) tests nothing deep.
        assert row["rejected"] >= 0.02 * row["inputs"] and row["accepted"] >= 0.02 * row["inputs"], row
        assert row["rss_peak_mib"] >= row["rss_start_mib"] > 0 and row["slowest_s"] > 0


@pytest.mark.timeout(120)
def test_an_undocumented_exception_fails_the_run(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The int() digit limit of issue 11 put back into the topic parser: the benchmark finds it and exits non-zero."""
    fuzz = load_fuzz(monkeypatch)
    parse = Topics.parse_update_chunk

    def unbounded(self: Topics, topic: str) -> tuple[str, int] | None:
        if topic.startswith(self.prefix + "update/"):
            int(topic.rsplit("/", 1)[1])  # ValueError past 4,300 digits, or for anything not a number
        return parse(self, topic)

    monkeypatch.setattr(Topics, "parse_update_chunk", unbounded)
    assert fuzz.main(["--targets", "topics", "--inputs", "400", "--jobs", "1"]) == 1  # the worker is forked: patched
    output = capsys.readouterr().out
    assert "FAILURE topics" in output and "ValueError" in output and "MISSED" in output
    assert "| topics | 400 |" in output
