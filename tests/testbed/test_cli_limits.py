"""`testbed validate` and `testbed run` refuse, with exit 2 and one line naming the field, a scenario that asks more
than its data set or its memory holds (testbed.core.capacity), before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.cli import EXIT_BAD_SCENARIO, EXIT_OK, main
from tests.server.test_datasets import make_mnist

ROOT = Path(__file__).resolve().parents[2]
LOWBAND = ROOT / "scenarios" / "lowband.yaml"

# (override, the field the error names, the limit or what to write instead)
BAD_INPUTS = [
    (["data.initial_samples=1000000000"], "data.initial_samples", "write data.initial_samples: 1257 or less"),
    (["data.test_samples=1700"], "data.test_samples", "lower them to a sum of at most 1,787"),
    (["data.device_test_samples=1000"], "data.device_test_samples", "write data.device_test_samples: 360 or less"),
    (["rounds=10000"], "rounds", "the data allow at most 11 rounds"),
    (["model.hidden=[65536, 65536]"], "model.hidden", "above memory_budget (8.0 GiB)"),
    (["model.kind=vgg", "model.channels=[8, 8, 8, 8]"], "model.channels", "allow at most 3 stages"),
    (["data.dataset=cifar10", "model.kind=vgg", "model.channels=[512, 512]", "update.batch_size=4096"],
     "update.batch_size", "write update.batch_size: 141 or less"),
]


def _sets(overrides: list[str]) -> list[str]:
    return [argument for override in overrides for argument in ("--set", override)]


def _error_line(capsys: pytest.CaptureFixture[str], field: str) -> str:
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())  # undo the console's line wrapping
    assert "invalid scenario" in text and "Traceback" not in text
    return text[text.index(f" {field}: ") + 1:]


@pytest.mark.parametrize(("overrides", "field", "limit"), BAD_INPUTS, ids=[case[1] for case in BAD_INPUTS])
def test_validate_refuses_naming_the_field_and_the_limit(overrides, field, limit, capsys):
    assert main(["validate", str(LOWBAND), *_sets(overrides)]) == EXIT_BAD_SCENARIO
    assert limit in _error_line(capsys, field)


@pytest.mark.parametrize(("overrides", "field", "limit"), BAD_INPUTS, ids=[case[1] for case in BAD_INPUTS])
def test_run_refuses_before_anything_starts(overrides, field, limit, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["run", str(LOWBAND), *_sets(overrides), "--out", str(out)]) == EXIT_BAD_SCENARIO
    assert limit in _error_line(capsys, field)
    assert not out.exists()


def test_the_same_limits_in_a_file(tmp_path, capsys):
    path = tmp_path / "greedy.yaml"
    path.write_text(LOWBAND.read_text().replace("rounds: 8", "rounds: 10000"))
    assert main(["validate", str(path)]) == EXIT_BAD_SCENARIO
    assert "write rounds: 11" in _error_line(capsys, "rounds")


def test_resolve_checks_the_mnist_files_on_disk(tmp_path, capsys):
    """Validation assumes the official 60,000 + 10,000; `--resolve` (and `run`) read what the files hold."""
    make_mnist(tmp_path, train=500, test=600)
    small = ["--set", "data.dataset=mnist", "--set", f"data.root={tmp_path}", "--set", "data.download=false"]
    assert main(["validate", str(LOWBAND), *small]) == EXIT_OK
    capsys.readouterr()
    assert main(["validate", str(LOWBAND), *small, "--resolve"]) == EXIT_BAD_SCENARIO
    assert "the data allow at most 3 rounds" in _error_line(capsys, "rounds")
    assert main(["run", str(LOWBAND), *small, "--out", str(tmp_path / "out")]) == EXIT_BAD_SCENARIO
    assert "write rounds: 3" in _error_line(capsys, "rounds")
    assert not (tmp_path / "out").exists()
    assert main(["validate", str(LOWBAND), *small, "--set", "rounds=3", "--resolve"]) == EXIT_OK


def test_resolve_holds_the_estimate_to_the_hosts_memory(monkeypatch, capsys):
    wide = ["--set", "model.hidden=[4096, 4096]"]  # about 3.2 GiB: within the default budget
    assert main(["validate", str(LOWBAND), *wide, "--resolve"]) == EXIT_OK
    capsys.readouterr()
    monkeypatch.setattr("testbed.preflight.host_memory_bytes", lambda: 2 * 2**30)
    assert main(["validate", str(LOWBAND), *wide, "--resolve"]) == EXIT_BAD_SCENARIO
    line = _error_line(capsys, "model.hidden")
    assert "above this host's memory (2.0 GiB)" in line and "memory_budget" not in line


def test_a_metrics_port_in_use_is_refused_before_any_data_is_loaded(tmp_path, capsys):
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = tmp_path / "results"
        assert main(["run", str(LOWBAND), "--set", f"metrics.port={port}", "--out", str(out)]) == EXIT_BAD_SCENARIO
        captured = capsys.readouterr()
        text = " ".join((captured.out + captured.err).split())
        assert f"metrics.port: 127.0.0.1:{port} is in use on this host" in text and "Traceback" not in text
        assert not out.exists()  # refused before the run began: no data loaded, no training
        # the scenario is fine: a port taken now is a fact of this host, not of the file
        assert main(["validate", "--resolve", str(LOWBAND), "--set", f"metrics.port={port}"]) == EXIT_OK


def test_a_fleet_past_the_hosts_open_files_limit_is_refused_naming_the_limit(monkeypatch, capsys):
    """Each emulated device holds about 8 descriptors: a fleet past the hard limit (`ulimit -Hn`) would fail part
    way through connecting; `validate --resolve` and `run` say so before anything starts."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 4096))
    many = ["--set", "devices=[{profile: rpi4, count: 600}]"]
    assert main(["validate", str(LOWBAND), *many]) == EXIT_OK  # the file is fine; this host is not
    capsys.readouterr()
    assert main(["validate", str(LOWBAND), *many, "--resolve"]) == EXIT_BAD_SCENARIO
    line = _error_line(capsys, "devices")
    assert "600 emulated devices need about 5,056 open files, and this host allows a process 4,096" in line
    assert main(["validate", str(LOWBAND), "--set", "devices=[{profile: rpi4, count: 400}]", "--resolve"]) == EXIT_OK


