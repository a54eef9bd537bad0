"""Packet-level link backend: a device namespace joined to the host by two TUN devices, IP packets through LinkModels.

Topology of one ``TunLink`` (Linux, root)::

    MQTT client ──► 127.0.0.1:relay ═(relay socket lives in the device namespace)═► tun0 198.18.n.2/30
      (host netns, loopback, unconstrained)                                           │ IP packets
                                                                 emulator: uplink LinkModel ▲ ▼ downlink LinkModel
                                                                                      │
    broker 127.0.0.1:P ◄── forwarder ◄── 198.18.n.1:F on host TUN ``tb-XXXXXXXX`` ◄───┘

* Each direction's IP packets are read from one TUN fd and written to the other at the delivery
  times ``LinkModel.packet_fates`` gives (downlink: host → device, uplink: device → host), so the
  kernel's real TCP in the namespace reacts to real drops, delays, duplicates and reordering.
  ``rate_bps`` counts whole IP packets (headers included); non-IPv4 packets are dropped uncounted.
  Packets wait for the rate in the model's bounded drop-tail queue (``LinkParameters.queue_bytes``),
  as at a real bottleneck: a burst beyond it is dropped and TCP recovers as it would there.
* The broker stays where it is: a forwarder on ``host_address:forward_port`` (host side, reachable
  only through the link) copies bytes to ``upstream_host:upstream_port``. A program inside the
  namespace (``ip netns exec``, ``open_device_connection``) connects to ``broker_address``.
* paho/aiomqtt have no socket-factory hook, so ``address`` is a relay on 127.0.0.1 (host netns)
  whose outbound socket is created inside the namespace: an MQTT client connects to ``address``
  exactly as it would to a ``LinkProxy``. The relay and forwarder hops are on loopback (unshaped);
  they add a user-space copy each, tens of microseconds. Both hops are ``channel.relay.NamespaceRelays``,
  shared with the ``netem`` backend.
"""

from __future__ import annotations

import asyncio
import fcntl
import heapq
import ipaddress
import logging
import os
import random
import struct
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from channel.backend import LinkRequest
from channel.errors import ChannelError
from testbed.core.plugins import register_link_backend
from channel.link import LinkCounters, LinkModel, LinkParameters
from channel.netns import NetworkNamespace, entered, host_ip, require_netns_support
from channel.relay import NamespaceRelays, RelayedLink

logger = logging.getLogger("channel.tun")

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
#: The emulated devices' addresses: one /30 per link inside 198.18.0.0/15 (RFC 2544 benchmarking).
SUBNET_POOL = ipaddress.IPv4Network("198.18.0.0/15")
SUBNET_COUNT = 512  # 198.18.0.0/30 … 198.19.255.0/30, one per third octet
DEVICE_INTERFACE = "tun0"
READ_BATCH_PACKETS = 256
MAX_PACKET_BYTES = 65535
#: Python's epoll waits whole milliseconds (rounded up), so a timer fires 0–1 ms late; releasing
#: copies up to this much before their time centres the delivery error on zero (±0.5 ms).
TIMER_SLACK_S = 0.0005


def subnet_addresses(index: int) -> tuple[str, str]:
    """(host, device) addresses of link ``index``: 198.18.n.1 and 198.18.n.2 (198.19.* from 256)."""
    if not 0 <= index < SUBNET_COUNT:
        raise ChannelError(f"subnet_index={index!r} is invalid: expected 0..{SUBNET_COUNT - 1}")
    base = SUBNET_POOL.network_address + index * 256
    return str(base + 1), str(base + 2)


