"""The ephemeral-port budget of a run's emulated devices, and the one line that refuses a fleet the host cannot hold."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, strategies as st

from testbed.core.fleet_checks import (EPHEMERAL_PORTS_PER_DEVICE, ephemeral_ports_needed,
                                       ephemeral_ports_problem)
from testbed.loopback_listeners import SPREAD_SUPPORTED, ephemeral_ports_refusal, host_ephemeral_port_range

THIS_HOST_RANGE = (32768, 60999)  # Linux's default: 28,232 ports


def test_ten_thousand_devices_fit_this_hosts_range_only_with_shared_listener_ports() -> None:
    shared = ephemeral_ports_needed(10_000, processes=6, listeners_share_a_port=True)
    own = ephemeral_ports_needed(10_000, processes=6, listeners_share_a_port=False)
    assert shared == 20_006 and own == 30_000  # own: what 12458ac held (28,112 of 28,232 in use, then failures)
    assert ephemeral_ports_problem(10_000, shared, THIS_HOST_RANGE) is None
    assert ephemeral_ports_problem(10_000, own, THIS_HOST_RANGE) == (
        "devices: 10,000 emulated devices on this host need about 30,000 ports of its ephemeral range, which has "
        "28,232 (32768-60999); widen it (sysctl -w net.ipv4.ip_local_port_range=\"1024 65535\" as root) or run some "
        "devices on another host (fleet.remote)")


@given(devices=st.integers(0, 100_000), processes=st.integers(1, 64), shared=st.booleans(),
       first=st.integers(1024, 65535), width=st.integers(0, 64511))
def test_a_fleet_is_refused_exactly_when_it_needs_more_ports_than_the_range_has(devices: int, processes: int,
                                                                                shared: bool, first: int,
                                                                                width: int) -> None:
    needed = ephemeral_ports_needed(devices, processes, shared)
    assert needed >= EPHEMERAL_PORTS_PER_DEVICE * devices
    assert ephemeral_ports_needed(devices + 1, processes, shared) > needed
    problem = ephemeral_ports_problem(devices, needed, (first, first + width))
    assert (problem is None) == (needed <= width + 1)
    if problem is not None:
        assert "\n" not in problem and f"{needed:,} ports" in problem


def test_the_hosts_range_is_read_where_linux_says_it(tmp_path: Path) -> None:
    given_range = tmp_path / "ip_local_port_range"
    given_range.write_text("32768\t60999\n")
    assert host_ephemeral_port_range(str(given_range)) == (32768, 60999)
    given_range.write_text("garbled")
    assert host_ephemeral_port_range(str(given_range)) is None
    assert host_ephemeral_port_range(str(tmp_path / "missing")) is None


def test_a_run_and_a_fleet_worker_are_refused_by_this_hosts_own_range() -> None:
    """What `testbed run` and `testbed fleet` check at their start: the range this host says it has."""
    port_range = host_ephemeral_port_range()
    for devices in (100, 20_000, 40_000):
        refusal = ephemeral_ports_refusal(devices, processes=3)
        if port_range is None:
            assert refusal is None
            continue
        fits = ephemeral_ports_needed(devices, 3, SPREAD_SUPPORTED) <= port_range[1] - port_range[0] + 1
        assert (refusal is None) == fits
        if not fits:
            assert refusal is not None and refusal.startswith(f"devices: {devices:,} emulated devices on this host")
