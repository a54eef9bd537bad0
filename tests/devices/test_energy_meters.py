"""Energy readers against fake sysfs trees with known power traces, and the per-phase trapezoidal integrator."""

from __future__ import annotations

import sys
import types
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.core.plugins import ENERGY_METERS
from devices.energy_meters import (

    EnergyIntegrator,
    EnergyMeter,
    EnergyMeterError,
    Ina219EnergyMeter,
    Ina3221SysfsMeter,
    JetsonEnergyMeter,
    ModelEnergyMeter,
    PowerSample,
    choose_energy_meter,
    ina219_present,
    integrate_phases,
    open_energy_meter,
)
from devices.profiles import get_device_profile

# Breakpoints (t_s, watts) of a piecewise-linear trace; between breakpoints it is linear, and on the
# 0.1 s sampling grid every value is a whole number of mA at 5 V and of mW.
TRACE = [(0.0, 2.0), (0.5, 6.0), (1.2, 6.0), (1.6, 3.0), (2.0, 2.5)]
GRID = [round(0.1 * step, 10) for step in range(21)]
PHASE_STARTS = [("receive", 0.0), ("apply", 0.33), ("evaluate", 0.77), ("idle", 1.45)]
END_S = 2.0


def trace_watts(t: float, trace: list[tuple[float, float]] = TRACE) -> float:
    for (t0, p0), (t1, p1) in pairwise(trace):
        if t0 <= t <= t1:
            return p0 + (p1 - p0) * (t - t0) / (t1 - t0)
    raise ValueError(t)


def exact_integral(a: float, b: float, trace: list[tuple[float, float]] = TRACE) -> float:
    """∫_a^b of the piecewise-linear trace, from each piece's antiderivative."""
    total = 0.0
    for (t0, p0), (t1, p1) in pairwise(trace):
        lo, hi = max(a, t0), min(b, t1)
        if hi > lo:
            slope = (p1 - p0) / (t1 - t0)
            total += p0 * (hi - lo) + slope / 2 * ((hi - t0) ** 2 - (lo - t0) ** 2)
    return total


def expected_by_phase() -> dict[str, float]:
    bounds = [t for _, t in PHASE_STARTS] + [END_S]
    return {phase: exact_integral(a, b) for (phase, _), a, b in zip(PHASE_STARTS, bounds, bounds[1:])}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{value}\n")


def hwmon_tree(root: Path, rails: dict[str, tuple[int, int]]) -> Path:
    """JetPack 5 layout: hwmon of the ina3221 driver, rails as {label: (mV, mA)}."""
    directory = root / "bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"
    for channel, (label, (millivolts, milliamps)) in enumerate(rails.items(), start=1):
        write(directory / f"in{channel}_label", label)
        write(directory / f"in{channel}_input", millivolts)
        write(directory / f"curr{channel}_input", milliamps)
        write(directory / f"in{channel}_enable", 1)
    write(directory / "in4_input", 40)  # shunt voltages and their sum: not rails, must be ignored
    write(directory / "in7_input", 120)
    write(directory / "curr4_input", 1800)
    write(directory / "name", "ina3221")
    return directory