def _free_subnet_index() -> int:
    """A subnet index whose host address no interface of the host namespace uses yet."""
    used = set()
    for line in host_ip("-o", "-4", "addr", "show").splitlines():
        for word in line.split():
            if "/" in word:
                try:
                    address = ipaddress.IPv4Interface(word).ip
                except ValueError:
                    continue
                if address in SUBNET_POOL:
                    used.add((int(address) - int(SUBNET_POOL.network_address)) // 256)
    free = [index for index in range(SUBNET_COUNT) if index not in used and index not in _claimed]
    if not free:
        raise ChannelError(f"no free /30 left in {SUBNET_POOL}: {SUBNET_COUNT} links already exist")
    return random.SystemRandom().choice(free)  # concurrent processes rarely pick the same one


_claimed: set[int] = set()


def open_tun(name: str) -> int:
    """Create TUN device ``name`` (IFF_TUN | IFF_NO_PI) in the calling thread's namespace; its non-blocking fd.

    The device exists while the fd is open.
    """
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise ChannelError(f"cannot open {TUN_DEVICE}: {error} (load the 'tun' module; needs root)") from error
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI))
    except OSError as error:
        os.close(fd)
        raise ChannelError(f"TUNSETIFF {name!r} failed: {error}") from error
    return fd


@dataclass
class TunDirectionCounters:
    """Packets one direction of a TunLink has seen (bytes are whole IP packets)."""

    packets: int = 0
    bytes: int = 0
    delivered_packets: int = 0
    delivered_bytes: int = 0
    dropped_packets: int = 0  # the link model dropped every copy (loss, full queue or outage: see LinkCounters)
    duplicated_packets: int = 0  # the link model delivered two copies
    pending_overflow_drops: int = 0  # not modelled: max_pending_packets copies already held by the emulator
    non_ipv4_packets: int = 0
    write_errors: int = 0
    max_lateness_s: float = 0.0  # worst delivery after the modelled time (negative = early, see TIMER_SLACK_S)
    max_earliness_s: float = 0.0


@dataclass
class TunLinkCounters:
    downlink: TunDirectionCounters = field(default_factory=TunDirectionCounters)
    uplink: TunDirectionCounters = field(default_factory=TunDirectionCounters)


