"""Tests of the netem backend: tc command generation (pure), kernel probing, and htb/ifb shaping measured for real."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import re
import select
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channel.errors import ChannelError
from channel.link import LinkParameters
from channel.loss import BernoulliLoss, GilbertElliottLoss
from channel.netem import (
    NetemLink,
    counters_from_link_stats,
    counters_from_qdisc_stats,
    kernel_supports,
)
from channel.netem_commands import (
    ETHERNET_HEADER_BYTES,
    NO_NETEM_MESSAGE,
    htb_overhead_bytes,
    link_mtu_bytes,
    netem_commands,
    teardown_commands,
)
from channel.netns import list_namespaces, require_netns_support
from channel.outage import RandomOutages, ScheduledOutage
from channel.trace import RateScheduleTrace

TC = ["tc", "qdisc", "add", "dev", "eth0"]
HTB_ROOT = ["tc", "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "1"]
INGRESS_SETUP = [
    ["ip", "link", "add", "ifb-eth0", "txqueuelen", "1000", "type", "ifb"],
    ["ip", "link", "set", "dev", "ifb-eth0", "up"],
    ["tc", "qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress"],
    ["tc", "filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0",
     "action", "mirred", "egress", "redirect", "dev", "ifb-eth0"],
]


def htb_class(device: str, handle: str, rate: str, burst: str, *extra: str) -> list[str]:
    return ["tc", "class", "add", "dev", device, "parent", f"{handle}:", "classid", f"{handle}:1", "htb",
            "rate", rate, "ceil", rate, "burst", burst, "cburst", burst, *extra]


CASES: list[tuple[str, LinkParameters, str, list[list[str]]]] = [
    ("unlimited-nothing", LinkParameters(None), "egress", []),
    ("unlimited-nothing-ingress", LinkParameters(None), "ingress", []),
    ("rate-only", LinkParameters(2_000_000), "egress",
     [HTB_ROOT, htb_class("eth0", "1", "2000000bit", "1500")]),
    ("rate-burst-overhead", LinkParameters(26_000.4, overhead_bytes=100, burst_bytes=3000), "egress",
     [HTB_ROOT, htb_class("eth0", "1", "26000bit", "3000", "overhead", "46")]),
    ("delay-only", LinkParameters(None, delay_s=0.1), "egress",
     [[*TC, "root", "handle", "1:", "netem", "delay", "100ms"]]),
    ("delay-jitter-uniform", LinkParameters(None, delay_s=0.0002, jitter_s=0.0015), "egress",
     [[*TC, "root", "handle", "1:", "netem", "delay", "0.2ms", "1.5ms"]]),
    ("delay-jitter-normal", LinkParameters(None, delay_s=0.05, jitter_s=0.01, delay_distribution="normal"),
     "egress", [[*TC, "root", "handle", "1:", "netem", "delay", "50ms", "10ms", "distribution", "normal"]]),
    ("jitter-without-delay-uniform", LinkParameters(None, jitter_s=0.005), "egress",
     [[*TC, "root", "handle", "1:", "netem", "delay", "0ms", "5ms"]]),
    ("bernoulli-loss", LinkParameters(None, loss=0.015), "egress",
     [[*TC, "root", "handle", "1:", "netem", "loss", "random", "1.5%"]]),
    ("bernoulli-model", LinkParameters(None, loss_model=BernoulliLoss(0.2)), "egress",
     [[*TC, "root", "handle", "1:", "netem", "loss", "random", "20%"]]),
    ("gilbert-elliott", LinkParameters(None, loss_model=GilbertElliottLoss(0.01, 0.3, 0.9, 0.001)), "egress",
     [[*TC, "root", "handle", "1:", "netem", "loss", "gemodel", "1%", "30%", "90%", "0.1%"]]),
    ("simple-gilbert-defaults", LinkParameters(None, loss_model=GilbertElliottLoss(0.05)), "egress",
     [[*TC, "root", "handle", "1:", "netem", "loss", "gemodel", "5%", "95%", "100%", "0%"]]),
    ("duplicate-reorder", LinkParameters(None, delay_s=0.01, duplicate=0.01, reorder=0.25), "egress",
     [[*TC, "root", "handle", "1:", "netem", "delay", "10ms", "duplicate", "1%", "reorder", "25%"]]),
    ("lte-m-like-netem-and-htb", LinkParameters(375_000, delay_s=0.1, jitter_s=0.02, loss=0.005), "egress",
     [[*TC, "root", "handle", "1:", "netem", "delay", "100ms", "20ms", "loss", "random", "0.5%"],
      ["tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "2:", "htb", "default", "1"],
      htb_class("eth0", "2", "375000bit", "1500")]),
    ("big-bdp-raises-netem-limit", LinkParameters(100_000_000, delay_s=0.3, delay_distribution="pareto",
                                                  jitter_s=0.01), "egress",
     [[*TC, "root", "handle", "1:", "netem", "delay", "300ms", "10ms", "distribution", "pareto",
       "limit", "5334"],
      ["tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "2:", "htb", "default", "1"],
      htb_class("eth0", "2", "100000000bit", "1500")]),
    ("rate-with-bounded-queue", LinkParameters(100_000, queue_bytes=6000), "egress",  # 4 frames of 1500 + 14 B
     [HTB_ROOT, htb_class("eth0", "1", "100000bit", "1500"),
      ["tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "10:", "bfifo", "limit", "6056"]]),
    ("delay-rate-and-queue", LinkParameters(100_000, delay_s=0.05, queue_bytes=3000), "egress",
     [[*TC, "root", "handle", "1:", "netem", "delay", "50ms"],
      ["tc", "qdisc", "add", "dev", "eth0", "parent", "1:1", "handle", "2:", "htb", "default", "1"],
      htb_class("eth0", "2", "100000bit", "1500"),
      ["tc", "qdisc", "add", "dev", "eth0", "parent", "2:1", "handle", "20:", "bfifo", "limit", "3028"]]),
    ("ingress-rate", LinkParameters(500_000), "ingress",
     [*INGRESS_SETUP,
      ["tc", "qdisc", "add", "dev", "ifb-eth0", "root", "handle", "1:", "htb", "default", "1"],
      htb_class("ifb-eth0", "1", "500000bit", "1500")]),
    ("ingress-delay-and-rate", LinkParameters(62_000, delay_s=1.6, loss=0.01), "ingress",
     [*INGRESS_SETUP,
      ["tc", "qdisc", "add", "dev", "ifb-eth0", "root", "handle", "1:", "netem", "delay", "1600ms",
       "loss", "random", "1%"],
      ["tc", "qdisc", "add", "dev", "ifb-eth0", "parent", "1:1", "handle", "2:", "htb", "default", "1"],
      htb_class("ifb-eth0", "2", "62000bit", "1500")]),
]


@pytest.mark.parametrize(("params", "direction", "expected"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_generated_commands_match_hand_written(params: LinkParameters, direction: str,
                                               expected: list[list[str]]) -> None:
    assert netem_commands("eth0", params, direction) == expected  # type: ignore[arg-type]


def test_ingress_uses_the_given_ifb_device() -> None:
    commands = netem_commands("host0", LinkParameters(1e6), "ingress", ifb_device="ifb3")
    assert commands[0] == ["ip", "link", "add", "ifb3", "txqueuelen", "1000", "type", "ifb"]
    assert commands[3][-1] == "ifb3" and commands[-1][4] == "ifb3"


@pytest.mark.parametrize(("params", "field"), [
    (LinkParameters(None, trace=RateScheduleTrace((0.0, 1.0), (1e6, 2e6))), "trace"),
    (LinkParameters(1e6, outages=(ScheduledOutage(5.0, 1.0),)), "outages"),
    (LinkParameters(1e6, random_outages=RandomOutages(10.0, 1.0)), "random_outages"),
    (LinkParameters(None, reorder=0.1), "reorder"),
    (LinkParameters(None, jitter_s=0.01, delay_distribution="normal"), "delay_distribution"),
    (LinkParameters(0.4), "rate_bps"),
    (LinkParameters(None, queue_bytes=6000), "queue_bytes"),
])
@pytest.mark.parametrize("direction", ["egress", "ingress"])
def test_what_netem_cannot_express_raises_naming_the_field(params: LinkParameters, field: str,
                                                           direction: str) -> None:
    with pytest.raises(ChannelError, match=rf"LinkParameters\.{field}=.*netem backend.*tun or proxy"):
        netem_commands("eth0", params, direction)  # type: ignore[arg-type]


def test_bad_direction_and_ifb_name_raise() -> None:
    with pytest.raises(ChannelError, match="direction='uplink'"):
        netem_commands("eth0", LinkParameters(1e6), "uplink")  # type: ignore[arg-type]
    with pytest.raises(ChannelError, match="ifb_device"):
        netem_commands("eth0", LinkParameters(1e6), "ingress", ifb_device="a-name-far-too-long")


def test_teardown_undoes_each_direction() -> None:
    assert teardown_commands("eth0") == [["tc", "qdisc", "del", "dev", "eth0", "root"]]
    assert teardown_commands("eth0", "ingress") == [["tc", "qdisc", "del", "dev", "eth0", "ingress"],
                                                    ["ip", "link", "del", "ifb-eth0"]]


def test_overhead_and_mtu_mapping() -> None:
    assert htb_overhead_bytes(LinkParameters(1e6)) == 0  # 40 B modelled < 54 B the kernel counts anyway
    assert htb_overhead_bytes(LinkParameters(1e6, overhead_bytes=554)) == 500
    assert link_mtu_bytes(LinkParameters(1e6), None) == 1500
    assert link_mtu_bytes(LinkParameters(1e6, mss_bytes=222), LinkParameters(1e6, mss_bytes=1000)) == 262
    assert link_mtu_bytes(LinkParameters(1e6, mss_bytes=10)) == 68
    assert link_mtu_bytes(None, None) == 1500


probability = st.floats(0.0, 0.999, allow_nan=False)
seconds = st.floats(0.0, 5.0, allow_nan=False)
def _gilbert_elliott_or_none(p: float, r: float, one_minus_h: float, one_minus_k: float) -> GilbertElliottLoss | None:
    """The model, or None where GilbertElliottLoss refuses it (e.g. a chain that loses every packet)."""
    try:
        return GilbertElliottLoss(p, r, one_minus_h, one_minus_k)
    except ChannelError:
        return None


loss_models = st.one_of(
    st.none(),
    st.builds(BernoulliLoss, probability),
    st.builds(_gilbert_elliott_or_none, st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0),
              st.floats(0.0, 0.999)).filter(lambda model: model is not None),
)


@st.composite
def link_parameters(draw: st.DrawFn) -> LinkParameters:
    mss = draw(st.integers(1, 9000))
    overhead = draw(st.integers(0, 400))
    return LinkParameters(
        rate_bps=draw(st.one_of(st.none(), st.floats(1.0, 1e11))),
        delay_s=draw(seconds), jitter_s=draw(seconds),
        delay_distribution=draw(st.sampled_from(["uniform", "normal", "pareto"])),
        loss_model=draw(loss_models), duplicate=draw(probability), reorder=draw(probability),
        mss_bytes=mss, overhead_bytes=overhead,
        burst_bytes=draw(st.one_of(st.none(), st.integers(mss + overhead, 10 * (mss + overhead)))),
    )


def check_well_formed(command: list[str]) -> None:
    assert command[0] in ("tc", "ip") and len(command) > 3
    for argument in command:
        assert argument and argument == argument.strip() and not any(c.isspace() for c in argument)
        number = argument.removesuffix("%").removesuffix("ms").removesuffix("bit")
        if number[:1].isdigit() and ":" not in number:
            value = float(number)
            assert math.isfinite(value) and value >= 0
            if argument.endswith("%"):
                assert 0.0 <= value <= 100.0
            if argument.endswith("bit"):
                assert value >= 1 and number.isdigit()
    if "netem" in command:
        options = command[command.index("netem") + 1:]
        assert options, "netem without options"
        if "reorder" in options:
            assert options[:2] == ["delay", options[1]] and options[1] != "0ms"
        if "distribution" in options:
            assert options[1] != "0ms" and options[2] != "0ms"


@settings(max_examples=300, deadline=None)
@given(link_parameters(), st.sampled_from(["egress", "ingress"]))
def test_every_generated_command_is_well_formed(params: LinkParameters, direction: str) -> None:
    try:
        commands = netem_commands("veth-x", params, direction)  # type: ignore[arg-type]
    except ChannelError as error:
        assert any(f"LinkParameters.{field}=" in str(error) for field in ("reorder", "delay_distribution"))
        return
    for command in commands:
        check_well_formed(command)
    kinds = [command[command.index("handle") + 2] for command in commands if command[1] == "qdisc"
             and "ingress" not in command]
    assert kinds.count("netem") <= 1 and kinds.count("htb") == (params.rate_bps is not None and bool(commands))
    if params.rate_bps is None:
        assert not any("htb" in command for command in commands)


# --- privileged: namespaces, veth, tc ---------------------------------------------------------------------


@pytest.fixture
def netns() -> None:
    """Skip (fail when CI=true) unless this process can create network namespaces."""
    try:
        require_netns_support()
    except ChannelError as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the netem backend tests cannot run: {error}")
        pytest.skip(f"needs root and network namespaces: {error}")


def assert_removed(link: NetemLink) -> None:
    """Both of the link's namespaces are gone (others' namespaces, e.g. a parallel run's, are not our business)."""
    left = {link.host_namespace.name, link.device_namespace.name} & set(list_namespaces())
    assert not left, f"{link!r} left namespaces behind: {sorted(left)}"


