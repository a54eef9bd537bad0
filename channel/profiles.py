"""Named link profiles (downlink and uplink parameters of typical edge links), each with its source."""

from __future__ import annotations

from dataclasses import dataclass

from channel.link import LinkParameters
from testbed.core.plugins import register_link_profile


@dataclass(frozen=True)
class LinkProfile:
    """A named pair of link directions with a line saying where the numbers come from."""

    name: str
    downlink: LinkParameters
    uplink: LinkParameters
    source: str


register_link_profile("nb-iot", LinkProfile(
    name="nb-iot",
    # 3GPP Rel-13 NB-IoT: ~26 kbit/s peak downlink, ~62 kbit/s uplink (single-tone lower);
    # latency up to 10 s is allowed by the spec, ~1.6-10 s typical (3GPP TR 45.820, TS 36.306).
    downlink=LinkParameters(rate_bps=26_000, delay_s=1.6, jitter_s=0.4, loss=0.01),
    uplink=LinkParameters(rate_bps=62_000, delay_s=1.6, jitter_s=0.4, loss=0.01),
    source="3GPP TR 45.820 / TS 36.306 (Rel-13 NB-IoT peak rates, latency budget)",
))

register_link_profile("lte-m", LinkProfile(
    name="lte-m",
    # LTE Cat-M1: 1 Mbit/s peak both ways (half duplex lowers it to ~300-375 kbit/s), 10-15 ms
    # air latency, ~100 ms end to end on commercial networks (3GPP TS 36.306, GSMA LTE-M guide).
    downlink=LinkParameters(rate_bps=375_000, delay_s=0.1, jitter_s=0.02, loss=0.005),
    uplink=LinkParameters(rate_bps=375_000, delay_s=0.1, jitter_s=0.02, loss=0.005),
    source="3GPP TS 36.306 Cat-M1; GSMA LTE-M deployment guide (half-duplex throughput, latency)",
))

register_link_profile("wifi-weak", LinkProfile(
    name="wifi-weak",
    # 802.11n at the cell edge: a few Mbit/s goodput with noticeable loss and jitter
    # (MCS0-1 at 20 MHz: 6.5-13 Mbit/s PHY, ~50% MAC efficiency).
    downlink=LinkParameters(rate_bps=2_000_000, delay_s=0.01, jitter_s=0.005, loss=0.02),
    uplink=LinkParameters(rate_bps=2_000_000, delay_s=0.01, jitter_s=0.005, loss=0.02),
    source="IEEE 802.11n MCS0-1 PHY rates at 20 MHz, ~50% MAC efficiency",
))

register_link_profile("ethernet", LinkProfile(
    name="ethernet",
    # Switched 100 Mbit/s Ethernet on a lab bench: sub-millisecond latency, no loss.
    downlink=LinkParameters(rate_bps=100_000_000, delay_s=0.0002),
    uplink=LinkParameters(rate_bps=100_000_000, delay_s=0.0002),
    source="IEEE 802.3u 100BASE-TX line rate",
))

register_link_profile("lora-sf7", LinkProfile(
    name="lora-sf7",
    # LoRa SF7, 125 kHz, CR 4/5: PHY bit rate SF * (4/5) / (2^SF / BW) = 5.47 kbit/s (Semtech AN1200.22).
    # Max LoRaWAN application payload at EU868 DR5 is 222 B (LoRaWAN Regional Parameters RP002);
    # overhead = 13 B MAC (MHDR, FHDR, FPort, MIC) + ~9 B-equivalent of the 12.25-symbol preamble.
    # Approximate: the EU868 1% duty cycle is NOT applied (set rate to ~55 bit/s for its long-run
    # average); downlink delay = RECEIVE_DELAY1 (1 s) of class A; uplink delay = gateway backhaul
    # guess; loss is an assumption (field packet error rates vary from ~1% to >10%).
    # LoRaWAN carries no TCP: the stream model stands for a reliable transfer layer on top.
    downlink=LinkParameters(rate_bps=5_469, delay_s=1.0, jitter_s=0.05, loss=0.01,
                            mss_bytes=222, overhead_bytes=22),
    uplink=LinkParameters(rate_bps=5_469, delay_s=0.1, jitter_s=0.05, loss=0.01,
                          mss_bytes=222, overhead_bytes=22),
    source="Semtech AN1200.22 (LoRa PHY rate SF7/125 kHz, CR 4/5); LoRaWAN RP002 EU868 DR5 payload; "
           "duty cycle not applied, delay and loss approximate",
))

