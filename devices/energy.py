"""Modelled device energy: power of each state times the time spent in it."""

from __future__ import annotations

from dataclasses import dataclass

from devices.profiles import DeviceProfile

ENERGY_PHASES = ("receive", "transmit", "compute", "idle")


@dataclass(frozen=True)
class PhaseTimes:
    """Seconds a device spent in each power state during one round."""

    receive_s: float
    transmit_s: float
    compute_s: float
    idle_s: float

    def __post_init__(self) -> None:
        for name, value in (("receive_s", self.receive_s), ("transmit_s", self.transmit_s),
                            ("compute_s", self.compute_s), ("idle_s", self.idle_s)):
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must not be negative, got {value}")


def radio_seconds(wire_bytes: int, rate_bps: float | None) -> float:
    """Airtime of `wire_bytes` at the link rate (0 for an unlimited link)."""
    if wire_bytes < 0:
        raise ValueError(f"wire_bytes must not be negative, got {wire_bytes}")
    if rate_bps is None:
        return 0.0
    if not rate_bps > 0:
        raise ValueError(f"rate_bps must be positive (or None for an unlimited link), got {rate_bps}")
    return wire_bytes * 8.0 / rate_bps


def phase_times(round_seconds: float, receive_s: float, transmit_s: float, compute_s: float) -> PhaseTimes:
    """Split a round's wall time into states; what is not radio or compute is idle (never negative)."""
    busy = receive_s + transmit_s + compute_s
    return PhaseTimes(receive_s, transmit_s, compute_s, max(0.0, round_seconds - busy))


def energy_by_phase(profile: DeviceProfile, times: PhaseTimes) -> dict[str, float]:
    """Joules per phase: sum over states of power(state) * time(state)."""
    return {
        "receive": profile.radio_rx_power_w * times.receive_s,
        "transmit": profile.radio_tx_power_w * times.transmit_s,
        "compute": profile.compute_power_w * times.compute_s,
        "idle": profile.idle_power_w * times.idle_s,
    }