def test_kernel_supports_probes_real_qdiscs(netns: None) -> None:
    assert kernel_supports("htb") is True
    assert kernel_supports("tbf") is True
    assert kernel_supports("no-such-qdisc") is False
    assert isinstance(kernel_supports("netem"), bool)


def test_missing_netem_gives_the_clear_error_and_cleans_up(netns: None) -> None:
    if kernel_supports("netem"):
        pytest.skip("this kernel has sch_netem; test_netem_delay_is_applied covers the positive path")
    link = NetemLink(downlink=LinkParameters(2e6, delay_s=0.05), uplink=LinkParameters(1e6), index=11)
    expected = f"^{re.escape(NO_NETEM_MESSAGE)} — 'tc qdisc add dev host0 root"
    with pytest.raises(ChannelError, match=expected), link:
        pass
    assert_removed(link)


RECEIVER = r"""
import json, socket, sys, time
host, port, duration_s, warmup_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind((host, port))
server.listen(1)
server.settimeout(5.0)
print("ready", flush=True)
connection, _ = server.accept()
connection.settimeout(2.0)
start = time.monotonic()
total, mark, last = 0, None, start
while last - start < duration_s:
    data = connection.recv(65536)
    if not data:
        break
    last = time.monotonic()
    total += len(data)
    if mark is None and last - start >= warmup_s:
        mark = (last, total)
mss = connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
print(json.dumps({"bytes": total - mark[1], "seconds": last - mark[0], "mss": mss, "total": total}), flush=True)
"""

