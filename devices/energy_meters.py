"""Measured energy: power readers (Jetson INA3221 sysfs, INA219 over I2C, the profile model) and a per-phase integrator."""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from devices.profiles import DeviceProfile
from devices.errors import DeviceError
from testbed.core.plugins import ENERGY_METERS, register_energy_meter

MEASURED_PHASES = ("receive", "apply", "evaluate", "idle")
JETSON_INPUT_RAILS = ("VDD_IN", "POM_5V_IN")  # whole-module input on JetPack 5 (Orin, Xavier NX) / JetPack 4 (Nano, TX2)
HWMON_GLOB = "bus/i2c/drivers/ina3221/*/hwmon/hwmon*"
IIO_GLOB = "bus/i2c/devices/*/iio:device*"
DEFAULT_PERIOD_S = 0.05


class EnergyMeterError(DeviceError):
    """A power reader that cannot be opened or read, or samples that cannot be integrated."""


@dataclass(frozen=True)
class PowerSample:
    """Whole-board power `watts` at monotonic time `t_s`."""

    t_s: float
    watts: float


@runtime_checkable
class EnergyMeter(Protocol):
    """Anything that reads the board's power now; `period_s` is the sampling period it is meant for."""

    name: str
    period_s: float

    def sample(self) -> PowerSample: ...


# --- readers ------------------------------------------------------------------------------------------