def iio_tree(root: Path, rails: dict[str, int]) -> Path:
    """JetPack 4.x layout: iio device of the ina3221x driver, rails as {name: mW}."""
    directory = root / "bus/i2c/devices/6-0040/iio:device0"
    for channel, (name, milliwatts) in enumerate(rails.items()):
        write(directory / f"rail_name_{channel}", name)
        write(directory / f"in_power{channel}_input", milliwatts)
        write(directory / f"in_voltage{channel}_input", 5000)
        write(directory / f"in_current{channel}_input", milliwatts // 5)
    return directory


# --- sysfs readers ------------------------------------------------------------------------------------

def test_hwmon_total_is_the_input_rail_not_the_sum(tmp_path):
    hwmon_tree(tmp_path, {"VDD_IN": (5000, 1200), "VDD_CPU_GPU_CV": (5000, 400), "VDD_SOC": (5000, 300)})
    meter = JetsonEnergyMeter(tmp_path, clock=Clock())
    assert meter.input_rail == "VDD_IN"
    assert meter.sample().watts == pytest.approx(6.0)  # not 9.5
    assert meter.rail_watts() == pytest.approx({"VDD_IN": 6.0, "VDD_CPU_GPU_CV": 2.0, "VDD_SOC": 1.5})
    assert Ina3221SysfsMeter(tmp_path).sample().watts == pytest.approx(9.5)  # independent supplies: the sum
    assert Ina3221SysfsMeter(tmp_path, input_rail="VDD_SOC").sample().watts == pytest.approx(1.5)


def test_iio_total_is_the_input_rail_not_the_sum(tmp_path):
    iio_tree(tmp_path, {"POM_5V_IN": 4200, "POM_5V_GPU": 900, "POM_5V_CPU": 1300})
    meter = JetsonEnergyMeter(tmp_path)
    assert meter.input_rail == "POM_5V_IN"
    assert meter.sample().watts == pytest.approx(4.2)
    assert meter.rail_watts() == pytest.approx({"POM_5V_IN": 4.2, "POM_5V_GPU": 0.9, "POM_5V_CPU": 1.3})


def test_disabled_hwmon_channel_is_skipped(tmp_path):
    directory = hwmon_tree(tmp_path, {"VDD_IN": (5000, 1000), "VDD_SOC": (5000, 100), "spare": (0, 0)})
    write(directory / "in3_enable", 0)
    assert [rail.name for rail in JetsonEnergyMeter(tmp_path).rails] == ["VDD_IN", "VDD_SOC"]


@pytest.mark.parametrize("layout", ["hwmon", "iio"])
def test_constant_power_integrates_exactly(tmp_path, layout):
    if layout == "hwmon":
        hwmon_tree(tmp_path, {"VDD_IN": (5000, 700), "VDD_SOC": (5000, 200)})  # 3.5 W
    else:
        iio_tree(tmp_path, {"POM_5V_IN": 3500, "POM_5V_CPU": 1000})
    clock = Clock()
    meter = open_energy_meter("jetson", get_device_profile("jetson-nano"), sysfs_root=tmp_path, period_s=0.1, clock=clock)
    integrator = EnergyIntegrator(meter.period_s)
    pending = list(PHASE_STARTS)  # phase changes happen between samples, as in a running agent
    for t in GRID:
        while pending and pending[0][1] <= t:
            integrator.begin_phase(*pending.pop(0))
        clock.now = t
        integrator.add_sample(meter.sample())
    result = integrator.finish(END_S)
    bounds = [t for _, t in PHASE_STARTS] + [END_S]
    for (phase, _), a, b in zip(PHASE_STARTS, bounds, bounds[1:]):
        assert result.joules_by_phase[phase] == pytest.approx(3.5 * (b - a), rel=1e-12)
        assert result.seconds_by_phase[phase] == pytest.approx(b - a)
    assert result.total_joules == pytest.approx(3.5 * 2.0)
    assert result.sampling_period_s == 0.1
    assert result.mean_sample_interval_s == pytest.approx(0.1)
    assert result.sample_count == 21 and result.extrapolated_s == 0.0


@pytest.mark.parametrize("layout", ["hwmon", "iio"])
def test_piecewise_linear_trace_integrates_exactly_per_phase(tmp_path, layout):
    if layout == "hwmon":
        directory = hwmon_tree(tmp_path, {"VDD_IN": (5000, 0), "VDD_CPU_GPU_CV": (5000, 100)})

        def set_power(watts: float) -> None:
            write(directory / "curr1_input", round(watts * 200))  # mA at 5000 mV
    else:
        directory = iio_tree(tmp_path, {"POM_5V_GPU": 500, "POM_5V_IN": 0})

        def set_power(watts: float) -> None:
            write(directory / "in_power1_input", round(watts * 1000))
    clock = Clock()
    meter = JetsonEnergyMeter(tmp_path, period_s=0.1, clock=clock)
    samples = []
    for t in GRID:
        set_power(trace_watts(t))
        clock.now = t
        samples.append(meter.sample())
    assert [sample.watts for sample in samples] == pytest.approx([trace_watts(t) for t in GRID])
    result = integrate_phases(samples, PHASE_STARTS, END_S, meter.period_s)
    assert result.joules_by_phase == pytest.approx(expected_by_phase(), rel=1e-12)
    assert result.total_joules == pytest.approx(exact_integral(0.0, END_S), rel=1e-12)


def test_missing_and_garbled_files_name_the_file(tmp_path):
    directory = hwmon_tree(tmp_path, {"VDD_IN": (5000, 1000)})
    (directory / "curr1_input").unlink()
    with pytest.raises(EnergyMeterError, match=r"cannot read .*hwmon3/curr1_input"):
        JetsonEnergyMeter(tmp_path)
    write(directory / "curr1_input", "12.5mA?")
    with pytest.raises(EnergyMeterError, match=r"hwmon3/curr1_input does not hold an integer reading: '12.5mA\?"):
        JetsonEnergyMeter(tmp_path)
    write(directory / "curr1_input", 1000)
    meter = JetsonEnergyMeter(tmp_path)
    (directory / "in1_input").unlink()  # the rail vanishes mid-run
    with pytest.raises(EnergyMeterError, match=r"hwmon3/in1_input"):
        meter.sample()


def test_garbled_iio_power_names_the_file(tmp_path):
    directory = iio_tree(tmp_path, {"POM_5V_IN": 4000})
    write(directory / "in_power0_input", "")
    with pytest.raises(EnergyMeterError, match=r"iio:device0/in_power0_input does not hold an integer"):
        JetsonEnergyMeter(tmp_path)
    (directory / "in_power0_input").unlink()
    with pytest.raises(EnergyMeterError, match=r"cannot read .*iio:device0/in_power0_input"):
        JetsonEnergyMeter(tmp_path)


def test_no_rails_or_no_input_rail(tmp_path):
    with pytest.raises(EnergyMeterError, match="no INA3221 rails under .*ina3221 driver"):
        JetsonEnergyMeter(tmp_path)
    hwmon_tree(tmp_path, {"GPU": (5000, 100), "CPU": (5000, 100)})  # AGX Xavier style: no input rail
    with pytest.raises(EnergyMeterError, match=r"no Jetson input rail .*input_rail="):
        JetsonEnergyMeter(tmp_path)
    with pytest.raises(EnergyMeterError, match="'SYS5V' not found; rails: GPU, CPU"):
        Ina3221SysfsMeter(tmp_path, input_rail="SYS5V")


# --- INA219, model, auto ------------------------------------------------------------------------------

def fake_ina219_module(milliwatts: float = 1234.0, fail: Exception | None = None) -> types.ModuleType:
    module = types.ModuleType("ina219")

    class INA219:
        def __init__(self, shunt_ohms, max_expected_amps=None, busnum=None, address=0x40):
            self.address = address

        def configure(self):
            if fail is not None:
                raise fail

        def power(self):
            return milliwatts

    module.INA219 = INA219
    return module


def test_ina219_reads_milliwatts(monkeypatch):
    monkeypatch.setitem(sys.modules, "ina219", fake_ina219_module(1234.0))
    meter = Ina219EnergyMeter(clock=lambda: 7.0)
    assert meter.sample() == PowerSample(7.0, pytest.approx(1.234))
    assert ina219_present()


def test_ina219_without_library_or_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "ina219", None)  # import fails as if not installed
    with pytest.raises(EnergyMeterError, match="pip install pi-ina219"):
        Ina219EnergyMeter()
    assert not ina219_present()
    monkeypatch.setitem(sys.modules, "ina219", fake_ina219_module(fail=OSError(121, "Remote I/O error")))
    with pytest.raises(EnergyMeterError, match="no INA219 answers at I2C address 0x40"):
        Ina219EnergyMeter()
    assert not ina219_present()