SENDER = r"""
import socket, sys, time
host, port, duration_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
started = time.monotonic()
connection = socket.create_connection((host, port), timeout=5.0)
print(f"connect_s={time.monotonic() - started}", flush=True)
chunk = b"x" * 65536
try:
    while time.monotonic() - started < duration_s:
        connection.sendall(chunk)
except OSError:
    pass
"""


def bulk_transfer(sender_namespace: str, receiver_namespace: str, receiver_address: str,
                  duration_s: float = 4.0, warmup_s: float = 1.0) -> dict[str, float]:
    """Bulk TCP from one namespace to the other for ``duration_s``; the receiver's goodput after ``warmup_s``."""
    port = 5201
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", receiver_namespace, sys.executable, "-c", RECEIVER, receiver_address, str(port),
         str(duration_s), str(warmup_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None
        ready, _, _ = select.select([receiver.stdout], [], [], 10.0)
        assert ready and receiver.stdout.readline().strip() == "ready", "the receiver did not start"
        sender = subprocess.Popen(
            ["ip", "netns", "exec", sender_namespace, sys.executable, "-c", SENDER, receiver_address, str(port),
             str(duration_s + 1.0)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = receiver.communicate(timeout=duration_s + 10.0)
        assert receiver.returncode == 0, err
        result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
        sender_out, _ = sender.communicate(timeout=duration_s + 5.0)
        result["connect_s"] = float(sender_out.split("connect_s=")[1].split()[0])
        return result
    finally:
        for process in (receiver, sender):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=5.0)


def expected_goodput_bps(params: LinkParameters, mss: float, mtu: int) -> float:
    """What htb lets through as TCP payload: full segments of ``mss`` cost an MTU + Ethernet header + htb overhead."""
    assert params.rate_bps is not None
    return params.rate_bps * mss / (mtu + ETHERNET_HEADER_BYTES + htb_overhead_bytes(params))


@pytest.mark.parametrize(("direction", "params"), [
    ("downlink", LinkParameters(2_000_000)),
    ("uplink", LinkParameters(1_000_000)),
    ("downlink", LinkParameters(2_000_000, overhead_bytes=554)),
], ids=["downlink-htb-2Mbit", "uplink-ifb-htb-1Mbit", "downlink-htb-2Mbit-overhead-500"])
def test_htb_rate_gives_the_configured_goodput(netns: None, direction: str, params: LinkParameters) -> None:
    index = {"downlink": 21, "uplink": 22}[direction] + int(params.overhead_bytes > 40)
    link_kwargs = {"downlink": params} if direction == "downlink" else {"uplink": params}
    with NetemLink(index=index, **link_kwargs) as link:  # type: ignore[arg-type]
        host, device = link.host_namespace.name, link.device_namespace.name
        if direction == "downlink":
            result = bulk_transfer(host, device, link.device_address)
        else:
            result = bulk_transfer(device, host, link.host_address)
        mtu = link.mtu_bytes
    goodput = result["bytes"] * 8 / result["seconds"]
    expected = expected_goodput_bps(params, result["mss"], mtu)
    print(f"\n{direction} htb {params.rate_bps / 1e6:g} Mbit/s, htb overhead {htb_overhead_bytes(params)} B, "
          f"mss {result['mss']}: goodput {goodput / 1e6:.4f} Mbit/s vs expected {expected / 1e6:.4f} Mbit/s "
          f"({goodput / expected - 1:+.2%}) over {result['seconds']:.2f} s")
    assert goodput == pytest.approx(expected, rel=0.05)


def test_netem_delay_is_applied(netns: None) -> None:
    """The positive path on kernels with sch_netem: a 50 ms downlink delay shows in the TCP handshake time."""
    if not kernel_supports("netem"):
        pytest.skip("this kernel has no sch_netem (the htb rate tests above still run); "
                    "test_missing_netem_gives_the_clear_error_and_cleans_up covers this machine")
    params = LinkParameters(2_000_000, delay_s=0.05, loss_model=GilbertElliottLoss(0.001, 0.5))
    with NetemLink(downlink=params, uplink=LinkParameters(None, delay_s=0.02), index=31) as link:
        shown = link.host_namespace.run(["tc", "qdisc", "show", "dev", "host0"]).stdout
        assert "netem" in shown and "delay 50ms" in shown and "htb 2:" in shown
        result = bulk_transfer(link.host_namespace.name, link.device_namespace.name, link.device_address,
                               duration_s=3.0)
    # the SYN waits 50 ms downlink, the SYN-ACK 20 ms uplink
    assert 0.069 <= result["connect_s"] <= 0.2
    goodput = result["bytes"] * 8 / result["seconds"]
    assert goodput == pytest.approx(expected_goodput_bps(params, result["mss"], 1500), rel=0.1)


async def test_async_with_sets_up_htb_and_ifb_and_removes_everything(netns: None) -> None:
    link = NetemLink(downlink=LinkParameters(3e6, overhead_bytes=100), uplink=LinkParameters(1e6, mss_bytes=500),
                     index=41)
    async with link:
        qdiscs = link.host_namespace.run(["tc", "qdisc", "show"]).stdout
        classes = link.host_namespace.run(["tc", "-d", "class", "show", "dev", "host0"]).stdout
        filters = link.host_namespace.run(["tc", "filter", "show", "dev", "host0", "ingress"]).stdout
        device_link = link.device_namespace.ip("-d", "link", "show", "dev0")
        addresses = link.device_namespace.ip("-4", "-br", "addr", "show", "dev0")
    assert "qdisc htb 1: dev host0 root" in qdiscs and "qdisc htb 1: dev ifb-host0 root" in qdiscs
    assert "qdisc ingress ffff: dev host0" in qdiscs
    assert "rate 3Mbit" in classes and "overhead 46" in classes
    assert "mirred (Egress Redirect to device ifb-host0)" in filters
    assert "mtu 540 " in device_link and "gso_max_segs 1 " in device_link
    assert "198.19.41.2/24" in addresses
    assert_removed(link)


async def test_a_bounded_queue_is_a_bfifo_under_the_rate_and_drops_a_burst(netns: None) -> None:
    link = NetemLink(downlink=LinkParameters(1e6, queue_bytes=4 * 1500), index=42)
    async with link:
        burst = ("import socket, sys; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                 "for _ in range(30): s.sendto(bytes(1400), (sys.argv[1], 9))")
        link.host_namespace.run([sys.executable, "-c", burst, link.device_address])  # more than the queue holds
        qdiscs = link.host_namespace.run(["tc", "-s", "qdisc", "show", "dev", "host0"]).stdout
    assert "qdisc bfifo 10: parent 1:1 limit 6056b" in qdiscs
    dropped = int(qdiscs.split("qdisc bfifo 10:")[1].split("dropped ")[1].split(",")[0])
    assert dropped > 0, qdiscs
    assert_removed(link)


# --- counters (pure) --------------------------------------------------------------------------------


def test_counters_come_from_the_root_qdisc_or_the_interface() -> None:
    qdiscs = json.dumps([
        {"kind": "htb", "handle": "2:", "parent": "1:1", "bytes": 5, "packets": 1, "drops": 9},
        {"kind": "netem", "handle": "1:", "root": True, "bytes": 30280, "packets": 20, "drops": 3},
    ])
    counters = counters_from_qdisc_stats(qdiscs)
    assert (counters.segments, counters.wire_bytes, counters.lost_segments) == (23, 30280, 3)
    assert (counters.payload_bytes, counters.retransmissions, counters.queueing_delay_s) == (0, 0, 0.0)
    assert counters_from_qdisc_stats("[]").segments == 0
    link = json.dumps([{"ifname": "host0", "stats64": {"rx": {"bytes": 700, "packets": 7, "dropped": 1},
                                                       "tx": {"bytes": 100, "packets": 2, "dropped": 0}}}])
    assert (counters_from_link_stats(link, "rx").segments, counters_from_link_stats(link, "rx").wire_bytes) == (8, 700)
    assert counters_from_link_stats(link, "tx").lost_segments == 0
    with pytest.raises(ChannelError, match="cannot parse"):
        counters_from_qdisc_stats("Sent 0 bytes")


def test_run_backend_surface_needs_both_upstream_parts_and_a_running_link() -> None:
    with pytest.raises(ChannelError, match="give both"):
        NetemLink("127.0.0.1", None)
    link = NetemLink("127.0.0.1", 1883, LinkParameters(1e6), LinkParameters(1e6), seed=3, name="dev-1")
    with pytest.raises(ChannelError, match="not running: use it inside 'async with'"):
        link.address  # noqa: B018


# --- privileged: the relay path a run uses (127.0.0.1 → device namespace → veth → forwarder → broker) ----------


async def _sink_server(reply: bytes) -> tuple[asyncio.Server, asyncio.Queue[tuple[int, str, float]]]:
    """A 'broker' on 127.0.0.1: reports (bytes, sha256, goodput first to last byte) of what it got, then sends ``reply``."""
    received: asyncio.Queue[tuple[int, str, float]] = asyncio.Queue()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        digest, total, first, first_size, last = hashlib.sha256(), 0, None, 0, 0.0
        while data := await reader.read(65536):
            last = loop.time()
            if first is None:
                first, first_size = last, len(data)
            digest.update(data)
            total += len(data)
        await received.put((total, digest.hexdigest(), (total - first_size) * 8 / (last - first) if first else 0.0))
        writer.write(reply)  # only then: the two directions do not compete (data vs the other's ACKs)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), received


async def test_bytes_cross_a_rate_only_netem_link_through_its_relay(netns: None) -> None:
    """A client in this process connects to ``link.address``; bytes arrive intact both ways at htb's rate."""
    downlink, uplink = LinkParameters(2_000_000), LinkParameters(1_000_000)
    down_payload, up_payload = os.urandom(600_000), os.urandom(300_000)  # ~2.5 s each way
    server, received = await _sink_server(down_payload)
    loop = asyncio.get_running_loop()
    link = NetemLink("127.0.0.1", server.sockets[0].getsockname()[1], downlink, uplink, seed=5, name="relay-test",
                     index=51)
    try:
        async with link:
            assert link.address[0] == "127.0.0.1" and link.broker_address[0] == link.host_address
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*link.address), 5)
            writer.write(up_payload)
            writer.write_eof()
            up_total, up_digest, up_goodput = await asyncio.wait_for(received.get(), 15)
            digest, total, first, first_size, last = hashlib.sha256(), 0, None, 0, 0.0
            while data := await asyncio.wait_for(reader.read(65536), 10):
                last = loop.time()
                if first is None:
                    first, first_size = last, len(data)
                digest.update(data)
                total += len(data)
            writer.close()
            down_counters, up_counters = link.downlink_counters, link.uplink_counters
            mtu = link.mtu_bytes
    finally:
        server.close()
    assert (total, digest.hexdigest()) == (len(down_payload), hashlib.sha256(down_payload).hexdigest())
    assert (up_total, up_digest) == (len(up_payload), hashlib.sha256(up_payload).hexdigest())
    assert first is not None
    mss = mtu - 52  # Linux's TCP adds 12 B of timestamps to the 40 B of IPv4+TCP headers
    for name, measured, params in (("downlink", (total - first_size) * 8 / (last - first), downlink),
                                   ("uplink", up_goodput, uplink)):
        expected = expected_goodput_bps(params, mss, mtu)
        print(f"\n{name} through the relay: {measured / 1e6:.4f} Mbit/s vs {expected / 1e6:.4f} Mbit/s "
              f"({measured / expected - 1:+.2%})")
        assert measured == pytest.approx(expected, rel=0.05), name
    # the root qdiscs counted the wire packets (htb on host0, htb on ifb-host0)
    assert down_counters.wire_bytes > len(down_payload) and down_counters.segments > len(down_payload) // 1500
    assert up_counters.wire_bytes > len(up_payload) and up_counters.segments > len(up_payload) // 1500
    assert_removed(link)


async def test_a_run_link_needing_netem_fails_at_start_naming_the_qdisc(netns: None) -> None:
    if kernel_supports("netem"):
        pytest.skip("this kernel has sch_netem; test_netem_delay_is_applied covers the positive path")
    link = NetemLink("127.0.0.1", 1, LinkParameters(1e6, delay_s=0.02), LinkParameters(1e6), seed=1, index=52)
    with pytest.raises(ChannelError, match=re.escape(NO_NETEM_MESSAGE)):
        async with link:
            pass
    assert_removed(link)
