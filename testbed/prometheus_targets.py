"""A run registers its exporter with Prometheus: a `file_sd` target file, written when it serves, removed when it ends.

Prometheus reads every `*.json` in the targets folder (`file_sd_configs`, see monitoring/prometheus.yml), so
a run on any metrics port (0 too) is scraped without editing its config. The folder is the scenario's
`metrics.targets_dir`, else `$EDGE_TESTBED_PROMETHEUS_TARGETS`, else `$XDG_STATE_HOME/edge-testbed/prometheus-targets`
(`~/.local/state/...`): a per-user folder that exists in every kind of session, unlike `$XDG_RUNTIME_DIR`
(unset under cron, `su`, containers and many CI runners, and removed at logout while a run in tmux goes on).
A file left by a run that was killed (SIGKILL) names a port nobody serves: Prometheus shows that target down
(`up == 0`) and nothing else; delete the file to forget it.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from testbed.core.scenario import Scenario
from testbed.data_commands import write_atomically

TARGETS_DIRECTORY_VARIABLE = "EDGE_TESTBED_PROMETHEUS_TARGETS"
TARGET_FILE_SUFFIX = ".json"
"""Prometheus reads `*.json` in the folder; the temporary file of an atomic write ends otherwise (`.part`)."""
WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
"""An exporter listening on every address is scraped on loopback."""

Warn = Callable[[str], None]


def targets_directory(configured: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """`configured` (the scenario's metrics.targets_dir) if given, else `$EDGE_TESTBED_PROMETHEUS_TARGETS`, else
    `$XDG_STATE_HOME/edge-testbed/prometheus-targets` (an absolute XDG_STATE_HOME only), else `~/.local/state/...`."""
    if configured is not None:
        return Path(configured).expanduser()
    environ = os.environ if environ is None else environ
    chosen = environ.get(TARGETS_DIRECTORY_VARIABLE)
    if chosen:
        return Path(chosen).expanduser()
    state = environ.get("XDG_STATE_HOME")
    state_home = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local" / "state"
    return state_home / "edge-testbed" / "prometheus-targets"


def scrape_address(host: str, port: int) -> str:
    """The `host:port` Prometheus scrapes for an exporter listening on `host`: loopback for a wildcard address,
    an IPv6 literal in brackets."""
    host = WILDCARD_LOOPBACK.get(host, host)
    try:
        is_ipv6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_ipv6 = False  # a host name
    return f"[{host}]:{port}" if is_ipv6 else f"{host}:{port}"


def run_labels(run_id: str, scenario: str, strategy: str) -> dict[str, str]:
    """The labels Prometheus attaches to every series of the run's target (and to its `up`)."""
    return {"run_id": run_id, "scenario": scenario, "strategy": strategy}


def target_file_name(run_id: str) -> str:
    """`<run id>.json`; a run id is one file name (testbed.runner.new_run_id), never a path."""
    if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
        raise ValueError(f"a run id names one file, got {run_id!r}")
    return run_id + TARGET_FILE_SUFFIX


def target_file_text(address: str, labels: Mapping[str, str]) -> str:
    """The `file_sd` JSON of one target: `[{"targets": [address], "labels": {...}}]`."""
    return json.dumps([{"targets": [address], "labels": dict(labels)}], indent=2, ensure_ascii=False) + "\n"


class TargetRegistration:
    """The target file of one exporter: written (atomically) when entered, removed when left, also on an error.

    A folder it cannot write is a warning through `warn` (one line), not a failure: the run's results do not
    depend on Prometheus finding it.
    """

    def __init__(self, directory: Path, run_id: str, address: str, labels: Mapping[str, str], warn: Warn) -> None:
        self.directory = directory
        self.path = directory / target_file_name(run_id)
        self.text = target_file_text(address, labels)
        self.warn = warn
        self.registered = False

    def __enter__(self) -> TargetRegistration:
        try:
            if self.directory.exists() and not self.directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
            self.directory.mkdir(parents=True, exist_ok=True)
            write_atomically(self.path, self.text.encode())
            self.registered = True
        except OSError as error:
            self.warn(f"Prometheus will not find this run: cannot write {self.path} ({error.strerror or error}); "
                      f"set metrics.targets_dir or ${TARGETS_DIRECTORY_VARIABLE} to a writable folder")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self.registered:
            return
        self.registered = False
        try:
            self.path.unlink(missing_ok=True)
        except OSError as error:
            self.warn(f"cannot remove {self.path} ({error.strerror or error}): Prometheus will show this run's "
                      "target down until it is deleted")


def register_run(scenario: Scenario, run_id: str, host: str, port: int, warn: Warn) -> TargetRegistration:
    """The registration of a run's exporter listening on host:port, in the folder its scenario resolves to."""
    return TargetRegistration(targets_directory(scenario.metrics.targets_dir), run_id, scrape_address(host, port),
                              run_labels(run_id, scenario.name, scenario.update.strategy), warn)
