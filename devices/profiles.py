"""Device profiles: how fast an edge device computes and how much power each of its states draws."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.core.plugins import DEVICE_PROFILES, register_device_profile


@dataclass(frozen=True)
class DeviceProfile:
    """Compute speed and power states of one kind of edge device.

    `macs_per_s` is the multiply-accumulates per second the device sustains on small dense fp32 inference
    (one thread): a device's modelled compute time is the work of an apply and an evaluation divided by
    it, so it does not depend on the testbed host. Powers are whole-board watts in each state; the radio
    figures are the board's draw while the radio receives / transmits, so energy = sum(power(state) *
    time(state)).
    """

    name: str
    description: str
    macs_per_s: float
    idle_power_w: float
    compute_power_w: float
    radio_rx_power_w: float
    radio_tx_power_w: float

    def __post_init__(self) -> None:
        for field_name in ("macs_per_s", "idle_power_w", "compute_power_w", "radio_rx_power_w", "radio_tx_power_w"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"device profile {self.name!r}: {field_name} must be positive")


register_device_profile("jetson-nano", DeviceProfile(
    name="jetson-nano",
    description="NVIDIA Jetson Nano 4GB dev kit, 5 W mode, Wi-Fi (Intel 8265 M.2)",
    # One Cortex-A57 core @ 1.43 GHz, 128-bit NEON: 4 fp32 FMA per cycle = 5.7 GMAC/s peak; small dense
    # layers reach about a quarter of peak in single-threaded PyTorch (an approximation, measure yours).
    macs_per_s=1.4e9,
    # Idle ~1.25 W and ~5 W at the 5 W power mode cap: NVIDIA Jetson Nano Developer Kit user guide
    # (power modes) and tegrastats readings widely reported on the NVIDIA developer forum.
    idle_power_w=1.25,
    compute_power_w=5.0,
    # Intel Dual Band Wireless-AC 8265 datasheet: ~1.1 W receive, ~2.0 W transmit (module draw)
    # added on top of the board's idle draw.
    radio_rx_power_w=1.25 + 1.1,
    radio_tx_power_w=1.25 + 2.0,
))

register_device_profile("rpi4", DeviceProfile(
    name="rpi4",
    description="Raspberry Pi 4 Model B, on-board Wi-Fi (CYW43455)",
    # One Cortex-A72 core @ 1.5 GHz, 128-bit NEON: 4 fp32 FMA per cycle = 6 GMAC/s peak; about a third of
    # it on small dense layers in single-threaded PyTorch (an approximation, measure yours).
    macs_per_s=2.0e9,
    # Idle 2.7 W, full CPU load 6.4 W: Raspberry Pi 4 power measurements published by
    # Tom's Hardware and the Pi Dramble project (5.1 V supply, 540 mA idle / 1.25 A load).
    idle_power_w=2.7,
    compute_power_w=6.4,
    # Wi-Fi traffic adds ~0.4 W receiving, ~0.9 W transmitting over idle (Pi Dramble Wi-Fi
    # throughput power figures).
    radio_rx_power_w=2.7 + 0.4,
    radio_tx_power_w=2.7 + 0.9,
))


def get_device_profile(name: str) -> DeviceProfile:
    """The profile registered under `name`; PluginError with the known names otherwise."""
    profile: DeviceProfile = DEVICE_PROFILES.get(name)
    return profile
