"""results.jsonl with group commit: whole lines after a kill, a few fsyncs for a burst, all synced on close."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.results import DurableJsonLines


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_burst_of_appends_costs_a_few_fsyncs_and_close_syncs_the_rest(tmp_path: Path) -> None:
    log = DurableJsonLines(tmp_path / "results.jsonl", fsync_interval_s=0.1)
    log.open()
    started = time.monotonic()
    for index in range(2000):
        log.append({"device": f"rpi4-{index}", "round": 0})
    elapsed = time.monotonic() - started
    log.close()
    # one sync at the first append, at most one per interval while the burst lasts, one on close
    assert 2 <= log.syncs <= 2 + math.ceil(elapsed / 0.1) + 1, (log.syncs, elapsed)
    assert [record["device"] for record in _lines(log.path)] == [f"rpi4-{index}" for index in range(2000)]


def test_an_append_after_a_quiet_spell_syncs_at_once_and_a_second_one_within_the_interval(tmp_path: Path) -> None:
    log = DurableJsonLines(tmp_path / "events.jsonl", fsync_interval_s=0.1)
    log.open()
    try:
        log.append({"n": 1})
        assert log.syncs == 1  # nothing synced recently: this one is synced before append returns
        log.append({"n": 2})
        deadline = time.monotonic() + 10.0  # the timer is due in 0.1 s; 10 s only bounds a hang
        while log.syncs < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log.syncs == 2, "the deferred fsync never ran"
    finally:
        log.close()
    assert log.syncs == 3  # close syncs once more (cheap) and the file holds both lines
    assert _lines(log.path) == [{"n": 1}, {"n": 2}]


def test_appending_to_a_closed_log_is_a_clear_error(tmp_path: Path) -> None:
    log = DurableJsonLines(tmp_path / "results.jsonl")
    with pytest.raises(RuntimeError, match="results.jsonl is not open for appending"):
        log.append({"n": 1})


WRITER = """
import sys, itertools
from pathlib import Path
from testbed.results import DurableJsonLines
log = DurableJsonLines(Path(sys.argv[1]))
log.open()
for index in itertools.count():
    log.append({"index": index, "padding": "x" * 300})
"""


def test_sigkill_leaves_whole_lines_behind(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        deadline = time.monotonic() + 30.0
        while (not path.exists() or path.stat().st_size < 200_000) and time.monotonic() < deadline:
            assert writer.poll() is None, "the writer died on its own"
            time.sleep(0.02)
        assert path.exists() and path.stat().st_size >= 200_000, "the writer wrote too little in 30 s"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=10)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines[:-1]]  # the last line may be cut short, no other
    assert [record["index"] for record in records] == list(range(len(records)))
    assert len(records) > 300