def test_fleet_workers_split_the_open_files_a_fleet_needs(monkeypatch, capsys):
    """Each worker holds the links and clients of its share only: 3,000 devices over two workers need about 12,256
    descriptors in a process, under a hard limit of 20,000 that one process holding them all (24,256) would pass.
    With the embedded broker the run's process also holds the broker's end of every device's connection."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 20000))
    fleet = ["--set", "devices=[{profile: rpi4, count: 3000}]", "--set", "fleet.workers=2"]
    assert main(["validate", str(LOWBAND), *fleet, "--set", "broker=mosquitto", "--resolve"]) == EXIT_OK
    capsys.readouterr()
    assert main(["validate", str(LOWBAND), "--set", "devices=[{profile: rpi4, count: 3000}]", "--set",
                 "broker=mosquitto", "--resolve"]) == EXIT_BAD_SCENARIO
    assert "3,000 emulated devices need about 24,256 open files, and" in _error_line(capsys, "devices")
    many = ["--set", "devices=[{profile: rpi4, count: 5000}]", "--set", "fleet.workers=2"]
    assert main(["validate", str(LOWBAND), *many, "--resolve"]) == EXIT_BAD_SCENARIO
    line = _error_line(capsys, "devices")
    assert "5,000 emulated devices need about 20,256 open files in its busiest process of 2 workers" in line


def test_a_run_raises_its_soft_open_files_limit_to_the_hard_one(monkeypatch):
    import resource

    from testbed.core.scenario import load_scenario
    from testbed.preflight import raise_open_files_limit

    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 20000))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    raise_open_files_limit(load_scenario(LOWBAND, ["devices=[{profile: rpi4, count: 300}]"]))
    assert calls == [(20000, 20000)]  # 300 devices need about 2,656: past the soft 1024
    calls.clear()
    raise_open_files_limit(load_scenario(LOWBAND))
    assert calls == []  # five devices fit in the soft limit: left alone


def test_a_fleet_past_the_hosts_ephemeral_port_range_is_refused_before_the_run_starts(tmp_path, monkeypatch, capsys):
    """Each emulated device holds about two ports of the host's ephemeral range (its connection to its link, its
    link's to the broker): a fleet past the range would fail to connect long after the start; `validate --resolve`
    and `run` say so before anything starts, naming the sysctl that widens it."""
    import testbed.loopback_listeners as loopback_listeners

    port_range = tmp_path / "ip_local_port_range"
    port_range.write_text("40000\t40999\n")  # 1,000 ports
    monkeypatch.setattr(loopback_listeners, "PORT_RANGE_FILE", str(port_range))
    many = ["--set", "devices=[{profile: rpi4, count: 600}]", "--set", "broker=mosquitto"]
    assert main(["validate", str(LOWBAND), *many]) == EXIT_OK  # the file is fine; this host is not
    capsys.readouterr()
    assert main(["validate", str(LOWBAND), *many, "--resolve"]) == EXIT_BAD_SCENARIO
    line = _error_line(capsys, "devices")
    assert line.startswith("devices: 600 emulated devices on this host need about ")
    assert "ports of its ephemeral range, which has 1,000 (40000-40999); widen it (sysctl -w " in line
    out = tmp_path / "results"
    assert main(["run", str(LOWBAND), *many, "--set", "metrics.port=0", "--out", str(out)]) == EXIT_BAD_SCENARIO
    assert "which has 1,000 (40000-40999)" in _error_line(capsys, "devices")
    assert not out.exists()  # refused before the run began: no broker, no data, no output folder
    assert main(["validate", str(LOWBAND), "--set", "devices=[{profile: rpi4, count: 400}]", "--set",
                 "broker=mosquitto", "--resolve"]) == EXIT_OK
    port_range.write_text("1024\t65535\n")
    assert main(["validate", str(LOWBAND), *many, "--resolve"]) == EXIT_OK