def test_model_meter_follows_the_state():
    profile = get_device_profile("rpi4")
    meter = ModelEnergyMeter(profile, clock=lambda: 1.5)
    assert isinstance(meter, EnergyMeter)
    assert meter.sample() == PowerSample(1.5, profile.idle_power_w)
    meter.set_state("evaluate")
    assert meter.sample().watts == profile.compute_power_w
    meter.set_state("receive")
    assert meter.sample().watts == profile.radio_rx_power_w
    with pytest.raises(EnergyMeterError, match="unknown power state 'dancing'"):
        meter.set_state("dancing")


def test_auto_choice(tmp_path):
    assert set(ENERGY_METERS.names()) == {"model", "ina219", "ina3221", "jetson"}
    profile = get_device_profile("jetson-nano")
    assert choose_energy_meter(tmp_path, ina219_probe=lambda: False) == "model"
    assert choose_energy_meter(tmp_path, ina219_probe=lambda: True) == "ina219"
    assert isinstance(open_energy_meter("auto", profile, sysfs_root=tmp_path, ina219_probe=lambda: False),
                      ModelEnergyMeter)
    hwmon_tree(tmp_path / "no-input", {"GPU": (5000, 100)})  # rails but no Jetson input rail: not a Jetson
    assert choose_energy_meter(tmp_path / "no-input", ina219_probe=lambda: False) == "model"
    iio_tree(tmp_path / "nano", {"POM_5V_IN": 2000})
    assert choose_energy_meter(tmp_path / "nano", ina219_probe=lambda: True) == "jetson"
    hwmon_tree(tmp_path / "orin", {"VDD_IN": (5000, 100)})
    meter = open_energy_meter("auto", profile, sysfs_root=tmp_path / "orin", ina219_probe=lambda: True)
    assert isinstance(meter, JetsonEnergyMeter) and meter.name == "jetson"


