"""A board's measured energy: power samples integrated per phase between reports, in the names reports use."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from devices.energy_meters import (
    EnergyIntegrator,
    EnergyMeter,
    ModelEnergyMeter,
    PhaseEnergy,
)

BOARD_PHASES = ("receive", "apply", "evaluate", "transmit", "idle")
MODELLED_PHASE_OF = {"receive": "receive", "apply": "compute", "evaluate": "compute", "transmit": "transmit",
                     "idle": "idle"}  # measured phase -> the phase names emulated devices report


class BoardEnergy:
    """Samples `meter` every period (`run`), books the time to the current phase, closes a round per report.

    With the `model` reader the meter follows the phase (its power is the profile's for that state); with
    a hardware reader the phase only decides where the measured joules are booked.
    """

    def __init__(self, meter: EnergyMeter) -> None:
        self.meter = meter
        self.phase = "idle"
        self.total_joules = 0.0
        self._integrator = self._new_integrator("idle", time.monotonic())

    def _new_integrator(self, phase: str, t_s: float) -> EnergyIntegrator:
        integrator = EnergyIntegrator(self.meter.period_s, BOARD_PHASES)
        integrator.begin_phase(phase, t_s)
        return integrator

    def begin_phase(self, phase: str) -> None:
        self.phase = phase
        if isinstance(self.meter, ModelEnergyMeter):
            self.meter.set_state(phase)
        self._integrator.begin_phase(phase, time.monotonic())

    async def run(self) -> None:
        """Sample power until cancelled (a reader that fails ends it with its EnergyMeterError)."""
        while True:
            self._integrator.add_sample(self.meter.sample())
            await asyncio.sleep(self.meter.period_s)

    def close_round(self) -> PhaseEnergy:
        """Energy since the last report; a new integral starts now, in the current phase."""
        sample = self.meter.sample()
        self._integrator.add_sample(sample)
        energy = self._integrator.finish(sample.t_s)
        self._integrator = self._new_integrator(self.phase, sample.t_s)
        self._integrator.add_sample(sample)
        self.total_joules += energy.total_joules
        return energy

    def report_fields(self, energy: PhaseEnergy) -> dict[str, Any]:
        """The energy part of a device report: common phase names, plus what was measured and how."""
        joules: dict[str, float] = {"receive": 0.0, "transmit": 0.0, "compute": 0.0, "idle": 0.0}
        seconds: dict[str, float] = dict.fromkeys(joules, 0.0)
        for phase, modelled in MODELLED_PHASE_OF.items():
            joules[modelled] += energy.joules_by_phase[phase]
            seconds[modelled] += energy.seconds_by_phase[phase]
        return {
            "energy_joules": energy.total_joules,
            "energy_joules_by_phase": joules,
            "phase_seconds": seconds,
            "measured_energy": {
                "meter": self.meter.name,
                "joules_by_phase": energy.joules_by_phase,
                "seconds_by_phase": energy.seconds_by_phase,
                "sampling_period_s": energy.sampling_period_s,
                "mean_sample_interval_s": energy.mean_sample_interval_s,
                "sample_count": energy.sample_count,
                "extrapolated_s": energy.extrapolated_s,
            },
            "total_energy_joules": self.total_joules,
        }
