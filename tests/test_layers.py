"""The layers hold: import-linter contracts, and `testbed validate` loads nothing beyond testbed.core."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def test_import_linter_contracts_are_kept() -> None:
    done = subprocess.run([str(LINT_IMPORTS), "--no-cache", str(ROOT / ".importlinter")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "3 kept, 0 broken" in done.stdout


def _imported_by_validate(scenario: str) -> set[str]:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "testbed.cli", "validate", scenario],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    # -X importtime writes one "import time: self | cumulative | name" line per module, indented by depth
    return {line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
            and "|" in line} - {"imported package"}


def test_validate_imports_no_plugin_and_no_torch() -> None:
    for scenario in sorted((ROOT / "scenarios").glob("*.yaml")):
        modules = _imported_by_validate(str(scenario))
        assert "testbed.core.scenario" in modules  # the measurement saw the schema load
        heavy = sorted(name for name in modules if name.split(".")[0] in {"torch", "server", "channel", "devices"}
                       or (name.startswith("testbed.") and not name.startswith(("testbed.core", "testbed.cli"))
                           and name not in {"testbed.__main__"}))
        assert not heavy, f"testbed validate {scenario.name} imported {heavy}"