def test_auto_uses_ina219_when_it_answers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ina219", fake_ina219_module(2500.0))
    meter = open_energy_meter("auto", get_device_profile("rpi4"), sysfs_root=tmp_path)
    assert meter.name == "ina219" and meter.sample().watts == pytest.approx(2.5)


def test_unknown_reader_and_bad_period(tmp_path):
    profile = get_device_profile("rpi4")
    with pytest.raises(EnergyMeterError, match="unknown energy reader 'ina226'; known: auto, ina219"):
        open_energy_meter("ina226", profile)
    with pytest.raises(EnergyMeterError, match="period_s must be positive"):
        open_energy_meter("model", profile, period_s=0)
    with pytest.raises(EnergyMeterError, match=r"unknown energy reader options \['input_rale'\]"):
        open_energy_meter("ina3221", profile, sysfs_root=tmp_path, input_rale="VDD_IN")
    hwmon_tree(tmp_path, {"VDD_IN": (5000, 100), "VDD_SOC": (5000, 100)})
    assert open_energy_meter("ina3221", profile, sysfs_root=tmp_path, input_rail="VDD_SOC").sample().watts == pytest.approx(0.5)


# --- the integrator -----------------------------------------------------------------------------------

@given(
    st.lists(st.tuples(st.floats(0.001, 1.0), st.floats(0.0, 20.0)), min_size=1, max_size=30),
    st.floats(0.0, 20.0),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=6),
)
def test_integrator_is_exact_for_traces_linear_between_samples(steps, first_watts, phase_fractions):
    trace = [(0.0, first_watts)]
    for step, watts in steps:
        trace.append((trace[-1][0] + step, watts))
    end = trace[-1][0]
    starts = sorted(fraction * end for fraction in phase_fractions)
    starts[0] = 0.0
    phases = ["receive", "apply", "evaluate", "idle"]
    phase_starts = [(phases[index % 4], start) for index, start in enumerate(starts)]
    samples = [PowerSample(t, watts) for t, watts in trace]
    result = integrate_phases(samples, phase_starts, end, sampling_period_s=0.5)
    expected = dict.fromkeys(phases, 0.0)
    bounds = starts + [end]
    for (phase, _), a, b in zip(phase_starts, bounds, bounds[1:]):
        expected[phase] += exact_integral(a, b, trace)
    assert result.joules_by_phase == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert result.total_joules == pytest.approx(exact_integral(0.0, end, trace), rel=1e-9, abs=1e-9)
    assert sum(result.seconds_by_phase.values()) == pytest.approx(end)
    assert result.extrapolated_s == 0.0


def test_integrator_holds_the_nearest_reading_outside_the_samples():
    integrator = EnergyIntegrator(sampling_period_s=1.0)
    integrator.begin_phase("receive", 0.0)
    integrator.add_sample(PowerSample(1.0, 4.0))  # 0..1 s held at 4 W
    integrator.begin_phase("apply", 1.5)
    integrator.add_sample(PowerSample(2.0, 2.0))  # 1..1.5 receive at mean(4, 3); 1.5..2 apply at mean(3, 2)
    result = integrator.finish(3.0)  # 2..3 s held at 2 W
    assert result.joules_by_phase == pytest.approx({"receive": 4.0 + 1.75, "apply": 1.25 + 2.0, "evaluate": 0.0, "idle": 0.0})
    assert result.extrapolated_s == pytest.approx(2.0)
    assert result.mean_sample_interval_s == pytest.approx(1.0)


def test_integrator_misuse():
    integrator = EnergyIntegrator(sampling_period_s=0.1)
    with pytest.raises(EnergyMeterError, match="unknown phase 'sleep'"):
        integrator.begin_phase("sleep", 0.0)
    integrator.add_sample(PowerSample(1.0, 1.0))
    with pytest.raises(EnergyMeterError, match="goes back"):
        integrator.add_sample(PowerSample(0.5, 1.0))
    with pytest.raises(EnergyMeterError, match="not a finite non-negative"):
        integrator.add_sample(PowerSample(2.0, float("nan")))
    integrator.finish(2.0)
    with pytest.raises(EnergyMeterError, match="after finish"):
        integrator.add_sample(PowerSample(3.0, 1.0))
    with pytest.raises(EnergyMeterError, match="no power samples"):
        EnergyIntegrator(sampling_period_s=0.1).finish(1.0)
    with pytest.raises(EnergyMeterError, match="sampling_period_s"):
        EnergyIntegrator(sampling_period_s=0.0)
