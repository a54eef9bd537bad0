"""Tests of the named link profiles (channel.profiles)."""

from __future__ import annotations

import pytest

from testbed.core.plugins import LINK_PROFILES

PROFILES = LINK_PROFILES.load_all()


def test_known_profiles_exist_with_sources() -> None:
    expected = {"nb-iot", "lte-m", "wifi-weak", "ethernet", "lora-sf7", "lora-sf12", "ble", "3g", "satellite-geo"}
    assert expected <= set(PROFILES)
    for name, profile in PROFILES.items():
        assert profile.name == name
        assert profile.source.strip()
        assert profile.downlink.description and profile.uplink.description


@pytest.mark.parametrize(("name", "spreading_factor"), [("lora-sf7", 7), ("lora-sf12", 12)])
def test_lora_rate_is_the_phy_bit_rate(name: str, spreading_factor: int) -> None:
    # Semtech AN1200.22: Rb = SF * (4 / (4 + CR)) / (2^SF / BW), CR = 1 (4/5), BW = 125 kHz
    phy_bps = spreading_factor * (4 / 5) / (2**spreading_factor / 125_000)
    for params in (PROFILES[name].downlink, PROFILES[name].uplink):
        assert params.rate_bps == pytest.approx(phy_bps, rel=0.01)


def test_geo_one_way_delay_is_at_least_the_propagation_time() -> None:
    propagation_s = 2 * 35_786e3 / 299_792_458  # ground → satellite → ground at the sub-satellite point
    for params in (PROFILES["satellite-geo"].downlink, PROFILES["satellite-geo"].uplink):
        assert propagation_s <= params.delay_s <= 0.3
        assert 0.5 <= 2 * params.delay_s <= 0.65  # the familiar ~550-600 ms round trip
