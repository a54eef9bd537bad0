"""Whole runs: a scenario over a real Mosquitto broker through the link proxies, and lowband via the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.runner import ScenarioRun
from testbed.core.scenario import load_scenario, parse_scenario

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def own_namespaces(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the network namespaces this test creates (other runs on the machine may hold their own)."""
    from channel.netns import NetworkNamespace

    created: list[str] = []
    create = NetworkNamespace.create

    def create_and_record(namespace: NetworkNamespace) -> None:
        created.append(namespace.name)
        create(namespace)

    monkeypatch.setattr(NetworkNamespace, "create", create_and_record)
    return created


def left_behind(names: list[str]) -> list[str]:
    """Those of ``names`` that still exist."""
    from channel.netns import list_namespaces

    return sorted(set(names) & set(list_namespaces("")))


async def within(awaitable: Any, timeout_s: float, what: str) -> Any:
    """``await awaitable`` for at most ``timeout_s``; a hang fails saying what was awaited and where every task waits."""
    task = asyncio.ensure_future(awaitable)
    done, _ = await asyncio.wait([task], timeout=timeout_s)
    if done:
        return task.result()
    stacks = []
    for other in asyncio.all_tasks():
        if other is not asyncio.current_task():
            frames = other.get_stack(limit=4)
            stacks.append(f"{other.get_name()}: " + " <- ".join(
                f"{frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
                for frame in frames))
    task.cancel()
    await asyncio.wait([task], timeout=10)
    pytest.fail(f"{what} did not finish within {timeout_s} s; tasks were waiting at:\n" + "\n".join(stacks))


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def metric_values(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric in Prometheus text format."""
    values = {}
    for match in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, flags=re.M):
        values[match.group(1)] = float(match.group(2))
    return values


@pytest.mark.slow
async def test_run_over_mosquitto_through_lossy_links(mosquitto: tuple[str, int], tmp_path: Path) -> None:
    host, port = mosquitto
    scenario = parse_scenario({
        "name": "e2e", "seed": 11, "rounds": 3,
        "data": {"initial_samples": 300, "new_samples_per_round": 150},
        "update": {"strategy": "dpu", "ratio": 0.05, "epochs": 10},
        "channel": {"downlink": {"rate": "300kbit", "delay": "30ms", "jitter": "5ms", "loss": "2%"},
                    "uplink": {"rate": "100kbit", "delay": "30ms", "loss": "1%"}},
        "devices": [{"profile": "jetson-nano", "count": 1}, {"profile": "rpi4", "count": 2}],
        "broker": f"mqtt://{host}:{port}",
        "metrics": {"port": 0},
    })
    scrapes: list[str] = []
    run = ScenarioRun(scenario, tmp_path / "out", lambda event, data: None)

    def scrape_after_each_round(event: str, data: dict[str, Any]) -> None:
        # The exporter serves from its own thread, so a blocking scrape here sees the live run.
        if event == "round":
            assert run.metrics_url is not None
            scrapes.append(scrape(run.metrics_url))

    run.progress = scrape_after_each_round
    result = await run.execute()

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result.summary))
    final_version = summary["server"]["final_version"]
    assert final_version == sum(record["sent"] for record in summary["rounds"]) >= 2
    for device_id, state in summary["devices"].items():
        assert state["final_version"] == final_version, device_id
        assert state["hash_matches_server"], device_id
        assert state["final_accuracy"] >= 0.85
        assert state["energy_joules"] > 0 and state["bytes_received"] > 0
    for record in summary["rounds"]:  # round 0 too: a k-sparse update from w⁰ (update.round0: sparse)
        assert record["update_bytes"] <= 0.15 * record["full_model_bytes"]
    assert summary["rounds"][0]["base_version"] == 0

    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 3
    sent_records = [record for record in records if record["update_sent"]]
    assert all(record["delivered"] and record["hash_matches_server"] for record in sent_records)
    assert all(not record["delivered"] for record in records if not record["update_sent"])
    resolved = load_scenario(tmp_path / "out" / "scenario.yaml")
    assert resolved == scenario

    # The exporter served live metrics during the run, one scrape per finished round.
    assert len(scrapes) == 3
    last = scrapes[-1]
    versions = metric_values(last, "testbed_device_model_version")
    assert len(versions) == 3 and all(value == final_version for value in versions.values())
    assert all('profile="' in labels and 'device="' in labels for labels in versions)
    assert metric_values(last, "testbed_server_accuracy_ratio")
    energy = metric_values(last, "testbed_device_energy_joules_total")
    assert len(energy) == 3 and all(value > 0 for value in energy.values())


@pytest.mark.slow
def test_lowband_from_the_command_line(tmp_path: Path) -> None:
    """The README's first command: `testbed run scenarios/lowband.yaml`, here with a free metrics port."""
    out = tmp_path / "lowband"
    environment = {**os.environ, "COLUMNS": "120"}
    completed = subprocess.run(
        [sys.executable, "-m", "testbed.cli", "run", str(REPO / "scenarios" / "lowband.yaml"),
         "--out", str(out), "--set", "metrics.port=0"],
        capture_output=True, text=True, timeout=240, env=environment, cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "devices at the end of the run" in completed.stdout
    summary = json.loads((out / "summary.json").read_text())
    scenario = yaml.safe_load((REPO / "scenarios" / "lowband.yaml").read_text())
    assert len(summary["rounds"]) == scenario["rounds"]
    assert len(summary["devices"]) == 5
    for state in summary["devices"].values():
        assert state["final_version"] == summary["server"]["final_version"]
        assert state["hash_matches_server"] and state["final_accuracy"] >= 0.85
    for record in summary["rounds"][1:]:
        assert record["update_bytes"] <= 0.15 * record["full_model_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, index_codec, value_codec", [
    ("dpu", "golomb-rice", "int8"),
    ("pruning", "auto", "fp16"),
])
async def test_lossy_codecs_and_snapshots_reach_devices_exactly(strategy: str, index_codec: str, value_codec: str,
                                                               tmp_path: Path) -> None:
    """What devices hold after int8/fp16 updates and sparse snapshots is bit for bit what the server deployed."""
    scenario = parse_scenario({
        "name": "codecs", "seed": 4, "rounds": 4,
        "data": {"initial_samples": 300, "new_samples_per_round": 300},
        "update": {"strategy": strategy, "ratio": 0.05, "epochs": 5, "index_codec": index_codec,
                   "value_codec": value_codec,
                   **({"skip_if_worse": False} if strategy == "dpu" else {})},  # pruning always sends
        "channel": {"downlink": {"rate": "1Mbit", "delay": "10ms", "loss": "1%"}},
        "devices": [{"profile": "rpi4", "count": 2}],
        "metrics": {"enabled": False},
    })
    result = await ScenarioRun(scenario, tmp_path / "out").execute()
    summary = result.summary
    assert all(record["sent"] for record in summary["rounds"])
    assert summary["server"]["final_version"] == 4
    for state in summary["devices"].values():
        assert state["final_version"] == 4 and state["hash_matches_server"]
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(record["delivered"] and record["hash_matches_server"] for record in records)


@pytest.mark.slow
async def test_devices_recover_from_a_long_outage_through_catch_ups(tmp_path: Path) -> None:
    """An outage longer than reset_after drops every MQTT connection mid-update; devices reconnect
    when the link is back, ask for what they lost, and still end on the server's final weights."""
    scenario = parse_scenario({
        "name": "outage", "seed": 6, "rounds": 3,
        "data": {"initial_samples": 300, "new_samples_per_round": 300},
        # round0 full: the 69 kB first snapshot takes about 5.5 s at 100 kbit/s, so the 2-6 s outage is
        # certainly mid-update (a k-sparse round 0 can be over before it, and then nothing needs catching up)
        "update": {"epochs": 5, "skip_if_worse": False, "reinit": False, "round0": "full"},
        "channel": {"reset_after": "1s",
                    "downlink": {"rate": "100kbit", "delay": "20ms", "outages": [{"at": "2s", "duration": "4s"}]}},
        "devices": [{"profile": "rpi4", "count": 2}],
        "metrics": {"enabled": False},
    })
    events: list[tuple[str, dict[str, Any]]] = []
    run = ScenarioRun(scenario, tmp_path / "out", lambda event, data: events.append((event, data)))
    result = await run.execute()
    catch_ups = [data for event, data in events if event == "catch-up"]
    assert catch_ups and all("reconnected" in data["reason"] for data in catch_ups)
    summary = result.summary
    assert summary["server"]["final_version"] == 3
    for state in summary["devices"].values():
        assert state["final_version"] == 3 and state["hash_matches_server"]


@pytest.mark.slow
async def test_run_through_the_packet_level_tun_backend(tmp_path: Path, own_namespaces: list[str]) -> None:
    """channel.backend: tun — devices' MQTT traffic crosses TUN devices into network namespaces, and the
    kernel's TCP meets the link model's real packet drops."""
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists():
        message = "the tun backend needs root and /dev/net/tun"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    scenario = parse_scenario({
        "name": "tun", "seed": 8, "rounds": 3,
        "data": {"initial_samples": 300, "new_samples_per_round": 300},
        "update": {"epochs": 5, "skip_if_worse": False},
        "channel": {"backend": "tun", "downlink": {"rate": "500kbit", "delay": "20ms", "loss": "2%"},
                    "uplink": {"rate": "200kbit", "delay": "20ms", "loss": "1%"}},
        "devices": [{"profile": "rpi4", "count": 1}, {"profile": "jetson-nano", "count": 1}],
        "metrics": {"enabled": False},
    })
    result = await ScenarioRun(scenario, tmp_path / "out").execute()
    for state in result.summary["devices"].values():
        assert state["final_version"] == 3 and state["hash_matches_server"]
    assert own_namespaces, "the run created no namespace this test could see"
    assert not left_behind(own_namespaces), "the tun links left namespaces behind"


def _require_netem_backend() -> None:
    """Skip (fail when CI=true) unless this process can build NetemLinks: root, namespaces, tc."""
    from channel.errors import ChannelError
    from channel.netns import require_netns_support

    try:
        require_netns_support()
    except ChannelError as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the netem backend cannot run on CI: {error}")
        pytest.skip(f"the netem backend needs root and network namespaces: {error}")


@pytest.mark.slow
async def test_run_through_the_netem_backend_with_a_rate_only_link(tmp_path: Path,
                                                                    own_namespaces: list[str]) -> None:
    """channel.backend: netem — each device's MQTT connection crosses a veth shaped by htb (downlink on
    egress, uplink via ifb), relayed from inside its device namespace; every device ends on the server's weights."""
    _require_netem_backend()
    scenario = parse_scenario({
        "name": "netem", "seed": 9, "rounds": 3,
        "data": {"initial_samples": 300, "new_samples_per_round": 300},
        "update": {"epochs": 5, "skip_if_worse": False},
        "channel": {"backend": "netem", "downlink": {"rate": "1Mbit"}, "uplink": {"rate": "1Mbit"}},
        "devices": [{"profile": "rpi4", "count": 1}, {"profile": "jetson-nano", "count": 1}],
        "metrics": {"port": 0},
    })
    run = ScenarioRun(scenario, tmp_path / "out")
    scrapes: list[str] = []

    def scrape_after_each_round(event: str, data: dict[str, Any]) -> None:
        if event == "round":
            assert run.metrics_url is not None
            scrapes.append(scrape(run.metrics_url))

    run.progress = scrape_after_each_round
    result = await within(run.execute(), 240, "the netem run")  # a hang fails here, showing where it waits
    assert result.summary["server"]["final_version"] == 3
    for state in result.summary["devices"].values():
        assert state["final_version"] == 3 and state["hash_matches_server"]
    # the link metrics come from the qdiscs' counters: the downlink carried the updates
    wire = metric_values(scrapes[-1], "testbed_link_wire_bytes_total")
    downlink_wire = [value for labels, value in wire.items() if 'direction="downlink"' in labels]
    assert len(downlink_wire) == 2 and all(value > 0 for value in downlink_wire)
    assert own_namespaces, "the run created no namespace this test could see"
    assert not left_behind(own_namespaces), "the netem links left namespaces behind"


@pytest.mark.slow
async def test_a_netem_run_needing_sch_netem_fails_fast_and_clearly(tmp_path: Path, own_namespaces: list[str]) -> None:
    """A delay needs the netem qdisc; where the kernel lacks it the run stops at the first link, naming sch_netem."""
    _require_netem_backend()
    from channel.netem import kernel_supports
    from testbed.runner import RunError

    if kernel_supports("netem"):
        pytest.skip("this kernel has sch_netem, so a delayed netem link works here")
    scenario = parse_scenario({
        "name": "netem-delay", "seed": 9, "rounds": 2,
        "data": {"initial_samples": 300, "new_samples_per_round": 300},
        "channel": {"backend": "netem", "downlink": {"rate": "1Mbit", "delay": "20ms"}},
        "devices": [{"profile": "rpi4", "count": 2}],
        "metrics": {"enabled": False},
    })
    with pytest.raises(RunError, match=r"channel backend 'netem' cannot open the link of .*sch_netem"):
        await within(ScenarioRun(scenario, tmp_path / "out").execute(), 60, "the failing netem run")
    assert not left_behind(own_namespaces), "the failed start left namespaces behind"
