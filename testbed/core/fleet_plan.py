"""Which process runs which emulated device: device selectors, the `workers: auto` rule, shares keeping cells whole."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from testbed.core.errors import TestbedError

AUTO_WORKERS_ABOVE_DEVICES = 200
"""`workers: auto` starts worker processes only for a fleet of more emulated devices than this (else in process)."""

_RANGE = re.compile(r"^(?P<prefix>[A-Za-z0-9][A-Za-z0-9_.-]*?)-(?P<first>\d+)\.\.(?P<last>\d+)$")


class SelectorError(TestbedError, ValueError):
    """A device selector names no device of the run, or is malformed."""


def select_devices(selector: str, device_ids: Sequence[str], cells: Mapping[str, Sequence[str]]) -> list[str]:
    """The devices `selector` names, in scenario order: comma-separated items, each a range `PREFIX-A..B` (both ends
    included), a cell name (its devices) or a device id. SelectorError names the first item that selects nothing."""
    known = set(device_ids)
    chosen: set[str] = set()
    items = [item.strip() for item in selector.split(",")]
    for item in items:
        if not item:
            raise SelectorError(f"device selector {selector!r} has an empty item; write e.g. rpi4-0..99,cell-a")
        matched = _item_devices(item, known, cells)
        if not matched:
            raise SelectorError(f"device selector item {item!r} selects no device of the run (a range like "
                                f"rpi4-0..99, a cell name, or a device id; the run has {_listed(device_ids)})")
        chosen.update(matched)
    return [device_id for device_id in device_ids if device_id in chosen]


def _item_devices(item: str, known: set[str], cells: Mapping[str, Sequence[str]]) -> list[str]:
    if item in cells:
        return list(cells[item])
    if item in known:
        return [item]
    found = _RANGE.match(item)
    if found is None:
        return []
    first, last = int(found["first"]), int(found["last"])
    if first > last:
        raise SelectorError(f"device selector item {item!r}: the range ends before it starts")
    return [name for index in range(first, last + 1) if (name := f"{found['prefix']}-{index}") in known]


def _listed(device_ids: Sequence[str]) -> str:
    shown = ", ".join(device_ids[:6])
    return shown + (f" … ({len(device_ids)} devices)" if len(device_ids) > 6 else "")


def worker_count(workers: int | str, emulated_devices: int, cores: int) -> int:
    """Worker processes for `emulated_devices`: N as given (at most one per device), or for 'auto' one per core when
    the fleet has more than AUTO_WORKERS_ABOVE_DEVICES devices, else 1 (in process)."""
    if workers == "auto":
        workers = max(1, cores) if emulated_devices > AUTO_WORKERS_ABOVE_DEVICES else 1
    return max(1, min(int(workers), emulated_devices))


def worker_shares(devices: Sequence[str], cell_of: Mapping[str, str], workers: int) -> list[list[str]]:
    """`devices` (scenario order) split into `workers` contiguous shares of near-equal size, a cell's devices always
    in one share; fewer shares when there are fewer cells and devices than workers, none empty."""
    units: list[list[str]] = []
    unit_of_cell: dict[str, list[str]] = {}
    for device_id in devices:
        cell = cell_of.get(device_id)
        if cell is None:
            units.append([device_id])
        elif cell in unit_of_cell:
            unit_of_cell[cell].append(device_id)
        else:
            unit_of_cell[cell] = [device_id]
            units.append(unit_of_cell[cell])
    shares: list[list[str]] = [[] for _ in range(max(1, workers))]
    placed = 0
    for unit in units:  # a unit goes to the share its first device's position falls in
        shares[min(len(shares) - 1, placed * len(shares) // max(1, len(devices)))].extend(unit)
        placed += len(unit)
    return [share for share in shares if share]
