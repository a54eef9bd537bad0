"""The fault matrix's marker: `pytest -m faults` runs every case (each a real run, a few minutes in all)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: a real run with scenario events (tests/faults), seconds each")
