"""TESTBED_EVENT_LOOP picks the run's event loop: asyncio's by default, uvloop when asked for and installed."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from testbed import event_loop
from testbed.cli import EXIT_RUN_FAILED, main

ROOT = Path(__file__).resolve().parents[2]


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_unset_or_default_runs_on_asyncios_own_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(event_loop.EVENT_LOOP_VARIABLE, raising=False)
    assert event_loop.run(_loop_module()).startswith("asyncio")
    monkeypatch.setenv(event_loop.EVENT_LOOP_VARIABLE, "default")
    assert event_loop.run(_loop_module()).startswith("asyncio")


def test_uvloop_runs_on_uvloop_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvloop  # noqa: F401 — the test command installs the `fast` extra: missing, this fails, never skips
    monkeypatch.setenv(event_loop.EVENT_LOOP_VARIABLE, "uvloop")
    assert event_loop.run(_loop_module()).startswith("uvloop")


def test_uvloop_asked_for_but_not_installed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with pytest.raises(event_loop.EventLoopError, match=r"uvloop is not installed: pip install 'edge-testbed\[fast\]'"):
        event_loop.loop_factory("uvloop")


def test_an_unknown_loop_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(event_loop.EVENT_LOOP_VARIABLE, "trio")
    coroutine = _loop_module()
    with pytest.raises(event_loop.EventLoopError, match="TESTBED_EVENT_LOOP='trio' is not an event loop: expected "
                                                        "one of default, uvloop"):
        event_loop.run(coroutine)
    assert coroutine.cr_frame is None  # closed, not left to warn that it was never awaited


def test_testbed_run_with_an_unknown_loop_fails_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(event_loop.EVENT_LOOP_VARIABLE, "trio")
    code = main(["run", str(ROOT / "scenarios" / "lowband.yaml"), "--out", str(tmp_path / "run"),
                 "--set", "metrics.port=0"])
    assert code == EXIT_RUN_FAILED
    out = capsys.readouterr().out
    assert "run failed: TESTBED_EVENT_LOOP='trio' is not an event loop" in out
    assert "Traceback" not in out


def test_a_fleet_process_runs_on_uvloop_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fleet workers (never the broker) take uvloop where it is installed; the variable still decides when set."""
    import uvloop  # noqa: F401 — installed by the test command (the `fast` extra)
    monkeypatch.delenv(event_loop.EVENT_LOOP_VARIABLE, raising=False)
    assert event_loop.fleet_loop_default() == "uvloop"
    assert event_loop.run(_loop_module(), unset=event_loop.fleet_loop_default()).startswith("uvloop")
    assert event_loop.run(_loop_module()).startswith("asyncio")  # the run's own process: asyncio's
    monkeypatch.setenv(event_loop.EVENT_LOOP_VARIABLE, "default")
    assert event_loop.run(_loop_module(), unset=event_loop.fleet_loop_default()).startswith("asyncio")
    monkeypatch.delenv(event_loop.EVENT_LOOP_VARIABLE)
    monkeypatch.setitem(sys.modules, "uvloop", None)  # not installed: asyncio's, no error
    monkeypatch.setattr(event_loop.importlib.util, "find_spec", lambda name: None)
    assert event_loop.fleet_loop_default() == "default"


def test_the_summary_says_which_loops_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    from testbed.run_summary import event_loops

    monkeypatch.delenv(event_loop.EVENT_LOOP_VARIABLE, raising=False)

    async def loops() -> dict[str, str]:
        return event_loops()

    assert event_loop.run(loops()) == {"event_loop": "default", "fleet_event_loop": "uvloop"}
    monkeypatch.setenv(event_loop.EVENT_LOOP_VARIABLE, "uvloop")
    assert event_loop.run(loops()) == {"event_loop": "uvloop", "fleet_event_loop": "uvloop"}
