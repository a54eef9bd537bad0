"""Checks of a scenario's `fleet` section against its devices, events and broker identities, and the plan it gives."""

from __future__ import annotations

from testbed.core.event_checks import target_device_ids
from testbed.core.fleet_plan import SelectorError, select_devices, worker_count, worker_shares
from testbed.core.scenario import Scenario


def devices_with_events(scenario: Scenario) -> list[str]:
    """The devices some event acts on (a crash, a link change, a chunk tap...): these stay in the run's process."""
    targeted = {device_id for event in scenario.events for device_id in target_device_ids(event, scenario)}
    return [device_id for device_id in scenario.device_ids() if device_id in targeted]


def local_emulated_devices(scenario: Scenario) -> list[str]:
    """The emulated devices this host runs (the others run on other hosts: `fleet.remote`), in scenario order."""
    remote = set(scenario.remote_devices())
    entries = scenario.device_entries()
    return [device_id for device_id in scenario.device_ids()
            if entries[device_id].kind == "emulated" and device_id not in remote]


def planned_worker_shares(scenario: Scenario, cores: int) -> list[list[str]]:
    """The local emulated devices of each worker process (none: they run in the run's process). `auto` stays in
    process when events act on devices or devices have identities of their own: both live in the run's process."""
    local = local_emulated_devices(scenario)
    workers = worker_count(scenario.fleet.workers, len(local), cores)
    if scenario.fleet.workers == "auto" and (devices_with_events(scenario)
                                             or scenario.broker.device_credentials is not None):
        workers = 1
    cell_of = {device_id: cell.name for cell in scenario.channel.cells for device_id in cell.devices}
    return worker_shares(local, {device_id: cell_of[device_id] for device_id in local if device_id in cell_of},
                         workers) if workers > 1 else []


def fleet_problem(scenario: Scenario) -> str | None:
    """What is wrong with `fleet` in this scenario (one line naming the field), or None."""
    fleet = scenario.fleet
    entries = scenario.device_entries()
    cells = {cell.name: cell.devices for cell in scenario.channel.cells}
    remote: list[str] = []
    for index, selector in enumerate(fleet.remote):
        try:
            selected = select_devices(selector, scenario.device_ids(), cells)
        except SelectorError as error:
            return f"fleet.remote.{index}: {error}"
        boards = [device_id for device_id in selected if entries[device_id].kind != "emulated"]
        if boards:
            return (f"fleet.remote.{index}: {selector!r} selects {boards[0]!r}, a board in the loop; `testbed fleet` "
                    "runs emulated devices only")
        remote.extend(selected)
    distributed = bool(remote) or (fleet.workers != "auto" and fleet.workers > 1)
    if not distributed:
        return None
    if scenario.broker.device_credentials is not None:
        return ("fleet: workers and remote devices connect as the run's identity; broker.device_credentials (one "
                "identity per device) needs the fleet in the run's process (workers: 1, no remote)")
    targeted = devices_with_events(scenario)
    held_elsewhere = [device_id for device_id in targeted
                      if device_id in remote or (fleet.workers != "auto" and fleet.workers > 1
                                                 and entries[device_id].kind == "emulated")]
    if held_elsewhere:
        return (f"fleet: events act on {held_elsewhere[0]!r}, which a worker process or another host would run; "
                "events need their devices in the run's process (workers: 1 or auto, and not in fleet.remote)")
    return None


EPHEMERAL_PORTS_PER_DEVICE = 2
"""Ports of the host's ephemeral range an emulated device holds: its client's connection to its link, and its link's to
the broker. Its link's listener takes none where the listeners share a port (testbed.loopback_listeners), else one more.
Measured at 12458ac, before they shared it: 10,000 devices held 28,112 of 28,232 (issue 13)."""


def ephemeral_ports_needed(local_devices: int, processes: int, listeners_share_a_port: bool) -> int:
    """Ports of the ephemeral range a run's emulated devices need on this host: EPHEMERAL_PORTS_PER_DEVICE each (one
    more for its listener where the listeners do not share a port), and each process's one shared listener port."""
    per_device = EPHEMERAL_PORTS_PER_DEVICE + (0 if listeners_share_a_port else 1)
    return per_device * local_devices + (processes if listeners_share_a_port else 0)


def ephemeral_ports_problem(local_devices: int, needed: int, port_range: tuple[int, int]) -> str | None:
    """One line when `needed` ports exceed the host's ephemeral `port_range` (its first and last port), else None."""
    first, last = port_range
    available = last - first + 1
    if needed <= available:
        return None
    return (f"devices: {local_devices:,} emulated devices on this host need about {needed:,} ports of its ephemeral "
            f"range, which has {available:,} ({first}-{last}); widen it (sysctl -w "
            f"net.ipv4.ip_local_port_range=\"1024 65535\" as root) or run some devices on another host (fleet.remote)")
