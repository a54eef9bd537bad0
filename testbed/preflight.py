"""Checks of a scenario that need its plugins or files (link profiles, traces, strategy settings, broker identities).

``testbed.core.scenario`` validates a file against the schema and the registered plugin names without
importing any plugin; what only the plugins can tell (a profile's rate under a queue, a trace file that
does not parse, a value the strategy's own Settings model rejects) is checked here, with the same
one-error-per-field format, before any data is loaded. So is what depends on this host: the sample
counts again with the sizes of MNIST files on disk (validation assumes the official ones), and the
memory estimate of ``testbed.core.capacity`` against the host's memory when that is below ``memory_budget``, and the
open files and ephemeral ports its emulated devices need against this host's limits.
``check_ports`` tells a run, before it loads any data, whether the metrics port can be bound now. A scenario
whose file is fine but whose `broker: mosquitto` has no Mosquitto on this host is one line of its own.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from dataclasses import replace

from channel.errors import ChannelError
from server.datasets import dataset_directory, mnist_sample_counts
from server.errors import ServerError
from server.strategies import settings_problems, strategy_class
from testbed.broker_config import CredentialsError, broker_access
from testbed.core.capacity import (
    DATASETS,
    data_problems,
    emulated_device_count,
    format_bytes,
    memory_problems,
    open_files_needed,
)
from testbed.core.fleet_checks import local_emulated_devices, planned_worker_shares
from testbed.core.scenario import Scenario, ScenarioError
from testbed.links import resolve_cell_links, resolve_links
from testbed.loopback_listeners import ephemeral_ports_refusal
from testbed.mosquitto import MISSING as MOSQUITTO_MISSING, find_mosquitto


def _strategy_problems(scenario: Scenario) -> list[str]:
    """``update.<key>: ...`` for every strategy setting the chosen strategy's Settings model rejects."""
    update = scenario.update
    return settings_problems(strategy_class(update.strategy).Settings, update.strategy, update.settings)


def _channel_problems(scenario: Scenario) -> list[str]:
    channel = scenario.channel
    problems: list[str] = []
    try:
        resolved = resolve_links(channel)
    except ChannelError as error:
        return [f"channel: {error}"]
    for name, spec, link in zip(("downlink", "uplink"), (channel.downlink, channel.uplink), resolved):
        if spec is not None and spec.queue_bytes is not None and link.rate_bps is None and link.trace is None:
            problems.append(f"channel.{name}.queue: needs a rate (or trace) to queue at: without a bottleneck "
                            "it never fills")
    for index, cell in enumerate(channel.cells):
        try:
            resolve_cell_links(channel, cell)
        except ChannelError as error:
            problems.append(f"channel.cells.{index} ({cell.name!r}): {error}")
    return problems


def _broker_problems(scenario: Scenario) -> list[str]:
    """``broker.device_credentials: ...`` when the file of device identities is missing, malformed or incomplete."""
    try:
        broker_access(scenario)
    except CredentialsError as error:
        return [str(error)]
    return []


def _data_on_disk_problems(scenario: Scenario) -> list[str]:
    """The sample and round checks again with the sizes of the MNIST files on disk, read from their headers."""
    data = scenario.data
    if data.dataset != "mnist":
        return []  # digits ships with scikit-learn; CIFAR-10 batches tell their size only unpickled (at load)
    try:
        counts = mnist_sample_counts(dataset_directory("mnist", data.root))
    except ServerError as error:
        return [f"data.root: {error}"]
    if counts is None:
        return []  # absent: downloaded (the official files, checked by MD5), or the load names what is missing
    facts = replace(DATASETS["mnist"], pool_samples=counts[0], test_set_samples=counts[1])
    return [problem.describe() for problem in data_problems(scenario, facts)]


def host_memory_bytes() -> int | None:
    """This host's physical memory, where the platform tells it."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def _host_memory_problems(scenario: Scenario) -> list[str]:
    """The memory estimate against this host's memory, when that is less than memory_budget."""
    host = host_memory_bytes()
    if host is None or host >= scenario.memory_budget:
        return []  # the schema already held the estimate to memory_budget
    budget = f"this host's memory ({format_bytes(host)})"
    return [problem.describe() for problem in memory_problems(scenario, host, budget, raisable=False)]


