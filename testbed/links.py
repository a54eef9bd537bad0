"""From the scenario's channel section to the link models' parameters (profiles, overrides, traces)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from channel.link import LinkParameters
from channel.proxy import LinkProxy
from channel.loss import GilbertElliottLoss
from channel.outage import RandomOutages, ScheduledOutage
from channel.profiles import PROFILES
from channel.trace import load_trace

if TYPE_CHECKING:
    from testbed.scenario import ChannelSpec, LinkSpec


def link_parameters(spec: LinkSpec | None, profile: LinkParameters | None) -> LinkParameters:
    """One direction's parameters: the fields the scenario gives, over the named profile or an unlimited link."""
    base = profile or LinkParameters(rate_bps=None)
    if spec is None:
        return base
    given = spec.model_fields_set
    changes: dict[str, Any] = {
        name: getattr(spec, name)
        for name in ("rate_bps", "delay_s", "jitter_s", "delay_distribution", "loss", "duplicate", "reorder",
                     "overhead_bytes", "mss_bytes")
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
    profile = PROFILES[channel.profile] if channel.profile else None
    return (
        link_parameters(channel.downlink, profile.downlink if profile else None),
        link_parameters(channel.uplink, profile.uplink if profile else None),
    )


LINK_BACKENDS = ("proxy", "tun")


def open_link(backend: str, upstream: tuple[str, int], downlink: LinkParameters, uplink: LinkParameters,
              seed: int, name: str, reset_after_s: float | None) -> Any:
    """The emulated link of one device (an async context manager exposing `.address`) for a backend.

    `proxy`: the user-space TCP proxy (any OS, unprivileged). `tun`: packets through TUN devices into a
    network namespace (Linux, root), so the kernel's own TCP meets the drops; the device still
    connects to a local address, relayed from inside its namespace.
    """
    host, port = upstream
    if backend == "proxy":
        return LinkProxy(host, port, downlink=downlink, uplink=uplink, seed=seed, name=name,
                         outage_reset_after_s=reset_after_s)
    if backend == "tun":
        from channel.tun import TunLink

        return TunLink(host, port, downlink=downlink, uplink=uplink, seed=seed, name=name)
    raise ValueError(f"unknown channel backend {backend!r}; choose one of {', '.join(LINK_BACKENDS)}")
