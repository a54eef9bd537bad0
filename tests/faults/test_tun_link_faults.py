"""Link events on the packet-level tun backend: a link degraded for a round, an outage, a partition both ways, each
performed on the device's packet emulator (the kernel's TCP meets them), and the run converges."""

from __future__ import annotations

from pathlib import Path

import pytest

from channel.tun import TunLink
from tests.faults.matrix import FAST_LINK, assert_survived, fault_scenario, run_faults

pytestmark = [pytest.mark.faults, pytest.mark.timeout(300)]


async def test_link_outage_and_partition_events_are_performed_on_tun_links(tmp_path: Path) -> None:
    slow = {"rate": "16kbit", "delay": "300ms"}
    scenario = fault_scenario([
        {"round": 1, "action": "link", "device": "rpi4-0", "direction": "downlink", "set": slow, "for": "4s"},
        {"round": 1, "action": "outage", "device": "rpi4-1", "for": "3s"},
        {"round": 2, "action": "partition", "device": "rpi4-2", "for": "3s"},
    ], channel={"backend": "tun", "downlink": FAST_LINK, "uplink": FAST_LINK})
    faults = await run_faults(scenario, tmp_path / "out")
    assert_survived(faults)
    assert not faults.event_warnings()  # none was left "not emulated"
    links = faults.run.assembly.device_links
    assert all(isinstance(link, TunLink) for link in links.values())
    # the link change was undone after its 4 s, exactly
    assert (links["rpi4-0"].downlink.rate_bps, links["rpi4-0"].downlink.delay_s) == (200_000, 0.02)
    # the outage and the partition dropped packets of their devices only, both ways for the partition
    counters = {device: link.counters for device, link in links.items()}
    assert counters["rpi4-1"].downlink.dropped_packets + counters["rpi4-1"].uplink.dropped_packets > 0
    assert counters["rpi4-2"].downlink.dropped_packets + counters["rpi4-2"].uplink.dropped_packets > 0
    assert counters["rpi4-0"].downlink.dropped_packets == counters["rpi4-0"].uplink.dropped_packets == 0
    # the degraded round: rpi4-0 waited for the 300 ms delay at least
    record = next(r for r in faults.records() if (r["round"], r["device"]) == (1, "rpi4-0"))
    assert record["delivery_seconds"] >= 0.3
