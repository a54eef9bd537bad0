"""Where a process's link listeners listen: each on a loopback address of its own (127.0.0.0/8), all on one port.

Every device's link is a listener its device connects to. On 127.0.0.1 with port 0 each took a port of the host's
ephemeral range (32768-60999 here: 28,232 ports), which the connects of the devices and of the links to the broker
draw from as well: 10,000 devices needed 30,000 and the connects failed with "Cannot assign requested address"
(issue 13). Linux routes all of 127.0.0.0/8 to the loopback interface without any set-up, and a port bound on one
address is free on every other, so a process reserves one port (a socket bound to 127.0.0.1:port, held open, so no
other process is given it) and puts its listeners on 127.1.0.1:port, 127.1.0.2:port, ...: one port for them all.
"""

from __future__ import annotations

import socket
import sys
from types import TracebackType

from testbed.core.fleet_checks import ephemeral_ports_needed, ephemeral_ports_problem

FIRST_OCTET = 127
SECOND_OCTETS = range(1, 255)
"""127.1.x.x to 127.254.x.x: 127.0.0.0/16 (127.0.0.1 and the like) is left to everything else."""
LAST_OCTETS = range(1, 255)
"""Neither .0 nor .255 ends an address: the loopback net routes them, but other tools take them for network and
broadcast addresses."""
ADDRESSES = len(SECOND_OCTETS) * 256 * len(LAST_OCTETS)
"""How many listener addresses a process can have (16.5 million)."""
SPREAD_SUPPORTED = sys.platform.startswith("linux")
"""Only Linux answers on every 127.0.0.0/8 address by default (macOS and Windows only on 127.0.0.1)."""


def loopback_address(index: int) -> str:
    """The `index`-th listener address (0 → 127.1.0.1, 253 → 127.1.0.254, 254 → 127.1.1.1, ...); ValueError past the
    last one."""
    if not 0 <= index < ADDRESSES:
        raise ValueError(f"listener address index {index} is outside 0..{ADDRESSES - 1}")
    index, last = divmod(index, len(LAST_OCTETS))
    second, third = divmod(index, 256)
    return f"{FIRST_OCTET}.{SECOND_OCTETS[second]}.{third}.{LAST_OCTETS[last]}"


class LoopbackListeners:
    """`with LoopbackListeners() as listeners:` reserves the port, `listeners.next_address()` gives each listener's
    (host, port). Where the spread is not supported (or `spread=False`), every listener gets ("127.0.0.1", 0) as
    before: a port of its own."""

    def __init__(self, spread: bool = SPREAD_SUPPORTED) -> None:
        self.spread = spread
        self.given = 0
        self._reservation: socket.socket | None = None
        self.port = 0

    def __enter__(self) -> LoopbackListeners:
        if self.spread:
            # No SO_REUSEADDR: while this is open no other socket may bind the port on 127.0.0.1 or on every address.
            reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                reservation.bind(("127.0.0.1", 0))
            except OSError:
                reservation.close()
                raise
            self._reservation = reservation
            self.port = reservation.getsockname()[1]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    def next_address(self) -> tuple[str, int]:
        """Where the next listener listens."""
        if not self.spread:
            return "127.0.0.1", 0
        if self._reservation is None:
            raise RuntimeError("LoopbackListeners: use it inside 'with' (it holds the port while its links listen)")
        address = loopback_address(self.given)
        self.given += 1
        return address, self.port


def link_listen_address(listeners: LoopbackListeners, backend: str, in_cell: bool) -> tuple[str | None, int]:
    """Where an emulated device's link listens: the next of `listeners` for the proxy backend and for a cell (always
    proxied); (None, 0) for another backend, which listens where it must."""
    return listeners.next_address() if backend == "proxy" or in_cell else (None, 0)


PORT_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"


def host_ephemeral_port_range(path: str | None = None) -> tuple[int, int] | None:
    """The first and last port this host gives connects and port-0 binds (Linux: ``PORT_RANGE_FILE``, read when
    called), or None where it does not say."""
    try:
        with open(path or PORT_RANGE_FILE, encoding="ascii") as ports:
            first, last = (int(port) for port in ports.read().split())
    except (OSError, ValueError):
        return None
    return first, last


def ephemeral_ports_refusal(local_devices: int, processes: int) -> str | None:
    """One line when this host's ephemeral port range cannot hold the connections of `local_devices` emulated devices
    run by `processes` processes here (they would fail to connect, "Cannot assign requested address", long after the
    start), else None; None too where the host does not say its range."""
    port_range = host_ephemeral_port_range()
    if port_range is None:
        return None
    needed = ephemeral_ports_needed(local_devices, processes, LoopbackListeners().spread)
    return ephemeral_ports_problem(local_devices, needed, port_range)
