"""The scenario's channel section mapped onto link parameters: profiles, overrides, loss models, traces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from channel.loss import BernoulliLoss, GilbertElliottLoss
from channel.outage import RandomOutages, ScheduledOutage
from testbed.core.plugins import LINK_PROFILES
from channel.trace import MahimahiTrace
from testbed.links import resolve_links
from testbed.preflight import check_scenario
from testbed.core.scenario import ScenarioError, parse_scenario


def scenario_with(channel: dict[str, Any]) -> Any:
    return check_scenario(parse_scenario({"name": "links", "rounds": 1, "devices": [{"profile": "rpi4", "count": 1}],
                                          "channel": channel}))


def test_no_channel_is_an_unlimited_link() -> None:
    downlink, uplink = resolve_links(scenario_with({}).channel)
    assert downlink.rate_bps is None and uplink.rate_bps is None and downlink.loss == 0.0


def test_override_keeps_the_profiles_other_fields() -> None:
    downlink, uplink = resolve_links(scenario_with({"profile": "lora-sf7", "downlink": {"delay": "2s"}}).channel)
    profile = LINK_PROFILES.get("lora-sf7")
    assert downlink.delay_s == 2.0
    assert downlink.rate_bps == profile.downlink.rate_bps
    assert (downlink.mss_bytes, downlink.overhead_bytes) == (profile.downlink.mss_bytes, profile.downlink.overhead_bytes)
    assert uplink == profile.uplink


def test_gilbert_elliott_maps_to_netem_parameters() -> None:
    channel = {"downlink": {"rate": "1Mbit", "gilbert_elliott": {"p": "1%", "r": "25%", "1-h": "90%", "1-k": "0.1%"}}}
    downlink, _ = resolve_links(scenario_with(channel).channel)
    model = downlink.loss_process
    assert isinstance(model, GilbertElliottLoss)
    assert (model.p, model.r, model.one_minus_h, model.one_minus_k) == pytest.approx((0.01, 0.25, 0.9, 0.001))


def test_gilbert_elliott_defaults_as_netem() -> None:
    downlink, _ = resolve_links(scenario_with({"downlink": {"gilbert_elliott": {"p": "2%"}}}).channel)
    model = downlink.loss_process
    assert (model.p, model.r, model.one_minus_h, model.one_minus_k) == pytest.approx((0.02, 0.98, 1.0, 0.0))


def test_bernoulli_loss_over_a_profile_with_gilbert_elliott_replaces_it() -> None:
    downlink, _ = resolve_links(scenario_with({"profile": "wifi-weak", "downlink": {"loss": "5%"}}).channel)
    assert isinstance(downlink.loss_process, BernoulliLoss) and downlink.loss == 0.05


def test_delay_distribution_duplication_reordering_outages() -> None:
    channel = {"downlink": {"rate": "100kbit", "delay": "50ms", "jitter": "10ms", "delay_distribution": "pareto",
                            "duplicate": "1%", "reorder": "2%",
                            "outages": [{"at": "5s", "duration": "2s"}],
                            "random_outages": {"mean_up": "60s", "mean_down": "1s"}}}
    downlink, _ = resolve_links(scenario_with(channel).channel)
    assert downlink.delay_distribution == "pareto"
    assert (downlink.duplicate, downlink.reorder) == pytest.approx((0.01, 0.02))
    assert downlink.outages == (ScheduledOutage(5.0, 2.0),)
    assert downlink.random_outages == RandomOutages(60.0, 1.0)


def test_mahimahi_trace_file(tmp_path: Path) -> None:
    trace = tmp_path / "cell.down"
    trace.write_text("\n".join(str(ms) for ms in range(0, 100, 4)) + "\n")
    downlink, _ = resolve_links(scenario_with({"profile": "3g", "downlink": {"trace": str(trace)}}).channel)
    assert isinstance(downlink.trace, MahimahiTrace) and downlink.rate_bps is None


@pytest.mark.parametrize("channel, field", [
    ({"downlink": {"loss": "1%", "gilbert_elliott": {"p": "1%"}}}, "channel.downlink"),
    ({"downlink": {"rate": "1Mbit", "trace": "x.csv"}}, "channel.downlink"),
    ({"downlink": {"gilbert_elliott": {"p": "150%"}}}, "channel.downlink.gilbert_elliott.p"),
    ({"downlink": {"delay_distribution": "cauchy"}}, "channel.downlink.delay_distribution"),
    ({"downlink": {"outages": [{"at": "-1s", "duration": "1s"}]}}, "channel.downlink.outages.0.at"),
    ({"downlink": {"trace": "/nonexistent/trace.down"}}, "channel"),
    ({"downlink": {"mss": 0}}, "channel.downlink.mss"),
])
def test_bad_channel_sections_name_the_field(channel: dict[str, Any], field: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        scenario_with(channel)
    assert f"  {field}:" in str(caught.value)


def test_resolved_scenario_round_trips_with_the_new_fields(tmp_path: Path) -> None:
    trace = tmp_path / "rates.csv"
    trace.write_text("0,100kbit\n2,50kbit\n")
    scenario = scenario_with({"downlink": {"trace": str(trace), "gilbert_elliott": {"p": "1%"},
                                           "outages": [{"at": "1s", "duration": "1s"}]}})
    assert parse_scenario(yaml.safe_load(scenario.to_yaml())) == scenario
