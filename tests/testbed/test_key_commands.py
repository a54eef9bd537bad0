"""`testbed keygen`, `testbed run --signing-key` and `testbed board --trust`: keys made, read, and refused clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testbed.core.signing import SigningKey, TrustedKey

TESTBED = [sys.executable, "-m", "testbed.cli"]


def run_cli(*arguments: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TESTBED, *arguments], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_keygen_writes_a_key_pair_and_never_overwrites(tmp_path: Path) -> None:
    made = run_cli("keygen", "fleet.key", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    public = (tmp_path / "fleet.key.pub").read_text().strip()
    assert public in made.stdout
    assert SigningKey.load(tmp_path / "fleet.key").trusted_key == TrustedKey.from_text(public)
    assert oct((tmp_path / "fleet.key").stat().st_mode & 0o777) == "0o600"
    again = run_cli("keygen", "fleet.key", cwd=tmp_path)
    assert again.returncode == 2 and "not overwriting" in again.stderr and len(again.stderr.splitlines()) == 1


def test_run_with_an_unreadable_signing_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    scenario = Path(__file__).resolve().parents[2] / "scenarios" / "lowband.yaml"
    (tmp_path / "not-a-key").write_text("hello")
    for key, words in (("not-a-key", "testbed keygen"), ("missing.key", "cannot read")):
        result = run_cli("run", str(scenario), "--signing-key", key, "--out", str(tmp_path / "out"), cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert words in result.stdout and "--signing-key" in result.stdout
        assert not (tmp_path / "out").exists()


def test_board_with_a_bad_trusted_key_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for value in ("ed25519:nope", "missing.pub"):
        result = run_cli("board", "--port", "/dev/null", "--energy", "model", "--trust", value, cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert result.stderr.startswith("testbed board: error: --trust:") and len(result.stderr.splitlines()) == 1