class _PacketEmulator:
    """Reads packets from two TUN fds and writes each copy to the other fd at its delivery time.

    One heap of pending copies and one loop timer for its earliest entry; no thread, no polling.
    """

    def __init__(self, host_fd: int, device_fd: int, downlink: LinkModel, uplink: LinkModel,
                 counters: TunLinkCounters, max_pending_packets: int, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._name = name
        self._max_pending = max_pending_packets
        self._heap: list[tuple[float, int, int, bytes, TunDirectionCounters, str]] = []
        self._sequence = 0
        self._pending = {"downlink": 0, "uplink": 0}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._fds = (host_fd, device_fd)
        self.error: BaseException | None = None
        # (source fd, destination fd, model, counters, label)
        self._directions = {
            host_fd: (device_fd, downlink, counters.downlink, "downlink"),
            device_fd: (host_fd, uplink, counters.uplink, "uplink"),
        }
        for fd in self._fds:
            self._loop.add_reader(fd, self._on_readable, fd)

    def close(self) -> None:
        for fd in self._fds:
            self._loop.remove_reader(fd)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._heap.clear()

    def _fail(self, error: BaseException) -> None:
        logger.error("%s: packet emulator failed: %r", self._name, error, exc_info=error)
        if self.error is None:
            self.error = error

    def _on_readable(self, fd: int) -> None:
        destination, model, counters, label = self._directions[fd]
        for _ in range(READ_BATCH_PACKETS):
            try:
                packet = os.read(fd, MAX_PACKET_BYTES)
            except BlockingIOError:
                break
            except OSError as error:
                self._loop.remove_reader(fd)
                self._fail(error)
                return
            if not packet:
                break
            if packet[0] >> 4 != 4:
                counters.non_ipv4_packets += 1
                continue
            counters.packets += 1
            counters.bytes += len(packet)
            if self._pending[label] >= self._max_pending:
                counters.pending_overflow_drops += 1
                continue
            try:
                fates = model.packet_fates(self._loop.time(), len(packet))
            except ChannelError as error:
                self._fail(error)
                continue
            if not fates:
                counters.dropped_packets += 1
            elif len(fates) > 1:
                counters.duplicated_packets += 1
            for deliver_at in fates:
                self._sequence += 1
                heapq.heappush(self._heap, (deliver_at, self._sequence, destination, packet, counters, label))
                self._pending[label] += 1
        self._arm()

    def _arm(self) -> None:
        if not self._heap:
            return
        earliest = self._heap[0][0]
        if self._timer is not None and self._timer_at <= earliest:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = earliest
        self._timer = self._loop.call_at(earliest - TIMER_SLACK_S, self._deliver_due)

    def _deliver_due(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        now = self._loop.time()
        while self._heap and self._heap[0][0] <= now + TIMER_SLACK_S:
            deliver_at, _, destination, packet, counters, label = heapq.heappop(self._heap)
            self._pending[label] -= 1
            try:
                os.write(destination, packet)
            except OSError as error:  # e.g. the kernel's backlog is full: the packet is lost
                counters.write_errors += 1
                logger.info("%s: writing a %s packet failed: %r", self._name, label, error)
                continue
            lateness = now - deliver_at
            counters.delivered_packets += 1
            counters.delivered_bytes += len(packet)
            counters.max_lateness_s = max(counters.max_lateness_s, lateness)
            counters.max_earliness_s = max(counters.max_earliness_s, -lateness)
        self._arm()


class TunLink(RelayedLink):
    """One device's packet-level link: ``async with TunLink(host, port, downlink, uplink, seed) as link``.

    Same constructor shape as ``LinkProxy``; ``address`` is where an MQTT client in this process
    connects (a 127.0.0.1 relay), ``broker_address`` where a program inside ``device_namespace``
    connects. ``downlink`` shapes host → device packets, ``uplink`` device → host.

    The bottleneck's drop-tail queue is the link model's (``LinkParameters.queue_bytes``; its drops are
    ``downlink_counters.queue_drops``). ``max_pending_packets`` only bounds the emulator's memory: copies
    held per direction, queued or in flight (like netem's ``limit``); beyond it a packet is dropped
    unmodelled and counted in ``counters.<direction>.pending_overflow_drops``.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        downlink: LinkParameters,
        uplink: LinkParameters,
        seed: int,
        name: str = "link",
        subnet_index: int | None = None,
        mtu: int = 1500,
        max_pending_packets: int = 1000,
        connect_timeout_s: float = 5.0,
        write_timeout_s: float = 60.0,
    ) -> None:
        if not 576 <= mtu <= MAX_PACKET_BYTES:
            raise ChannelError(f"mtu={mtu!r} is invalid: expected 576..{MAX_PACKET_BYTES}")
        if max_pending_packets <= 0:
            raise ChannelError(f"max_pending_packets={max_pending_packets!r} is invalid: expected > 0")
        if subnet_index is not None:
            subnet_addresses(subnet_index)  # validates
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.downlink = downlink
        self.uplink = uplink
        self.seed = seed
        self.name = name
        self.mtu = mtu
        self.max_pending_packets = max_pending_packets
        self.connect_timeout_s = connect_timeout_s
        self.write_timeout_s = write_timeout_s
        self.downlink_model = LinkModel(downlink, np.random.default_rng([seed, 0]))
        self.uplink_model = LinkModel(uplink, np.random.default_rng([seed, 1]))
        self.counters = TunLinkCounters()
        self.device_namespace = NetworkNamespace()
        self.host_interface = self.device_namespace.name  # the host-side TUN is named like the namespace
        self._requested_index = subnet_index
        self.subnet_index: int | None = None
        self.host_address = ""
        self.device_address = ""
        self._fds: list[int] = []
        self._emulator: _PacketEmulator | None = None
        self._relays: NamespaceRelays | None = None

    @property
    def downlink_counters(self) -> LinkCounters:
        return self.downlink_model.counters

    @property
    def uplink_counters(self) -> LinkCounters:
        return self.uplink_model.counters

    def reconfigure(self, downlink: LinkParameters | None = None, uplink: LinkParameters | None = None) -> None:
        """Carry the packets of the given directions with new parameters from now on (a `link` event); packets
        already given a delivery time keep it (``LinkModel.reconfigure``)."""
        now = asyncio.get_running_loop().time()
        for model, params in ((self.downlink_model, downlink), (self.uplink_model, uplink)):
            if params is not None:
                model.reconfigure(params, now)
        self.downlink, self.uplink = self.downlink_model.params, self.uplink_model.params

    def add_outage(self, duration_s: float, downlink: bool = True, uplink: bool = True) -> None:
        """Drop every packet of the chosen directions from now for ``duration_s`` (an `outage` event, or a one-way
        `partition`): the kernel's TCP in the namespace sees the loss and recovers, or gives up, by itself."""
        now = asyncio.get_running_loop().time()
        for model, chosen in ((self.downlink_model, downlink), (self.uplink_model, uplink)):
            if chosen:
                model.add_outage(now, now + duration_s)

    async def partition(self, duration_s: float) -> None:
        """Cut the device off both ways for ``duration_s``: at the packet level that is an outage of both directions
        (the connections live on in the kernel, as they would across a real cut, until TCP gives up on them)."""
        self.add_outage(duration_s)

    @property
    def error(self) -> BaseException | None:
        """The emulator's first failure (it keeps running past model errors), or None."""
        return self._emulator.error if self._emulator is not None else None

    async def __aenter__(self) -> TunLink:
        require_netns_support()
        try:
            self._setup_interfaces()
            self._emulator = _PacketEmulator(self._fds[0], self._fds[1], self.downlink_model,
                                             self.uplink_model, self.counters, self.max_pending_packets,
                                             self.name)
            self._relays = NamespaceRelays(self.name, self.upstream_host, self.upstream_port, self.host_address,
                                           self.device_namespace, None, self.connect_timeout_s,
                                           self.write_timeout_s)
            await self._relays.start()
        except BaseException:
            await self.aclose()
            raise
        logger.info("%s: tun link %s ⇄ %s (namespace %s), broker via %s:%d (down: %s; up: %s)", self.name,
                    self.host_address, self.device_address, self.device_namespace.name,
                    *self.broker_address, self.downlink.description, self.uplink.description)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        await self.aclose()

    def _setup_interfaces(self) -> None:
        index = self._requested_index if self._requested_index is not None else _free_subnet_index()
        _claimed.add(index)
        self.subnet_index = index
        self.host_address, self.device_address = subnet_addresses(index)
        namespace = self.device_namespace
        namespace.create()
        with entered(namespace):  # the TUN device is created in the namespace of the opening thread
            device_fd = open_tun(DEVICE_INTERFACE)
        self._fds.append(device_fd)
        self._fds.insert(0, open_tun(self.host_interface))  # [host fd, device fd]
        namespace.ip("link", "set", "dev", DEVICE_INTERFACE, "mtu", str(self.mtu), "addrgenmode", "none")
        namespace.ip("addr", "add", f"{self.device_address}/30", "dev", DEVICE_INTERFACE)
        namespace.ip("link", "set", "dev", DEVICE_INTERFACE, "up")
        namespace.ip("route", "add", "default", "via", self.host_address, "dev", DEVICE_INTERFACE)
        host_ip("link", "set", "dev", self.host_interface, "mtu", str(self.mtu), "addrgenmode", "none")
        host_ip("addr", "add", f"{self.host_address}/30", "dev", self.host_interface)
        host_ip("link", "set", "dev", self.host_interface, "up")

    async def aclose(self) -> None:
        """Close relays, stop the emulator, remove both TUN devices and the namespace (each step runs)."""
        try:
            if self._relays is not None:
                await self._relays.close()
        finally:
            self._relays = None
            if self._emulator is not None:
                self._emulator.close()
            for fd in self._fds:  # closing a TUN fd removes its device
                os.close(fd)
            self._fds = []
            if self.subnet_index is not None:
                _claimed.discard(self.subnet_index)
            self.device_namespace.delete()


@register_link_backend("tun", packet_level=True, shared_cells=False)
def open_tun_link(request: LinkRequest) -> TunLink:
    """IP packets through TUN devices into a network namespace (Linux, root): the kernel's TCP meets the drops."""
    return TunLink(request.upstream_host, request.upstream_port, downlink=request.downlink, uplink=request.uplink,
                   seed=request.seed, name=request.name)
