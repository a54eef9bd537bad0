"""Named link profiles (downlink and uplink parameters of typical edge links), each with its source."""

from __future__ import annotations

from dataclasses import dataclass

from channel.link import LinkParameters


@dataclass(frozen=True)
class LinkProfile:
    """A named pair of link directions with a line saying where the numbers come from."""

    name: str
    downlink: LinkParameters
    uplink: LinkParameters
    source: str


PROFILES: dict[str, LinkProfile] = {
    profile.name: profile
    for profile in (
        LinkProfile(
            name="nb-iot",
            # 3GPP Rel-13 NB-IoT: ~26 kbit/s peak downlink, ~62 kbit/s uplink (single-tone lower);
            # latency up to 10 s is allowed by the spec, ~1.6-10 s typical (3GPP TR 45.820, TS 36.306).
            downlink=LinkParameters(rate_bps=26_000, delay_s=1.6, jitter_s=0.4, loss=0.01),
            uplink=LinkParameters(rate_bps=62_000, delay_s=1.6, jitter_s=0.4, loss=0.01),
            source="3GPP TR 45.820 / TS 36.306 (Rel-13 NB-IoT peak rates, latency budget)",
        ),
        LinkProfile(
            name="lte-m",
            # LTE Cat-M1: 1 Mbit/s peak both ways (half duplex lowers it to ~300-375 kbit/s), 10-15 ms
            # air latency, ~100 ms end to end on commercial networks (3GPP TS 36.306, GSMA LTE-M guide).
            downlink=LinkParameters(rate_bps=375_000, delay_s=0.1, jitter_s=0.02, loss=0.005),
            uplink=LinkParameters(rate_bps=375_000, delay_s=0.1, jitter_s=0.02, loss=0.005),
            source="3GPP TS 36.306 Cat-M1; GSMA LTE-M deployment guide (half-duplex throughput, latency)",
        ),
        LinkProfile(
            name="wifi-weak",
            # 802.11n at the cell edge: a few Mbit/s goodput with noticeable loss and jitter
            # (MCS0-1 at 20 MHz: 6.5-13 Mbit/s PHY, ~50% MAC efficiency).
            downlink=LinkParameters(rate_bps=2_000_000, delay_s=0.01, jitter_s=0.005, loss=0.02),
            uplink=LinkParameters(rate_bps=2_000_000, delay_s=0.01, jitter_s=0.005, loss=0.02),
            source="IEEE 802.11n MCS0-1 PHY rates at 20 MHz, ~50% MAC efficiency",
        ),
        LinkProfile(
            name="ethernet",
            # Switched 100 Mbit/s Ethernet on a lab bench: sub-millisecond latency, no loss.
            downlink=LinkParameters(rate_bps=100_000_000, delay_s=0.0002),
            uplink=LinkParameters(rate_bps=100_000_000, delay_s=0.0002),
            source="IEEE 802.3u 100BASE-TX line rate",
        ),
    )
}