def _host_fleet(scenario: Scenario) -> tuple[list[str], list[list[str]]]:
    """The emulated devices this host runs, and this host's plan of fleet workers for them (none: in the run's
    process)."""
    return local_emulated_devices(scenario), planned_worker_shares(scenario, os.cpu_count() or 1)


def _open_files_per_process(scenario: Scenario) -> tuple[int, int]:
    """What the busiest process of the run (its own, or its busiest fleet worker) needs, by this host's plan, and
    the number of workers in that plan (0: the devices run in the run's process)."""
    local, shares = _host_fleet(scenario)
    needed = open_files_needed(len(local), max(map(len, shares)) if shares else None, scenario.broker.embedded)
    return needed, len(shares)


def _open_files_problems(scenario: Scenario) -> list[str]:
    """``devices: ...`` when a process of the run may not open as many files as its share of the fleet needs, even
    after raising its soft limit to the hard one (which `raise_open_files_limit` does at the start of a run; fleet
    workers inherit it)."""
    needed, workers = _open_files_per_process(scenario)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or needed <= hard:
        return []
    where = f" in its busiest process of {workers} workers" if workers else ""
    return [f"devices: {emulated_device_count(scenario):,} emulated devices need about {needed:,} open files{where}, "
            f"and this host allows a process {hard:,} (ulimit -Hn); raise the hard limit (limits.conf, systemd "
            f"LimitNOFILE, or `ulimit -Hn {needed}` as root), run fewer emulated devices, or spread them over more "
            "fleet workers"]


def _ephemeral_ports_problems(scenario: Scenario) -> list[str]:
    """``devices: ...`` when this host's ephemeral port range cannot hold the connections of the emulated devices it
    runs, by this host's plan of fleet workers (they would fail to connect, long after the start)."""
    local, shares = _host_fleet(scenario)
    problem = ephemeral_ports_refusal(len(local), len(shares) + 1)
    return [] if problem is None else [problem]


def raise_open_files_limit(scenario: Scenario) -> None:
    """Raise this process's soft open-files limit towards its hard limit when the fleet needs more than the soft
    one (commonly 1024, which a few hundred emulated devices exceed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed, _ = _open_files_per_process(scenario)
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _port_problems(scenario: Scenario) -> list[str]:
    """``metrics.port: ...`` when the exporter's port cannot be bound on this host now (another run holds it, say):
    found before any data is loaded, not after round 0's training."""
    metrics = scenario.metrics
    if not metrics.enabled or metrics.port == 0:
        return []
    try:
        infos = socket.getaddrinfo(metrics.host, metrics.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        return [f"metrics.host: cannot resolve {metrics.host!r}: {error.strerror}"]
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the exporter binds (TIME_WAIT is fine)
        try:
            probe.bind(address)
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return [f"metrics.port: {metrics.host}:{metrics.port} is in use on this host (another run?); "
                        f"choose another with --set metrics.port=N (0 picks a free one) or metrics.enabled: false"]
            return [f"metrics.host: cannot listen on {metrics.host}:{metrics.port}: {error.strerror or error}"]
    return []


def check_ports(scenario: Scenario, source: str = "<scenario>") -> None:
    """ScenarioError if a port the run must listen on is taken now; a run checks this before loading any data.

    Not part of `check_scenario` (nor of `validate --resolve`): whether a port is free is a fact of this host
    at this moment, not of the scenario.
    """
    problems = _port_problems(scenario)
    if problems:
        raise ScenarioError("\n".join([f"{source}: cannot run here now", *(f"  {problem}" for problem in problems)]))


def check_scenario(scenario: Scenario, source: str = "<scenario>") -> Scenario:
    """``scenario`` if its plugins accept it; otherwise one ScenarioError listing every problem by field path."""
    problems = (_strategy_problems(scenario) + _channel_problems(scenario) + _broker_problems(scenario)
                + _data_on_disk_problems(scenario) + _host_memory_problems(scenario) + _open_files_problems(scenario)
                + _ephemeral_ports_problems(scenario))
    if problems:
        raise ScenarioError("\n".join([f"{source}: invalid scenario", *(f"  {problem}" for problem in problems)]))
    if scenario.broker.local_mosquitto and find_mosquitto() is None:
        raise ScenarioError(f"{source}: {MOSQUITTO_MISSING}")
    return scenario
