"""The CLI refuses bad scenarios with exit code 2 before anything starts, and validates good ones."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from testbed.cli import EXIT_BAD_SCENARIO, EXIT_OK, main

ROOT = Path(__file__).resolve().parents[2]
LOWBAND = ROOT / "scenarios" / "lowband.yaml"


@pytest.fixture
def bad_scenario(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(LOWBAND.read_text().replace("ratio: 0.05", "ratoi: 0.05"))
    return path


def _output(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())  # undo the console's line wrapping


def test_validate_lowband(capsys):
    assert main(["validate", str(LOWBAND)]) == EXIT_OK
    output = _output(capsys)
    assert "valid, 5 devices" in output
    assert "rate: 50000.0" in output


def test_validate_with_override(capsys):
    assert main(["validate", str(LOWBAND), "--set", "devices.0.count=20"]) == EXIT_OK
    assert "valid, 23 devices" in _output(capsys)


def test_validate_bad_file_names_the_field(bad_scenario, capsys):
    assert main(["validate", str(bad_scenario)]) == EXIT_BAD_SCENARIO
    output = _output(capsys)
    assert "update.ratoi" in output
    assert "unknown field" in output


def test_validate_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == EXIT_BAD_SCENARIO
    assert "nope.yaml" in _output(capsys)


def test_validate_bad_override(capsys):
    assert main(["validate", str(LOWBAND), "--set", "update.ratio=2"]) == EXIT_BAD_SCENARIO
    assert "update.ratio" in _output(capsys)


def test_run_bad_file_starts_nothing(bad_scenario, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(bad_scenario), "--out", str(out)]) == EXIT_BAD_SCENARIO
    assert not out.exists()
    assert "update.ratoi" in _output(capsys)


def test_run_bad_override_starts_nothing(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(LOWBAND), "--set", "update.ratio=abc", "--out", str(out)]) == EXIT_BAD_SCENARIO
    assert not out.exists()
    output = _output(capsys)
    assert "update.ratio" in output
    assert "abc" in output


def test_run_override_without_equals(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(LOWBAND), "--set", "update.ratio", "--out", str(out)]) == EXIT_BAD_SCENARIO
    assert not out.exists()
    assert "path=value" in _output(capsys)


def test_console_script_exit_code(bad_scenario):
    script = Path(sys.executable).parent / "testbed"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "testbed.cli"]
    completed = subprocess.run([*command, "validate", str(bad_scenario)], capture_output=True, text=True,
                               timeout=60, check=False)
    assert completed.returncode == EXIT_BAD_SCENARIO
    assert "update.ratoi" in " ".join((completed.stdout + completed.stderr).split())


def test_validate_checks_plugins_only_with_resolve(tmp_path, capsys):
    """A trace file that does not exist is the link plugins' finding: `validate` (core only) passes it,
    `validate --resolve` and `run` refuse it, naming the field, before anything starts."""
    missing = ["--set", f"channel.downlink.trace={tmp_path / 'missing.csv'}", "--set", "channel.downlink.rate=null"]
    assert main(["validate", str(LOWBAND), *missing]) == EXIT_OK
    capsys.readouterr()
    assert main(["validate", str(LOWBAND), *missing, "--resolve"]) == EXIT_BAD_SCENARIO
    output = _output(capsys)
    assert "channel: " in output and "missing.csv" in output
    assert main(["run", str(LOWBAND), *missing, "--out", str(tmp_path / "out")]) == EXIT_BAD_SCENARIO
    output = _output(capsys)
    assert "invalid scenario" in output and "missing.csv" in output
    assert not (tmp_path / "out").exists()


def test_an_unknown_plugin_name_lists_the_registered_ones(tmp_path, capsys):
    assert main(["validate", str(LOWBAND), "--set", "channel.backend=carrier-pigeon"]) == EXIT_BAD_SCENARIO
    assert "channel.backend: unknown channel backend 'carrier-pigeon'; choose one of netem, proxy, tun" in _output(capsys)
    assert main(["validate", str(LOWBAND), "--set", "update.value_codec=fp8"]) == EXIT_BAD_SCENARIO
    assert "update.value_codec: unknown value codec 'fp8'; choose one of fp16, fp32, int8" in _output(capsys)


def test_an_error_of_any_package_family_is_one_line(monkeypatch, capsys):
    """Every package's errors are TestbedErrors; one escaping a command is printed as one line, exit 1."""
    from channel.errors import ChannelError
    from devices.errors import DeviceError
    from server.errors import ServerError
    from testbed.core.errors import TestbedError
    from testbed.core.messages import MessageError
    from testbed.core.wire import WireError
    from testbed.errors import OrchestrationError

    for family in (ChannelError, DeviceError, ServerError, MessageError, WireError, OrchestrationError):
        assert issubclass(family, TestbedError) and not issubclass(family, ValueError)

    def fail(*_: object) -> int:
        raise ServerError("data.root /nowhere has no MNIST files")

    monkeypatch.setattr("testbed.cli._command_monitoring", fail)
    assert main(["monitoring"]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: data.root /nowhere has no MNIST files"
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize(("text", "expected"), [
    ("name: x\nrounds: 1\n  bad: [\n", "not valid YAML: line 3, column 6: mapping values are not allowed here"),
    ("a: b\n- c\n", "not valid YAML: line 2, column 1: expected <block end>, but found '-'"),
])
def test_not_yaml_is_one_full_line_with_line_and_column(tmp_path, text, expected):
    """Off a terminal (logs, CI) an error is one unwrapped line: file, line, column and what is wrong."""
    path = tmp_path / ("a-scenario-file-with-a-long-name-so-that-the-line-passes-eighty-columns" + ".yaml")
    path.write_text(text)
    script = Path(sys.executable).parent / "testbed"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "testbed.cli"]
    for verb in ("validate", "run", "compare"):
        completed = subprocess.run([*command, verb, str(path)], capture_output=True, text=True, timeout=60,
                                   check=False, env={"PATH": "/usr/bin:/bin", "TERM": "xterm"})
        assert completed.returncode == EXIT_BAD_SCENARIO, (verb, completed.stderr)
        lines = (completed.stdout + completed.stderr).splitlines()
        assert lines == [f"error: {path}: {expected}"], (verb, lines)
