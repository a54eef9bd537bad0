"""From the scenario's channel section to link parameters (profiles, overrides, traces, cells) and each device's link."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from channel.backend import EmulatedLink, LinkBackend, LinkRequest
from channel.errors import ChannelError
from channel.link import LinkParameters
from channel.proxy import LinkProxy
from channel.loss import GilbertElliottLoss
from channel.outage import RandomOutages, ScheduledOutage
from testbed.core.plugins import LINK_BACKENDS, LINK_PROFILES, PluginError
from testbed.core.seeds import Stream, generator
from channel.shared import SharedLink
from channel.trace import load_trace

if TYPE_CHECKING:
    from testbed.core.scenario import CellSpec, ChannelSpec, LinkSpec


def link_parameters(spec: LinkSpec | None, profile: LinkParameters | None) -> LinkParameters:
    """One direction's parameters: the fields the scenario gives, over the named profile or an unlimited link."""
    base = profile or LinkParameters(rate_bps=None)
    if spec is None:
        return base
    given = spec.model_fields_set
    changes: dict[str, Any] = {
        name: getattr(spec, name)
        for name in ("rate_bps", "delay_s", "jitter_s", "delay_distribution", "loss", "duplicate", "reorder",
                     "overhead_bytes", "mss_bytes", "queue_bytes", "recovery")
        if name in given
    }
    if "gilbert_elliott" in given and spec.gilbert_elliott is not None:
        model = spec.gilbert_elliott
        changes["loss"] = 0.0
        changes["loss_model"] = GilbertElliottLoss(
            model.p, 1.0 - model.p if model.r is None else model.r, model.one_minus_h, model.one_minus_k)
    elif "loss" in given:
        changes["loss_model"] = None
    if "outages" in given:
        changes["outages"] = tuple(ScheduledOutage(o.at_s, o.duration_s) for o in spec.outages)
    if "random_outages" in given and spec.random_outages is not None:
        changes["random_outages"] = RandomOutages(spec.random_outages.mean_up_s, spec.random_outages.mean_down_s)
    if "trace" in given and spec.trace is not None:
        changes["trace"] = load_trace(spec.trace)
        changes["rate_bps"] = None
    elif "rate_bps" in given:
        changes["trace"] = None
    return dataclasses.replace(base, **changes)


def resolve_links(channel: ChannelSpec) -> tuple[LinkParameters, LinkParameters]:
    """(downlink, uplink) of every device's link in this scenario."""
    profile = LINK_PROFILES.get(channel.profile) if channel.profile else None
    return (
        link_parameters(channel.downlink, profile.downlink if profile else None),
        link_parameters(channel.uplink, profile.uplink if profile else None),
    )


def resolve_cell_links(channel: ChannelSpec, cell: CellSpec) -> tuple[LinkParameters, LinkParameters]:
    """(downlink, uplink) of a cell's shared bottleneck: the cell's profile and directions, else the channel's."""
    profile_name = cell.profile or channel.profile
    profile = LINK_PROFILES.get(profile_name) if profile_name else None
    downlink = cell.downlink if cell.downlink is not None else channel.downlink
    uplink = cell.uplink if cell.uplink is not None else channel.uplink
    return (
        link_parameters(downlink, profile.downlink if profile else None),
        link_parameters(uplink, profile.uplink if profile else None),
    )


class DeviceLinks:
    """Each device's emulated link for one run: its own link, or a flow of its cell's shared bottleneck.

    Builds one SharedLink per cell and direction (seeded from ``seed`` and the cell's index);
    ``open(device_id, ...)`` gives the device's link (an async context manager exposing ``.address``
    and ``downlink_counters``/``uplink_counters``; for a cell member, its own flow's counters).
    """

    def __init__(self, channel: ChannelSpec, seed: int) -> None:
        self.channel = channel
        self.default = resolve_links(channel)
        self._cells: dict[str, tuple[str, SharedLink, SharedLink]] = {}
        for index, cell in enumerate(channel.cells):
            downlink, uplink = resolve_cell_links(channel, cell)
            shared = (cell.name, SharedLink(downlink, generator(seed, Stream.CELL_LINK, index, 0)),
                      SharedLink(uplink, generator(seed, Stream.CELL_LINK, index, 1)))
            self._cells.update(dict.fromkeys(cell.devices, shared))

    def cell_of(self, device_id: str) -> str | None:
        """Name of the cell ``device_id`` is in, or None if it has a link of its own."""
        cell = self._cells.get(device_id)
        return None if cell is None else cell[0]

    def parameters(self, device_id: str) -> tuple[LinkParameters, LinkParameters]:
        """(downlink, uplink) parameters of the link ``device_id`` is behind."""
        cell = self._cells.get(device_id)
        return self.default if cell is None else (cell[1].params, cell[2].params)

    def open(self, device_id: str, upstream: tuple[str, int], seed: int, listen_host: str | None = None,
             listen_port: int = 0) -> Any:
        """``device_id``'s link to ``upstream``; ``seed`` seeds a link of its own (unused in a cell).

        With ``listen_host`` (a network device's endpoint, for a board on another host, or the address
        testbed.loopback_listeners gives a proxy link, with its ``listen_port``) the link is the proxy
        backend's listener on that address, whatever the scenario's backend (the others emulate this host's
        own connections only).
        """
        cell = self._cells.get(device_id)
        if cell is None and listen_host is not None:
            downlink, uplink = self.default
            return LinkProxy(*upstream, downlink=downlink, uplink=uplink, seed=seed, name=device_id,
                             listen_host=listen_host, listen_port=listen_port,
                             outage_reset_after_s=self.channel.reset_after_s)
        if cell is None:
            downlink, uplink = self.default
            return open_link(self.channel.backend, upstream, downlink, uplink, seed=seed, name=device_id,
                             reset_after_s=self.channel.reset_after_s)
        if not LINK_BACKENDS.attributes(self.channel.backend).get("shared_cells"):  # the scenario rejects this too
            raise ChannelError(f"cell {cell[0]!r}: shared links need the 'proxy' backend, "
                               f"not {self.channel.backend!r}")
        host, port = upstream
        return LinkProxy(host, port, name=device_id, outage_reset_after_s=self.channel.reset_after_s,
                         downlink_model=cell[1].flow(device_id), uplink_model=cell[2].flow(device_id),
                         listen_host=listen_host or "127.0.0.1", listen_port=listen_port)


def open_link(backend: str, upstream: tuple[str, int], downlink: LinkParameters, uplink: LinkParameters,
              seed: int, name: str, reset_after_s: float | None) -> EmulatedLink:
    """The emulated link of one device (an async context manager exposing ``.address``) from the named backend."""
    try:
        open_backend: LinkBackend = LINK_BACKENDS.get(backend)
    except PluginError as error:
        raise ChannelError(str(error)) from None
    host, port = upstream
    return open_backend(LinkRequest(host, port, downlink, uplink, seed=seed, name=name, reset_after_s=reset_after_s))
