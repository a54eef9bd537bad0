"""The ``netem`` backend: a device namespace joined to a host namespace by veth, shaped by ``tc`` (netem + htb, ifb).

``NetemLink`` (a sync *and* async context manager; the async form runs the same blocking ``ip``/``tc``
calls in a worker thread) creates two network namespaces, ``device`` and ``host``, joined by a veth
pair (device side ``198.19.<index>.2``, host side ``198.19.<index>.1``), applies the downlink on the
host veth's egress and the uplink on its ingress (through an ifb device) with the commands
``channel.netem_commands`` generates (its docstring has the qdisc layout and the
mapping of every ``LinkParameters`` field), and deletes both namespaces — and with them every veth,
ifb and qdisc — on exit. Given an upstream broker, it is also a run backend (``channel.backend:
netem``) with ``TunLink``'s surface: ``address``, ``downlink_counters``/``uplink_counters``.

Topology as a run backend (relay and forwarder: ``channel.relay.NamespaceRelays``)::

    MQTT client ──► 127.0.0.1:relay ═(socket in the device namespace)═► dev0 198.19.n.2
                                                                          │ veth: downlink on host0 egress,
                                                                          │ uplink on host0 ingress (ifb)
    broker 127.0.0.1:P ◄── forwarder (listens in the host namespace) ◄── host0 198.19.n.1

The namespaces are private to the link, so every link may use the same ``index``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal

from channel.backend import LinkRequest
from channel.errors import ChannelError
from testbed.core.plugins import register_link_backend
from channel.link import LinkCounters, LinkParameters
from channel.netem_commands import (
    default_ifb_name,
    link_mtu_bytes,
    missing_kernel_part,
    netem_commands,
)
from channel.netns import (
    NAME_PREFIX,
    NetworkNamespace,
    require_netns_support,
    run_command,
    unique_name,
)
from channel.relay import NamespaceRelays, RelayedLink

logger = logging.getLogger("channel.netem")

#: The RFC 2544 benchmarking range; NetemLink uses 198.19.<index>.0/24 of it.
ADDRESS_PREFIX = "198.19"
HOST_INTERFACE = "host0"
DEVICE_INTERFACE = "dev0"
COMMAND_TIMEOUT_S = 10.0
#: How stale ``NetemLink.downlink_counters``/``uplink_counters`` may be (each read runs tc or ip).
COUNTER_REFRESH_S = 0.5
#: Options ``kernel_supports`` passes to qdiscs that cannot be added without any.
PROBE_OPTIONS: dict[str, tuple[str, ...]] = {
    "tbf": ("rate", "1mbit", "burst", "16kb", "latency", "50ms"),
}



def run_in(namespace: NetworkNamespace, args: Sequence[str]) -> str:
    """Run one generated command inside ``namespace``; ChannelError (naming a missing module when that is why)."""
    result = namespace.run(list(args), check=False)
    if result.returncode != 0:
        stderr = (result.stderr or result.stdout).strip()
        missing = missing_kernel_part(args, stderr)
        if missing is not None:
            raise ChannelError(f"{missing} — '{' '.join(args)}' failed: {stderr}")
        raise ChannelError(f"'{' '.join(args)}' in namespace {namespace.name!r} failed "
                           f"(exit {result.returncode}): {stderr}")
    return result.stdout


def kernel_supports(qdisc: str, options: Sequence[str] | None = None) -> bool:
    """Whether the kernel can create a ``qdisc`` (e.g. ``"netem"``): tries it on a veth in a throwaway namespace.

    ``options`` default to ``PROBE_OPTIONS.get(qdisc, ())``. Returns False only when the qdisc kind is
    unknown; any other failure (not root, no namespaces, bad options) raises ChannelError.
    """
    require_netns_support()
    arguments = tuple(PROBE_OPTIONS.get(qdisc, ()) if options is None else options)
    with NetworkNamespace(unique_name(f"{NAME_PREFIX}probe-"), COMMAND_TIMEOUT_S) as namespace:
        namespace.ip("link", "add", "probe0", "type", "veth", "peer", "name", "probe1")
        result = namespace.run(["tc", "qdisc", "add", "dev", "probe0", "root", qdisc, *arguments], check=False)
    if result.returncode == 0:
        return True
    stderr = result.stderr.strip()
    if "qdisc kind is unknown" in stderr or "Unknown qdisc" in stderr:
        return False
    raise ChannelError(f"probing qdisc {qdisc!r} failed for another reason than a missing module: {stderr}")


def _json_list(text: str, what: str) -> list[dict[str, Any]]:
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError as error:
        raise ChannelError(f"cannot parse the JSON of {what}: {error}") from error
    if not isinstance(value, list):
        raise ChannelError(f"{what} gave JSON {type(value).__name__}, expected a list")
    return value


def counters_from_qdisc_stats(text: str) -> LinkCounters:
    """LinkCounters from ``tc -s -j qdisc show dev D``: the root qdisc's sent packets/bytes and drops.

    ``segments`` = packets sent + dropped, ``wire_bytes`` = bytes sent (IP packets with their 14 B
    Ethernet header, as the qdisc counts them), ``lost_segments`` = drops (netem loss and queue
    overflow alike). tc knows nothing of TCP, so ``payload_bytes``, ``retransmissions`` and
    ``queueing_delay_s`` stay 0.
    """
    root = next((qdisc for qdisc in _json_list(text, "tc qdisc show") if qdisc.get("root")), None)
    if root is None:
        return LinkCounters()
    packets, drops = int(root.get("packets", 0)), int(root.get("drops", 0))
    return LinkCounters(segments=packets + drops, wire_bytes=int(root.get("bytes", 0)), lost_segments=drops)


def counters_from_link_stats(text: str, side: Literal["tx", "rx"]) -> LinkCounters:
    """LinkCounters from ``ip -s -j link show dev D`` (an unshaped direction): its ``tx`` or ``rx`` statistics."""
    devices = _json_list(text, "ip link show")
    if not devices:
        return LinkCounters()
    stats = devices[0].get("stats64", {}).get(side, {})
    packets, dropped = int(stats.get("packets", 0)), int(stats.get("dropped", 0))
    return LinkCounters(segments=packets + dropped, wire_bytes=int(stats.get("bytes", 0)), lost_segments=dropped)


class NetemLink(RelayedLink):
    """Two namespaces joined by veth, with the downlink on the host veth's egress and the uplink on its ingress.

    Two ways to use it:

    * ``with NetemLink(downlink=d, uplink=u, index=n) as link:`` (or ``async with``) — then run the
      device's programs in ``link.device_namespace`` (address ``link.device_address``, 198.19.n.2) and
      the server's in ``link.host_namespace`` (``link.host_address``, 198.19.n.1).
    * As a run backend, with the same surface as ``TunLink``/``LinkProxy``:
      ``async with NetemLink(upstream_host, upstream_port, downlink, uplink, seed, name) as link`` —
      ``link.address`` is a 127.0.0.1 relay whose outbound socket lives in the device namespace and
      connects to a forwarder on ``host_address`` (listening in the host namespace), which passes the
      bytes on to the broker at ``upstream_host:upstream_port`` in this process's namespace. An
      unmodified MQTT client connects to ``link.address``; only the veth hop is shaped.

    ``None`` leaves a direction unshaped. ``seed`` is recorded but cannot be applied: netem draws
    from the kernel's own random numbers. ``downlink_counters``/``uplink_counters`` read the root
    qdisc's statistics (``counters_from_qdisc_stats``; an unshaped direction: the veth's interface
    statistics), at most every ``COUNTER_REFRESH_S``, and keep the last reading after exit.
    Everything is deleted on exit, also when setting up fails halfway; a link that needs a qdisc the
    kernel lacks (netem for delay/loss/...) fails at start with a ChannelError naming it.
    """

    def __init__(self, upstream_host: str | None = None, upstream_port: int | None = None,
                 downlink: LinkParameters | None = None, uplink: LinkParameters | None = None,
                 seed: int = 0, name: str = "link", index: int = 0, timeout_s: float = COMMAND_TIMEOUT_S,
                 connect_timeout_s: float = 5.0, write_timeout_s: float = 60.0) -> None:
        if not (isinstance(index, int) and 0 <= index <= 255):
            raise ChannelError(f"index={index!r} is invalid: expected an integer 0..255 (198.19.<index>.0/24)")
        if (upstream_host is None) != (upstream_port is None):
            raise ChannelError(f"upstream_host={upstream_host!r}, upstream_port={upstream_port!r}: give both "
                               "(a run backend relaying to the broker) or neither (namespaces only)")
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.downlink, self.uplink, self.index = downlink, uplink, index
        self.seed, self.name = seed, name
        self.connect_timeout_s, self.write_timeout_s = connect_timeout_s, write_timeout_s
        self.downlink_commands = netem_commands(HOST_INTERFACE, downlink, "egress") if downlink else []
        self.uplink_commands = netem_commands(HOST_INTERFACE, uplink, "ingress") if uplink else []
        self.mtu_bytes = link_mtu_bytes(downlink, uplink)
        self.host_address = f"{ADDRESS_PREFIX}.{index}.1"
        self.device_address = f"{ADDRESS_PREFIX}.{index}.2"
        suffix = unique_name("")
        self.host_namespace = NetworkNamespace(f"{NAME_PREFIX}nh{index}-{suffix}", timeout_s)
        self.device_namespace = NetworkNamespace(f"{NAME_PREFIX}nd{index}-{suffix}", timeout_s)
        self._relays: NamespaceRelays | None = None
        self._counters: dict[str, tuple[float, LinkCounters]] = {}

    # --- the run-backend surface (same as TunLink) ------------------------------------------------

    def _not_running_hint(self) -> str:
        return "" if self.upstream_host is not None else " and give upstream_host/upstream_port"

    @property
    def downlink_counters(self) -> LinkCounters:
        """Host → device: the host veth's root qdisc (or its tx statistics when unshaped)."""
        return self._read_counters("downlink")

    @property
    def uplink_counters(self) -> LinkCounters:
        """Device → host: the ifb device's root qdisc (or the host veth's rx statistics when unshaped)."""
        return self._read_counters("uplink")

    def _read_counters(self, direction: str, force: bool = False) -> LinkCounters:
        read_at, last = self._counters.get(direction, (-math.inf, LinkCounters()))
        if not self.host_namespace.created or (not force and time.monotonic() - read_at < COUNTER_REFRESH_S):
            return last
        shaped = self.downlink_commands if direction == "downlink" else self.uplink_commands
        namespace = self.host_namespace.name
        try:
            if shaped:
                device = HOST_INTERFACE if direction == "downlink" else default_ifb_name(HOST_INTERFACE)
                text = run_command(["tc", "-n", namespace, "-s", "-j", "qdisc", "show", "dev", device]).stdout
                counters = counters_from_qdisc_stats(text)
            else:
                text = run_command(["ip", "-n", namespace, "-s", "-j", "link", "show", "dev", HOST_INTERFACE]).stdout
                counters = counters_from_link_stats(text, "tx" if direction == "downlink" else "rx")
        except ChannelError as error:  # a scrape must not fail the run: keep the last reading
            logger.warning("%s: reading the %s counters failed: %s", self.name, direction, error)
            return last
        self._counters[direction] = (time.monotonic(), counters)
        return counters

    # --- lifecycle -------------------------------------------------------------------------------

    def _setup(self) -> None:
        host, device = self.host_namespace, self.device_namespace
        host.create()
        device.create()
        host.ip("link", "add", HOST_INTERFACE, "mtu", str(self.mtu_bytes), "type", "veth",
                "peer", "name", DEVICE_INTERFACE, "mtu", str(self.mtu_bytes), "netns", device.name)
        host.ip("addr", "add", f"{self.host_address}/24", "dev", HOST_INTERFACE)
        device.ip("addr", "add", f"{self.device_address}/24", "dev", DEVICE_INTERFACE)
        # one TCP segment per skb: htb's per-packet overhead and netem's per-packet loss must see real
        # packets, not 64 KB GSO super-packets (veth does GSO; GRO stays off on veth without XDP)
        host.ip("link", "set", HOST_INTERFACE, "gso_max_segs", "1", "up")
        device.ip("link", "set", DEVICE_INTERFACE, "gso_max_segs", "1", "up")
        for command in (*self.downlink_commands, *self.uplink_commands):
            run_in(host, command)

    def close(self) -> None:
        """Delete both namespaces (and so the veth pair, ifb and qdiscs); safe to call twice.

        The counters are read one last time first, so they stay valid after exit.
        """
        for direction in ("downlink", "uplink"):
            self._read_counters(direction, force=True)
        errors: list[ChannelError] = []
        for namespace in (self.device_namespace, self.host_namespace):
            try:
                namespace.delete()
            except ChannelError as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def __enter__(self) -> NetemLink:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> NetemLink:
        await asyncio.to_thread(self.__enter__)
        if self.upstream_host is not None and self.upstream_port is not None:
            self._relays = NamespaceRelays(self.name, self.upstream_host, self.upstream_port, self.host_address,
                                           self.device_namespace, self.host_namespace, self.connect_timeout_s,
                                           self.write_timeout_s)
            try:
                await self._relays.start()
            except BaseException:
                await self.aclose()
                raise
            logger.info("%s: netem link %s ⇄ %s, broker via %s:%d (down: %s; up: %s)", self.name,
                        self.host_address, self.device_address, *self.broker_address,
                        self.downlink.description if self.downlink else "unshaped",
                        self.uplink.description if self.uplink else "unshaped")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the relays (if any), then delete both namespaces (each step runs)."""
        try:
            if self._relays is not None:
                await self._relays.close()
        finally:
            self._relays = None
            await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        return (f"NetemLink(name={self.name!r}, index={self.index}, host={self.host_namespace.name}:"
                f"{self.host_address}, device={self.device_namespace.name}:{self.device_address})")


__all__ = [
    "NetemLink",
    "counters_from_link_stats",
    "counters_from_qdisc_stats",
    "kernel_supports",
    "run_in",
]


@register_link_backend("netem", packet_level=True, shared_cells=False)
def open_netem_link(request: LinkRequest) -> NetemLink:
    """The kernel's tc (htb, netem, ifb) on a veth between two namespaces (Linux, root, sch_netem for delay/loss)."""
    return NetemLink(request.upstream_host, request.upstream_port, downlink=request.downlink, uplink=request.uplink,
                     seed=request.seed, name=request.name)
