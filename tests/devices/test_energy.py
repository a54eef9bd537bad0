"""Modelled energy: power of each state times the time in it, computed by hand for every profile."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devices.energy import ENERGY_PHASES, PhaseTimes, energy_by_phase, phase_times, radio_seconds
from devices.profiles import get_device_profile
from testbed.core.plugins import DEVICE_PROFILES, PluginError


@pytest.mark.parametrize("name", DEVICE_PROFILES.names())
def test_energy_by_phase_by_hand(name):
    profile = DEVICE_PROFILES.get(name)
    times = PhaseTimes(receive_s=2.0, transmit_s=0.5, compute_s=3.0, idle_s=10.0)
    energy = energy_by_phase(profile, times)
    assert set(energy) == set(ENERGY_PHASES)
    assert energy["receive"] == pytest.approx(profile.radio_rx_power_w * 2.0)
    assert energy["transmit"] == pytest.approx(profile.radio_tx_power_w * 0.5)
    assert energy["compute"] == pytest.approx(profile.compute_power_w * 3.0)
    assert energy["idle"] == pytest.approx(profile.idle_power_w * 10.0)


def test_energy_figures_for_the_shipped_profiles():
    times = PhaseTimes(receive_s=2.0, transmit_s=0.5, compute_s=3.0, idle_s=10.0)
    # jetson-nano: rx 2.35 W, tx 3.25 W, compute 5 W, idle 1.25 W
    assert sum(energy_by_phase(get_device_profile("jetson-nano"), times).values()) == pytest.approx(
        2.35 * 2 + 3.25 * 0.5 + 5.0 * 3 + 1.25 * 10)
    # rpi4: rx 3.1 W, tx 3.6 W, compute 6.4 W, idle 2.7 W
    assert sum(energy_by_phase(get_device_profile("rpi4"), times).values()) == pytest.approx(
        3.1 * 2 + 3.6 * 0.5 + 6.4 * 3 + 2.7 * 10)


def test_unknown_profile():
    with pytest.raises(PluginError, match="unknown device profile 'toaster'; choose one of jetson-nano, rpi4"):
        get_device_profile("toaster")


seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(seconds, seconds, seconds, seconds)
def test_phase_times_never_negative_idle(round_seconds, receive_s, transmit_s, compute_s):
    times = phase_times(round_seconds, receive_s, transmit_s, compute_s)
    assert times.idle_s >= 0
    assert (times.receive_s, times.transmit_s, times.compute_s) == (receive_s, transmit_s, compute_s)
    busy = receive_s + transmit_s + compute_s
    if busy <= round_seconds:
        assert busy + times.idle_s == pytest.approx(round_seconds)
    else:
        assert times.idle_s == 0


@given(st.sampled_from(DEVICE_PROFILES.names()), seconds, seconds, seconds, seconds)
def test_total_energy_is_between_idle_and_peak_power(name, round_seconds, receive_s, transmit_s, compute_s):
    profile = DEVICE_PROFILES.get(name)
    times = phase_times(round_seconds, receive_s, transmit_s, compute_s)
    total = sum(energy_by_phase(profile, times).values())
    accounted = times.receive_s + times.transmit_s + times.compute_s + times.idle_s
    powers = (profile.idle_power_w, profile.compute_power_w, profile.radio_rx_power_w, profile.radio_tx_power_w)
    assert min(powers) * accounted * (1 - 1e-9) <= total <= max(powers) * accounted * (1 + 1e-9)


def test_radio_seconds():
    assert radio_seconds(6250, 50_000) == pytest.approx(1.0)
    assert radio_seconds(0, 50_000) == 0.0
    assert radio_seconds(10**9, None) == 0.0
    assert radio_seconds(0, None) == 0.0


@pytest.mark.parametrize("rate", [0, 0.0, -1.0, math.nan])
def test_radio_seconds_refuses_a_non_positive_rate(rate):
    with pytest.raises(ValueError):
        radio_seconds(100, rate)


def test_radio_seconds_refuses_negative_bytes():
    with pytest.raises(ValueError):
        radio_seconds(-1, 50_000)


@pytest.mark.parametrize("field", ["receive_s", "transmit_s", "compute_s", "idle_s"])
@pytest.mark.parametrize("value", [-1e-9, -5.0, math.nan])
def test_phase_times_refuse_negative_or_nan(field, value):
    values = {"receive_s": 1.0, "transmit_s": 1.0, "compute_s": 1.0, "idle_s": 1.0, field: value}
    with pytest.raises(ValueError, match=field):
        PhaseTimes(**values)


@pytest.mark.parametrize("arguments", [(10.0, -1.0, 0.0, 0.0), (10.0, 0.0, -1.0, 0.0), (10.0, 0.0, 0.0, -1.0)])
def test_phase_times_function_refuses_negative_times(arguments):
    with pytest.raises(ValueError):
        phase_times(*arguments)


def test_a_round_clock_that_stepped_back_gives_zero_idle():
    # the agent measures the round with a wall clock, which can step backwards; that is idle 0, not an error
    assert phase_times(-0.5, 0.0, 0.0, 0.0).idle_s == 0.0