register_link_profile("lora-sf12", LinkProfile(
    name="lora-sf12",
    # LoRa SF12, 125 kHz, CR 4/5: 12 * 0.8 / (4096 / 125 kHz) = 0.29 kbit/s (Semtech AN1200.22).
    # EU868 DR0 max application payload 51 B; overhead 13 B MAC + ~15 B-equivalent preamble.
    # Same caveats as lora-sf7; SF12 is used at the cell edge, hence the higher assumed loss.
    downlink=LinkParameters(rate_bps=293, delay_s=1.0, jitter_s=0.1, loss=0.05,
                            mss_bytes=51, overhead_bytes=28),
    uplink=LinkParameters(rate_bps=293, delay_s=0.1, jitter_s=0.1, loss=0.05,
                          mss_bytes=51, overhead_bytes=28),
    source="Semtech AN1200.22 (LoRa PHY rate SF12/125 kHz, CR 4/5); LoRaWAN RP002 EU868 DR0 payload; "
           "duty cycle not applied, delay and loss approximate",
))

register_link_profile("ble", LinkProfile(
    name="ble",
    # Bluetooth LE 4.2 (data length extension) / 5 (2M PHY): ~0.7-1.4 Mbit/s application
    # throughput in practice; we take 1 Mbit/s at the L2CAP level with a 247 B ATT MTU
    # (244 B payload + 4 B L2CAP + 3 B ATT header). Delay ~ half a 30 ms connection interval.
    # The BLE link layer retransmits until the supervision timeout, so losses show up as
    # jitter, not loss. Approximate: real throughput depends on the phone/stack's interval.
    downlink=LinkParameters(rate_bps=1_000_000, delay_s=0.015, jitter_s=0.0075, loss=0.0,
                            mss_bytes=244, overhead_bytes=7),
    uplink=LinkParameters(rate_bps=1_000_000, delay_s=0.015, jitter_s=0.0075, loss=0.0,
                          mss_bytes=244, overhead_bytes=7),
    source="Bluetooth Core Spec 4.2/5.0 (LE DLE, 2M PHY, ATT MTU 247); typical app-level "
           "throughput 0.7-1.4 Mbit/s; approximate",
))

register_link_profile("3g", LinkProfile(
    name="3g",
    # UMTS HSPA: HSDPA categories 6-8 peak 3.6-7.2 Mbit/s, HSUPA ~1.5-5.7 Mbit/s peak
    # (3GPP TS 25.306); typical user throughput ~2 Mbit/s down, ~0.5 Mbit/s up, RTT ~150 ms.
    # RLC acknowledged mode hides most radio loss. Typical, not peak, figures: approximate.
    downlink=LinkParameters(rate_bps=2_000_000, delay_s=0.075, jitter_s=0.025, loss=0.005),
    uplink=LinkParameters(rate_bps=500_000, delay_s=0.075, jitter_s=0.025, loss=0.005),
    source="3GPP TS 25.306 (HSPA UE categories); typical measured HSPA throughput and RTT; approximate",
))

register_link_profile("satellite-geo", LinkProfile(
    name="satellite-geo",
    # Geostationary satellite: 35 786 km altitude, so user -> satellite -> gateway is >= 239 ms
    # of propagation; ~250-280 ms one way with ground segments, i.e. a ~550-600 ms round trip.
    # Rates of a VSAT-class service (10 Mbit/s down, 2 Mbit/s up) are an assumption, as is the
    # loss (no PEP modelled). Approximate.
    downlink=LinkParameters(rate_bps=10_000_000, delay_s=0.28, jitter_s=0.01, loss=0.005),
    uplink=LinkParameters(rate_bps=2_000_000, delay_s=0.28, jitter_s=0.01, loss=0.005),
    source="GEO orbit geometry (35 786 km: >= 239 ms one way, ~550-600 ms RTT); "
           "VSAT-class rates and loss assumed",
))