class ModelEnergyMeter:
    """The device profile's power for the state the agent says it is in (no hardware)."""

    name = "model"

    def __init__(self, profile: DeviceProfile, period_s: float = DEFAULT_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.profile = profile
        self.period_s = period_s
        self.clock = clock
        self.state = "idle"
        self._powers = {
            "idle": profile.idle_power_w, "receive": profile.radio_rx_power_w,
            "transmit": profile.radio_tx_power_w, "compute": profile.compute_power_w,
            "apply": profile.compute_power_w, "evaluate": profile.compute_power_w,
        }

    def set_state(self, state: str) -> None:
        if state not in self._powers:
            raise EnergyMeterError(f"unknown power state {state!r}; known: {', '.join(self._powers)}")
        self.state = state

    def sample(self) -> PowerSample:
        return PowerSample(self.clock(), self._powers[self.state])


def _read_number(path: Path) -> float:
    try:
        text = path.read_text()
    except OSError as error:
        raise EnergyMeterError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        return float(int(text.strip()))
    except ValueError:
        raise EnergyMeterError(f"{path} does not hold an integer reading: {text[:40]!r}") from None


def _read_label(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as error:
        raise EnergyMeterError(f"cannot read {path}: {error.strerror or error}") from None


@dataclass(frozen=True)
class Rail:
    """One INA3221 channel: its label and how to read its watts from sysfs."""

    name: str
    files: tuple[Path, ...]  # hwmon: (mV, mA); iio: (mW,)

    def watts(self) -> float:
        if len(self.files) == 2:
            return _read_number(self.files[0]) * _read_number(self.files[1]) / 1e6
        return _read_number(self.files[0]) / 1e3


def discover_ina3221_rails(sysfs_root: Path) -> list[Rail]:
    """INA3221 rails under `sysfs_root`: the hwmon layout (JetPack 5) if present, else iio (JetPack 4)."""
    rails: list[Rail] = []
    for directory in sorted(sysfs_root.glob(HWMON_GLOB)):
        for channel in (1, 2, 3):
            voltage = directory / f"in{channel}_input"
            enable = directory / f"in{channel}_enable"
            if not voltage.exists() or (enable.exists() and _read_number(enable) == 0):
                continue
            label = directory / f"in{channel}_label"
            name = _read_label(label) if label.exists() else f"{directory.parent.parent.name}:channel{channel}"
            rails.append(Rail(name, (voltage, directory / f"curr{channel}_input")))
    if rails:
        return rails
    for directory in sorted(sysfs_root.glob(IIO_GLOB)):
        for label in sorted(directory.glob("rail_name_*")):
            channel = label.name.removeprefix("rail_name_")
            rails.append(Rail(_read_label(label), (directory / f"in_power{channel}_input",)))
    return rails


class Ina3221SysfsMeter:
    """INA3221 rails via the Linux sysfs, in both layouts.

    hwmon (JetPack 5): ``bus/i2c/drivers/ina3221/*/hwmon/hwmon*/in{N}_input`` (mV), ``curr{N}_input`` (mA),
    ``in{N}_label``. iio (JetPack 4.x): ``bus/i2c/devices/*/iio:device*/in_power{N}_input`` (mW),
    ``rail_name_{N}``. The total is `input_rail` if named (on a Jetson the input rail already includes the
    others, so summing would double count), else the sum of all rails (independent supplies).
    """

    name = "ina3221"

    def __init__(self, sysfs_root: Path | str = "/sys", input_rail: str | None = None,
                 period_s: float = DEFAULT_PERIOD_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.sysfs_root = Path(sysfs_root)
        self.period_s = period_s
        self.clock = clock
        self.rails = discover_ina3221_rails(self.sysfs_root)
        if not self.rails:
            raise EnergyMeterError(
                f"no INA3221 rails under {self.sysfs_root}: looked for {self.sysfs_root / HWMON_GLOB}/in*_input "
                f"and {self.sysfs_root / IIO_GLOB}/rail_name_*; is the ina3221 driver loaded?"
            )
        by_name = {rail.name: rail for rail in self.rails}
        if input_rail is not None and input_rail not in by_name:
            raise EnergyMeterError(f"input rail {input_rail!r} not found; rails: {', '.join(by_name)}")
        self.input_rail = input_rail
        self._total = [by_name[input_rail]] if input_rail is not None else self.rails
        self.sample()  # fail now, naming the file, rather than mid-run

    def rail_watts(self) -> dict[str, float]:
        """Watts of every rail now."""
        return {rail.name: rail.watts() for rail in self.rails}

    def sample(self) -> PowerSample:
        return PowerSample(self.clock(), sum(rail.watts() for rail in self._total))


class JetsonEnergyMeter(Ina3221SysfsMeter):
    """A Jetson's on-module INA3221: the total is the input rail (VDD_IN or POM_5V_IN), never the sum."""

    name = "jetson"

    def __init__(self, sysfs_root: Path | str = "/sys", period_s: float = DEFAULT_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        names = [rail.name for rail in discover_ina3221_rails(Path(sysfs_root))]
        input_rail = next((name for name in JETSON_INPUT_RAILS if name in names), None)
        if names and input_rail is None:
            raise EnergyMeterError(
                f"no Jetson input rail ({' or '.join(JETSON_INPUT_RAILS)}) among the INA3221 rails {names} under "
                f"{sysfs_root}; use the ina3221 reader with input_rail= naming the board's input rail"
            )
        super().__init__(sysfs_root, input_rail, period_s, clock)


class Ina219EnergyMeter:
    """An INA219 on I2C through the `pi-ina219` library (`pip install pi-ina219`)."""

    name = "ina219"

    def __init__(self, shunt_ohms: float = 0.1, max_expected_amps: float | None = None, address: int = 0x40,
                 busnum: int | None = None, period_s: float = DEFAULT_PERIOD_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        try:
            ina219 = importlib.import_module("ina219")
        except ImportError:
            raise EnergyMeterError(
                "the ina219 reader needs the pi-ina219 library: pip install pi-ina219 (and enable I2C), "
                "or choose --energy model"
            ) from None
        self.period_s = period_s
        self.clock = clock
        try:
            self._device = ina219.INA219(shunt_ohms, max_expected_amps, busnum=busnum, address=address)
            self._device.configure()
        except (OSError, RuntimeError, ValueError) as error:
            raise EnergyMeterError(f"no INA219 answers at I2C address {address:#04x} (bus {busnum}): {error}") from None

    def sample(self) -> PowerSample:
        try:
            milliwatts = float(self._device.power())
        except (OSError, RuntimeError, ValueError) as error:  # the library's DeviceRangeError is a ValueError
            raise EnergyMeterError(f"INA219 read failed: {error}") from None
        return PowerSample(self.clock(), milliwatts / 1e3)


def jetson_sysfs_present(sysfs_root: Path | str = "/sys") -> bool:
    """Whether an INA3221 with a Jetson input rail shows in sysfs."""
    try:
        return any(rail.name in JETSON_INPUT_RAILS for rail in discover_ina3221_rails(Path(sysfs_root)))
    except EnergyMeterError:
        return False


def ina219_present(address: int = 0x40, busnum: int | None = None) -> bool:
    """Whether pi-ina219 imports and an INA219 answers at `address`."""
    try:
        Ina219EnergyMeter(address=address, busnum=busnum).sample()
    except EnergyMeterError:
        return False
    return True


def choose_energy_meter(sysfs_root: Path | str = "/sys",
                        ina219_probe: Callable[[], bool] = ina219_present) -> str:
    """What `auto` picks: jetson if its sysfs is there, else ina219 if it answers, else model."""
    if jetson_sysfs_present(sysfs_root):
        return "jetson"
    if ina219_probe():
        return "ina219"
    return "model"


READER_OPTIONS = {"input_rail", "ina219_address", "ina219_shunt_ohms"}  # what open_energy_meter passes on


@register_energy_meter("model")
def _model(profile: DeviceProfile, period_s: float, clock: Callable[[], float], **_: Any) -> EnergyMeter:
    return ModelEnergyMeter(profile, period_s, clock)


@register_energy_meter("jetson")
def _jetson(sysfs_root: Path | str, period_s: float, clock: Callable[[], float], **_: Any) -> EnergyMeter:
    return JetsonEnergyMeter(sysfs_root, period_s, clock)


@register_energy_meter("ina3221")
def _ina3221(sysfs_root: Path | str, period_s: float, clock: Callable[[], float],
             input_rail: str | None = None, **_: Any) -> EnergyMeter:
    return Ina3221SysfsMeter(sysfs_root, input_rail, period_s, clock)


@register_energy_meter("ina219")
def _ina219(period_s: float, clock: Callable[[], float], ina219_address: int = 0x40,
            ina219_shunt_ohms: float = 0.1, **_: Any) -> EnergyMeter:
    return Ina219EnergyMeter(ina219_shunt_ohms, address=ina219_address, period_s=period_s, clock=clock)


def open_energy_meter(
    name: str, profile: DeviceProfile, *, sysfs_root: Path | str = "/sys", period_s: float = DEFAULT_PERIOD_S,
    clock: Callable[[], float] = time.monotonic, ina219_probe: Callable[[], bool] | None = None, **options: Any,
) -> EnergyMeter:
    """The reader registered as `name` (`auto` chooses, see `choose_energy_meter`)."""
    if name == "auto":
        name = choose_energy_meter(sysfs_root, ina219_probe or (lambda: ina219_present(options.get("ina219_address", 0x40))))
    if name not in ENERGY_METERS.names():
        raise EnergyMeterError(f"unknown energy reader {name!r}; known: auto, {', '.join(ENERGY_METERS.names())}")
    if not period_s > 0:
        raise EnergyMeterError(f"period_s must be positive, got {period_s}")
    unknown = set(options) - READER_OPTIONS
    if unknown:
        raise EnergyMeterError(f"unknown energy reader options {sorted(unknown)}; known: {sorted(READER_OPTIONS)}")
    return ENERGY_METERS.get(name)(profile=profile, sysfs_root=sysfs_root, period_s=period_s, clock=clock, **options)


# --- integration --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhaseEnergy:
    """Joules and seconds per phase, integrated from measured power, with how it was sampled."""

    joules_by_phase: dict[str, float]
    seconds_by_phase: dict[str, float]
    sampling_period_s: float  # the meter's nominal period
    mean_sample_interval_s: float | None  # what the samples actually show (None with < 2 samples)
    sample_count: int
    extrapolated_s: float  # time before the first / after the last sample, held at the nearest reading

    @property
    def total_joules(self) -> float:
        return sum(self.joules_by_phase.values())


class EnergyIntegrator:
    """Trapezoidal integral of power samples, split by phase at the moments the agent changes phase.

    Feed `begin_phase(name, t_s)` and `add_sample(sample)` in time order (never going back), then
    `finish(t_s)`. A phase boundary between two samples splits that trapezoid at the linearly
    interpolated power, so a trace that is linear between samples integrates exactly. Before the first
    sample and after the last the nearest reading is held, and that time is reported as `extrapolated_s`
    (take a sample at the end to avoid it). Time before the first phase is not booked. Memory is constant.
    """

    def __init__(self, sampling_period_s: float, phases: Sequence[str] = MEASURED_PHASES) -> None:
        if not sampling_period_s > 0:
            raise EnergyMeterError(f"sampling_period_s must be positive, got {sampling_period_s}")
        self.sampling_period_s = sampling_period_s
        self._joules = {phase: 0.0 for phase in phases}
        self._seconds = {phase: 0.0 for phase in phases}
        self._phase: str | None = None
        self._phase_since = 0.0
        self._owner: str | None = None  # phase current at the last sample
        self._cuts: list[tuple[float, str]] = []  # phase boundaries since the last sample
        self._first: PowerSample | None = None
        self._last: PowerSample | None = None
        self._count = 0
        self._extrapolated_s = 0.0
        self._now = -math.inf
        self._finished = False

    def _advance(self, t_s: float, what: str) -> None:
        if self._finished:
            raise EnergyMeterError(f"{what} after finish(); start a new EnergyIntegrator")
        if not math.isfinite(t_s) or t_s < self._now:
            raise EnergyMeterError(f"{what} at t={t_s} goes back before t={self._now}; feed events in time order")
        self._now = t_s

    def begin_phase(self, phase: str, t_s: float) -> None:
        """From `t_s` on, energy is booked to `phase` (the previous phase ends there)."""
        if phase not in self._joules:
            raise EnergyMeterError(f"unknown phase {phase!r}; phases: {', '.join(self._joules)}")
        self._advance(t_s, f"phase {phase!r}")
        if self._phase is not None:
            self._seconds[self._phase] += t_s - self._phase_since
        self._phase, self._phase_since = phase, t_s
        self._cuts.append((t_s, phase))

    def add_sample(self, sample: PowerSample) -> None:
        """One power reading; books the stretch since the previous reading."""
        if not math.isfinite(sample.watts) or sample.watts < 0:
            raise EnergyMeterError(f"power sample {sample.watts} W at t={sample.t_s} is not a finite non-negative number")
        self._advance(sample.t_s, "power sample")
        previous = self._last
        if previous is None:
            self._first = sample
            self._book(None, sample.t_s, lambda t: sample.watts, extrapolated=True)
        else:
            span = sample.t_s - previous.t_s
            slope = (sample.watts - previous.watts) / span if span > 0 else 0.0
            self._book(previous.t_s, sample.t_s, lambda t: previous.watts + slope * (t - previous.t_s))
        self._last = sample
        self._owner = self._phase
        self._count += 1

    def finish(self, t_s: float) -> PhaseEnergy:
        """End the current phase at `t_s` and return what was integrated."""
        self._advance(t_s, "finish")
        last, first = self._last, self._first
        if last is None or first is None:
            raise EnergyMeterError("no power samples were recorded; cannot integrate energy")
        self._book(last.t_s, t_s, lambda t: last.watts, extrapolated=True)
        if self._phase is not None:
            self._seconds[self._phase] += t_s - self._phase_since
        self._finished = True
        return PhaseEnergy(
            joules_by_phase=dict(self._joules),
            seconds_by_phase=dict(self._seconds),
            sampling_period_s=self.sampling_period_s,
            mean_sample_interval_s=(last.t_s - first.t_s) / (self._count - 1) if self._count > 1 else None,
            sample_count=self._count,
            extrapolated_s=self._extrapolated_s,
        )

    def _book(self, start: float | None, end: float, power: Callable[[float], float], extrapolated: bool = False) -> None:
        points = ([start] if start is not None else []) + [t for t, _ in self._cuts] + [end]
        owners = ([self._owner] if start is not None else []) + [phase for _, phase in self._cuts]
        for a, b, owner in zip(points, points[1:], owners):
            if owner is None or b <= a:
                continue
            self._joules[owner] += (power(a) + power(b)) / 2.0 * (b - a)
            if extrapolated:
                self._extrapolated_s += b - a
        self._cuts.clear()


def integrate_phases(samples: Iterable[PowerSample], phase_starts: Iterable[tuple[str, float]], end_s: float,
                     sampling_period_s: float, phases: Sequence[str] = MEASURED_PHASES) -> PhaseEnergy:
    """Joules per phase of a recorded trace: phases begin at `phase_starts` ((name, t_s)), the last ends at `end_s`."""
    integrator = EnergyIntegrator(sampling_period_s, phases)
    events: list[tuple[float, int, Any]] = [(sample.t_s, 1, sample) for sample in samples]
    events += [(t_s, 0, phase) for phase, t_s in phase_starts]
    for t_s, kind, item in sorted(events, key=lambda event: (event[0], event[1])):
        if kind == 0:
            integrator.begin_phase(item, t_s)
        else:
            integrator.add_sample(item)
    return integrator.finish(end_s)
