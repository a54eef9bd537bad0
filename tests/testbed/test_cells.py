"""Shared cells (`channel.cells`): validation, each device's link, and a real run behind one bottleneck."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.core.plugins import LINK_PROFILES
from channel.proxy import LinkProxy
from channel.shared import SharedFlow
from testbed.preflight import check_scenario
from testbed.links import DeviceLinks, resolve_cell_links
from testbed.runner import ScenarioRun
from testbed.core.scenario import ScenarioError, parse_scenario

DEVICES = [{"profile": "rpi4", "count": 3}]  # rpi4-0, rpi4-1, rpi4-2


def scenario(channel: dict[str, Any], devices: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    return {"name": "cells", "rounds": 1, "channel": channel, "devices": devices or DEVICES, **fields}


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ScenarioError) as caught:
        check_scenario(parse_scenario(data, "x.yaml"), "x.yaml")
    return str(caught.value)


def test_cells_parse_and_round_trip() -> None:
    parsed = parse_scenario(scenario({
        "downlink": {"rate": "1Mbit"},
        "cells": [{"name": "tower", "devices": ["rpi4-0", "rpi4-1"], "downlink": {"rate": "200kbit"}}],
    }))
    cell = parsed.channel.cells[0]
    assert (cell.name, cell.devices) == ("tower", ["rpi4-0", "rpi4-1"])
    assert parse_scenario(yaml.safe_load(parsed.to_yaml())) == parsed


@pytest.mark.parametrize("cells, named", [
    ([{"name": "a", "devices": ["rpi4-0", "nobody"]}], ["channel.cells.0.devices", "'nobody'"]),
    ([{"name": "a", "devices": ["rpi4-0"]}, {"name": "b", "devices": ["rpi4-1", "rpi4-0"]}],
     ["channel.cells.1.devices", "'rpi4-0'", "channel.cells.0"]),
    ([{"name": "a", "devices": []}], ["channel.cells.0.devices", "at least one device"]),
    ([{"name": "a", "devices": ["rpi4-0", "rpi4-0"]}], ["channel.cells.0.devices", "'rpi4-0'"]),
    ([{"name": "a", "devices": ["rpi4-0"]}, {"name": "a", "devices": ["rpi4-1"]}], ["channel", "'a'", "twice"]),
    ([{"name": "a", "devices": ["rpi4-0"], "profile": "no-such"}], ["channel.cells.0.profile", "no-such"]),
    ([{"name": "a", "devices": ["rpi4-0"], "downlink": {"rate": "fast"}}], ["channel.cells.0.downlink.rate"]),
])
def test_bad_cells_are_one_error_naming_the_field(cells: list[dict[str, Any]], named: list[str]) -> None:
    message = error_of(scenario({"cells": cells}))
    assert message.startswith("x.yaml: invalid scenario")
    assert len(message.splitlines()) == 2, message
    for part in named:
        assert part in message, message


@pytest.mark.parametrize("backend", ["tun", "netem"])
def test_cells_need_the_proxy_backend(backend: str) -> None:
    message = error_of(scenario({"backend": backend, "cells": [{"name": "a", "devices": ["rpi4-0"]}]}))
    assert "backend 'proxy'" in message and repr(backend) in message
    parse_scenario(scenario({"backend": backend}))  # no cells: fine


def test_a_cell_inherits_what_it_does_not_set() -> None:
    parsed = parse_scenario(scenario({
        "profile": "lte-m", "downlink": {"rate": "1Mbit"}, "uplink": {"delay": "70ms"},
        "cells": [{"name": "a", "devices": ["rpi4-0"], "uplink": {"rate": "20kbit"}},
                  {"name": "b", "devices": ["rpi4-1"], "profile": "nb-iot"}],
    }))
    downlink, uplink = resolve_cell_links(parsed.channel, parsed.channel.cells[0])
    assert downlink.rate_bps == 1e6 and uplink.rate_bps == 20e3
    assert uplink.delay_s == LINK_PROFILES.get("lte-m").uplink.delay_s  # the cell's uplink replaces the channel's
    downlink, uplink = resolve_cell_links(parsed.channel, parsed.channel.cells[1])
    assert downlink.rate_bps == 1e6 and uplink.delay_s == 0.07
    assert downlink.delay_s == LINK_PROFILES.get("nb-iot").downlink.delay_s


def test_device_links_share_one_bottleneck_per_cell() -> None:
    parsed = parse_scenario(scenario({
        "downlink": {"rate": "1Mbit"},
        "cells": [{"name": "tower", "devices": ["rpi4-0", "rpi4-1"], "downlink": {"rate": "200kbit"}}],
    }))
    links = DeviceLinks(parsed.channel, seed=3)
    assert [links.cell_of(d) for d in parsed.device_ids()] == ["tower", "tower", None]
    assert links.parameters("rpi4-0")[0].rate_bps == 200e3
    assert links.parameters("rpi4-2")[0].rate_bps == 1e6
    first, second, alone = (links.open(d, ("127.0.0.1", 1), seed=i) for i, d in enumerate(parsed.device_ids()))
    assert isinstance(first, LinkProxy) and isinstance(alone, LinkProxy)
    assert isinstance(first.downlink_model, SharedFlow) and isinstance(second.uplink_model, SharedFlow)
    assert first.downlink_model.shared is second.downlink_model.shared
    assert first.uplink_model.shared is second.uplink_model.shared
    assert first.downlink_model.shared is not first.uplink_model.shared
    assert not isinstance(alone.downlink_model, SharedFlow)
    assert first.downlink == second.downlink and first.downlink.rate_bps == 200e3


async def round_zero_delivery_s(channel: dict[str, Any], out: Path) -> list[float]:
    """Run a tiny two-device scenario; check every device ends on the server's weights; return round 0's deliveries."""
    parsed = parse_scenario({
        "name": "cell-run", "seed": 5, "rounds": 2, "round_timeout": "60s",
        "data": {"initial_samples": 100, "new_samples_per_round": 20, "validation_samples": 20,
                 "test_samples": 20, "device_test_samples": 10},
        "model": {"kind": "mlp", "hidden": [64]},
        "update": {"strategy": "dpu", "ratio": 0.05, "epochs": 1, "skip_if_worse": False, "round0": "full"},
        "channel": channel,
        "devices": [{"profile": "rpi4", "count": 2}],
        "metrics": {"enabled": False},
    })
    result = await ScenarioRun(parsed, out).execute()
    summary = result.summary
    for device_id, state in summary["devices"].items():
        assert state["final_version"] == summary["server"]["final_version"], device_id
        assert state["hash_matches_server"], device_id
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert summary["rounds"][0]["update_bytes"] == summary["rounds"][0]["full_model_bytes"] > 15_000
    return [record["delivery_seconds"] for record in records if record["round"] == 0]


async def test_a_shared_cell_halves_each_devices_rate(tmp_path: Path) -> None:
    link = {"rate": "200kbit", "delay": "20ms"}
    own = await round_zero_delivery_s({"downlink": link, "uplink": link}, tmp_path / "own")
    cell = await round_zero_delivery_s(
        {"cells": [{"name": "tower", "devices": ["rpi4-0", "rpi4-1"], "downlink": link, "uplink": link}]},
        tmp_path / "cell")
    ratio = (sum(cell) / len(cell)) / (sum(own) / len(own))
    assert 1.6 <= ratio <= 2.4, (own, cell)


def test_links_is_another_name_for_cells() -> None:
    cells = [{"name": "cell-a", "devices": ["rpi4-0", "rpi4-1"], "downlink": {"rate": "200kbit"}}]
    by_links = parse_scenario(scenario({"links": cells}))
    assert by_links == parse_scenario(scenario({"cells": cells}))
    assert "cells:" in by_links.to_yaml()


@pytest.mark.parametrize("backend", ["tun", "netem"])
def test_a_bottleneck_queue_reaches_the_link_of_a_packet_level_backend(backend: str) -> None:
    parsed = parse_scenario(scenario({"backend": backend, "downlink": {"rate": "100kbit", "queue": "6KB"}}))
    assert DeviceLinks(parsed.channel, 1).parameters("rpi4-0")[0].queue_bytes == 6000
    assert "downlink.queue (a bounded bottleneck queue) works at the packet level, with backend 'netem' or 'tun', " \
           "not 'proxy'" in error_of(scenario({"downlink": {"rate": "100kbit", "queue": "6KB"}}))
    assert "needs a rate" in error_of(scenario({"backend": "netem", "downlink": {"delay": "10ms", "queue": "6KB"}}))
