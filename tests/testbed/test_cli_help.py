"""The command line documents itself: every option of every command has a help text, and --version answers."""

from __future__ import annotations

import argparse

import pytest

from testbed.cli import _parser, main


def _undocumented(parser: argparse.ArgumentParser, prefix: str = "testbed") -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += _undocumented(sub, f"{prefix} {name}")
        elif action.help is None and action.dest != "help":
            missing.append(f"{prefix} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_option_of_every_command_has_a_help_text() -> None:
    assert _undocumented(_parser([])) == []


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("testbed ")
