"""The ``netem`` backend's pure half: the ``tc`` (netem + htb, ifb for ingress) argv lists giving a device a LinkParameters.

``netem_commands(device, params, direction)`` returns the argv lists (``tc ...`` and, for ingress,
``ip link ...``) that give ``device`` the link ``params`` describes, exactly as iproute2 parses
them; ``teardown_commands`` undoes them on a device you keep. ``channel.netem.NetemLink`` applies
them in a pair of network namespaces.

Qdisc layout (``direction`` = which way the packets cross ``device``):

* rate only: ``root handle 1: htb default 1`` and class ``1:1`` (``rate = ceil = rate_bps``,
  ``burst = cburst = bucket_depth_bytes``). No netem needed, so this runs on kernels without it.
* delay/loss/duplicate/reorder only: ``root handle 1: netem ...``.
* both: ``root handle 1: netem ...`` with ``htb`` as its child (``parent 1:1 handle 2:``, class
  ``2:1``), the layout of tc-netem(8)'s "rate with tbf" example. Not htb-root-with-netem-child:
  htb pulls from a netem child only once a packet's delay has passed, so under a backlog the
  queueing at the rate *absorbs* the delay (``max`` instead of the model's ``sum``). With netem
  first, a packet waits its delay and then its turn at the rate: queueing + delay, as
  ``LinkModel`` says. netem's own ``rate`` is never used.
* ``ingress``: ``ip link add IFB txqueuelen 1000 type ifb``, an ``ingress`` qdisc on ``device``, a
  ``u32`` match-all filter with ``action mirred egress redirect dev IFB``, and the layout above on
  the IFB device's egress.

Mapping of ``LinkParameters`` fields (netem names):

* ``delay_s``/``jitter_s``: ``delay Xms Yms``; ``delay_distribution`` ``normal``/``pareto`` add
  ``distribution NAME`` (``uniform`` is netem's default, no table). tc refuses a distribution
  without a delay, so ``delay_s = 0`` with a non-uniform distribution raises ChannelError.
* ``loss``/``BernoulliLoss``: ``loss random P%``; ``GilbertElliottLoss``: ``loss gemodel p r 1-h 1-k``
  (all four as percentages, in tc-netem(8)'s documented order; see ``channel.loss`` about checking
  the third argument's meaning on your kernel).
* ``duplicate``/``reorder``: ``duplicate P%``/``reorder P%``; reorder needs ``delay_s > 0``
  (netem reorders by sending some packets without the delay) or raises ChannelError.
* ``overhead_bytes`` (approximated): htb counts each packet as the kernel sees it on the device,
  i.e. the IP packet with its real IPv4+TCP headers (40 B, 52 B with timestamps) plus the 14 B
  Ethernet header of veth. Only the modelled overhead beyond those ``54`` B is added with htb's
  ``overhead N`` (htb charges it per skb, hence ``gso_max_segs 1`` below). With the default
  ``overhead_bytes=40`` a full segment costs 1514 B for 1448 B of payload (Linux adds 12 B of TCP
  timestamps) where the model counts 1500 B for 1460 B: goodput 1.8% below ``goodput_bps``.
  Smaller modelled overheads (header-compressed radios) are not reachable. htb's ``mpu`` is not
  used: the model has no minimum packet size.
* ``mss_bytes``: ``NetemLink`` sets the veth MTU to ``mss_bytes + 40`` (smaller of the two
  directions) so the kernel's TCP uses that MSS; ``netem_commands`` does not touch the MTU.
* ``burst_bytes``: the htb ``burst``/``cburst`` (``bucket_depth_bytes``).
* segmentation: ``NetemLink`` sets ``gso_max_segs 1`` on both veth ends, so every skb the qdiscs
  see is one wire packet (with GSO, netem would drop and htb would charge overhead per 64 KB
  super-packet). Apply the same (``ethtool -K DEV tso off gso off gro off``) on your own devices.
* TCP-stream semantics (``min_rto_s``, ``max_backoffs``): not emulated — netem drops packets and
  the kernel's real TCP retransmits with its own RTO and backoff.
* ``outages``, ``random_outages``, ``trace``: netem cannot vary over time; ChannelError names the
  field (use ``channel.backend: tun`` or ``proxy``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from channel.errors import ChannelError
from channel.link import LinkParameters
from channel.loss import BernoulliLoss, GilbertElliottLoss

Direction = Literal["egress", "ingress"]

#: IPv4 (20 B) + TCP (20 B) headers without options: what every real packet carries anyway.
IPV4_TCP_HEADER_BYTES = 40
#: Ethernet header htb counts on a veth device.
ETHERNET_HEADER_BYTES = 14
#: netem's default queue limit and veth's txqueuelen, in packets; also used for the ifb device.
QUEUE_LIMIT_PACKETS = 1000
#: Smallest IPv4 MTU (RFC 791).
MIN_IPV4_MTU = 68
#: What to tell the user when the kernel has no netem.
NO_NETEM_MESSAGE = "the kernel has no sch_netem (modprobe sch_netem, or use channel.backend: tun/proxy)"

def _decimal(value: float, digits: int) -> str:
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _percent(probability: float) -> str:
    """``0.015`` -> ``"1.5%"`` (netem's resolution is far finer than 6 decimals of a percent)."""
    return _decimal(probability * 100.0, 6) + "%"


def _milliseconds(seconds: float) -> str:
    """``0.0002`` -> ``"0.2ms"`` (microsecond resolution)."""
    return _decimal(seconds * 1e3, 3) + "ms"


def _unsupported(field: str, value: object, why: str) -> ChannelError:
    return ChannelError(f"LinkParameters.{field}={value!r} cannot be expressed by the netem backend: {why}; "
                        "use channel.backend: tun or proxy for it")


def _check_expressible(params: LinkParameters) -> None:
    if params.trace is not None:
        raise _unsupported("trace", params.trace, "netem/htb rates are fixed, a trace varies over time")
    if params.outages:
        raise _unsupported("outages", params.outages, "netem has no scheduled outages")
    if params.random_outages is not None:
        raise _unsupported("random_outages", params.random_outages, "netem has no random outages")
    if params.queue_bytes is not None and params.rate_bps is None:
        raise _unsupported("queue_bytes", params.queue_bytes, "a bottleneck queue needs a rate (htb) to queue at")


def netem_options(params: LinkParameters) -> list[str]:
    """The arguments after ``netem`` for ``params``' delay, loss, duplication and reordering ([] = no netem needed)."""
    _check_expressible(params)
    options: list[str] = []
    delay, jitter = _milliseconds(params.delay_s), _milliseconds(params.jitter_s)
    if delay != "0ms" or jitter != "0ms":
        options += ["delay", delay]
        if jitter != "0ms":
            options.append(jitter)
            if params.delay_distribution != "uniform":
                if delay == "0ms":
                    raise _unsupported("delay_distribution", params.delay_distribution,
                                       "tc accepts a distribution table only with delay_s > 0")
                options += ["distribution", params.delay_distribution]
    model = params.loss_process
    if isinstance(model, GilbertElliottLoss):
        if model.stationary_loss_rate > 0:
            options += ["loss", "gemodel", _percent(model.p), _percent(model.r or 0.0),
                        _percent(model.one_minus_h), _percent(model.one_minus_k)]
    elif isinstance(model, BernoulliLoss):
        if _percent(model.p) != "0%":
            options += ["loss", "random", _percent(model.p)]
    else:  # LinkParameters validates this already; kept so a new loss model cannot pass silently
        raise _unsupported("loss_model", model, "only BernoulliLoss and GilbertElliottLoss map to netem")
    if _percent(params.duplicate) != "0%":
        options += ["duplicate", _percent(params.duplicate)]
    if _percent(params.reorder) != "0%":
        if delay == "0ms":
            raise _unsupported("reorder", params.reorder,
                               "netem reorders by skipping the delay, so it needs delay_s > 0")
        options += ["reorder", _percent(params.reorder)]
    if options and params.rate_bps is not None:
        # the netem queue holds the delayed packets and the rate's backlog: keep at least two
        # bandwidth-delay products of full packets, never fewer than netem's default.
        packets_per_second = params.rate_bps / 8.0 / params.packet_bytes
        in_flight = packets_per_second * (params.delay_s + 2.0 * params.jitter_s)
        limit = max(QUEUE_LIMIT_PACKETS, math.ceil(2.0 * in_flight))
        if limit > QUEUE_LIMIT_PACKETS:
            options += ["limit", str(limit)]
    return options


def htb_overhead_bytes(params: LinkParameters) -> int:
    """Bytes htb adds per packet: the modelled overhead beyond the real IPv4+TCP and Ethernet headers (>= 0)."""
    return max(0, params.overhead_bytes - IPV4_TCP_HEADER_BYTES - ETHERNET_HEADER_BYTES)


def _htb_commands(device: str, params: LinkParameters, parent: list[str], handle: str) -> list[list[str]]:
    assert params.rate_bps is not None
    rate = round(params.rate_bps)
    if rate < 1:
        raise _unsupported("rate_bps", params.rate_bps, "htb's smallest rate is 1 bit/s")
    burst = str(params.bucket_depth_bytes)
    klass = [
        "tc", "class", "add", "dev", device, "parent", f"{handle}:", "classid", f"{handle}:1", "htb",
        "rate", f"{rate}bit", "ceil", f"{rate}bit", "burst", burst, "cburst", burst,
    ]
    overhead = htb_overhead_bytes(params)
    if overhead:
        klass += ["overhead", str(overhead)]
    return [["tc", "qdisc", "add", "dev", device, *parent, "handle", f"{handle}:", "htb", "default", "1"], klass]


def bfifo_limit_bytes(params: LinkParameters) -> int:
    """bfifo's limit for ``queue_bytes``: it counts frames with their Ethernet header, the model IP packets."""
    assert params.queue_bytes is not None
    return params.queue_bytes + (params.queue_bytes // params.packet_bytes) * ETHERNET_HEADER_BYTES


def shaping_commands(device: str, params: LinkParameters) -> list[list[str]]:
    """The qdiscs shaping packets *leaving* ``device`` (see the module docstring for the layout).

    A bounded bottleneck queue (``queue_bytes``) is a ``bfifo`` under the htb class: drop-tail where
    packets wait for the rate, like the model's queue.
    """
    options = netem_options(params)
    commands: list[list[str]] = []
    if options:
        commands.append(["tc", "qdisc", "add", "dev", device, "root", "handle", "1:", "netem", *options])
    if params.rate_bps is not None:
        handle = "2" if options else "1"
        commands += _htb_commands(device, params, ["parent", "1:1"] if options else ["root"], handle)
        if params.queue_bytes is not None:
            commands.append(["tc", "qdisc", "add", "dev", device, "parent", f"{handle}:1", "handle", f"{handle}0:",
                             "bfifo", "limit", str(bfifo_limit_bytes(params))])
    return commands


def default_ifb_name(device: str) -> str:
    """The ifb device ``netem_commands`` redirects ``device``'s ingress to: ``ifb-`` + device (15 chars max)."""
    return f"ifb-{device}"[:15]


def netem_commands(device: str, params: LinkParameters, direction: Direction = "egress",
                   ifb_device: str | None = None) -> list[list[str]]:
    """argv lists giving ``device`` the link ``params`` in ``direction`` ([] when ``params`` shapes nothing).

    ``egress``: packets leaving ``device``; ``ingress``: packets arriving on it, redirected to
    ``ifb_device`` (default ``default_ifb_name(device)``), which is created and shaped on its egress.
    Raises ChannelError naming the field netem cannot express.
    """
    if direction not in ("egress", "ingress"):
        raise ChannelError(f"direction={direction!r} is invalid: expected 'egress' or 'ingress'")
    if direction == "egress":
        return shaping_commands(device, params)
    ifb = ifb_device if ifb_device is not None else default_ifb_name(device)
    if not 0 < len(ifb) <= 15 or any(character.isspace() or character == "/" for character in ifb):
        raise ChannelError(f"ifb_device={ifb!r} is invalid: expected an interface name of 1..15 characters, "
                           "no spaces or '/'")
    shaping = shaping_commands(ifb, params)
    if not shaping:
        return []
    return [
        ["ip", "link", "add", ifb, "txqueuelen", str(QUEUE_LIMIT_PACKETS), "type", "ifb"],
        ["ip", "link", "set", "dev", ifb, "up"],
        ["tc", "qdisc", "add", "dev", device, "handle", "ffff:", "ingress"],
        ["tc", "filter", "add", "dev", device, "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
         "action", "mirred", "egress", "redirect", "dev", ifb],
        *shaping,
    ]


def teardown_commands(device: str, direction: Direction = "egress", ifb_device: str | None = None) -> list[list[str]]:
    """argv lists removing what ``netem_commands(device, ..., direction)`` added (run them ignoring failures)."""
    if direction == "egress":
        return [["tc", "qdisc", "del", "dev", device, "root"]]
    if direction == "ingress":
        ifb = ifb_device if ifb_device is not None else default_ifb_name(device)
        return [["tc", "qdisc", "del", "dev", device, "ingress"], ["ip", "link", "del", ifb]]
    raise ChannelError(f"direction={direction!r} is invalid: expected 'egress' or 'ingress'")


def missing_kernel_part(args: Sequence[str], stderr: str) -> str | None:
    """The "the kernel has no ..." message for a failure caused by a missing module, else None."""
    if "qdisc kind is unknown" in stderr or "Unknown qdisc" in stderr:
        kinds = [kind for kind in ("netem", "htb", "ingress", "tbf") if kind in args]
        if "netem" in kinds:
            return NO_NETEM_MESSAGE
        kind = kinds[0] if kinds else "the requested qdisc"
        return f"the kernel has no sch_{kind} (modprobe sch_{kind}, or use channel.backend: tun/proxy)"
    if "type" in args and "ifb" in args and ("Unknown device type" in stderr or "not supported" in stderr):
        return "the kernel has no ifb driver for ingress (uplink) shaping (modprobe ifb, or use channel.backend: tun/proxy)"
    if "mirred" in args and ("action" in stderr.lower() or "unknown" in stderr.lower()):
        return "the kernel has no cls_u32/act_mirred for ingress redirection (modprobe cls_u32 act_mirred)"
    return None


def link_mtu_bytes(*params: LinkParameters | None) -> int:
    """The veth MTU for these directions: the smallest ``mss_bytes`` + 40 B of IPv4+TCP headers (68..65535)."""
    mss = min((p.mss_bytes for p in params if p is not None), default=1460)
    return max(MIN_IPV4_MTU, min(65535, mss + IPV4_TCP_HEADER_BYTES))



__all__ = [
    "ETHERNET_HEADER_BYTES",
    "IPV4_TCP_HEADER_BYTES",
    "MIN_IPV4_MTU",
    "NO_NETEM_MESSAGE",
    "QUEUE_LIMIT_PACKETS",
    "Direction",
    "default_ifb_name",
    "htb_overhead_bytes",
    "link_mtu_bytes",
    "missing_kernel_part",
    "netem_commands",
    "netem_options",
    "shaping_commands",
    "teardown_commands",
]
