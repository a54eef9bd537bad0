"""Benchmark: fidelity of the link backends (proxy, tun: goodput, delay, loss vs configured) and their own overhead."""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import asyncio
import bisect
import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
import numpy as np

from channel.errors import ChannelError
from channel.link import LinkModel, LinkParameters
from channel.netns import require_netns_support
from testbed.compare_stats import t_interval
from testbed.core.plugins import LINK_PROFILES
from channel.proxy import LinkProxy
from channel.tun import TunLink

#: proxy-rto: the proxy with the link's former loss recovery (``recovery: rto``, every loss waits an RTO), to
#: measure beside the default (``fast``) in one run; ``all`` is proxy and tun.
BACKENDS = ("proxy", "proxy-rto", "tun")
#: tun: the kernel's TCP packets are whole IP packets of the TunLink's MTU with 52 B of IPv4+TCP headers
#: (20 + 20 + 12 B of timestamps); the link's rate counts them whole, so the payload share is (MTU - 52) / MTU.
TUN_MTU_BYTES = 1500
TCP_IP_HEADER_BYTES = 52
#: TCP options beyond the timestamps (up to 40 B in all): a packet of at most 52 + 28 B may carry none (a SYN
#: with MSS/SACK/window-scale options, an ACK with SACK blocks), so the recorder counts no payload in it.
TCP_EXTRA_OPTION_BYTES = 28
GRID_RATES_BPS = (10_000, 100_000, 1_000_000, 10_000_000)
GRID_DELAYS_S = (0.0, 0.05)
GRID_LOSSES = (0.0, 0.01)
NAMED_PROFILES = ("nb-iot", "lte-m", "wifi-weak")
GOODPUT_TOLERANCE = 0.03  # the issue's targets
LOSSY_GOODPUT_VS_TUN_TOLERANCE = 0.10  # issue 13: proxy goodput under 1% loss within 10% of tun's
DELAY_P50_TOLERANCE_MS = 2.0
ADDED_LATENCY_TARGET_MS = 1.0
THROUGHPUT_TARGET_MB_S = 50.0
MQTT_PAYLOAD_BYTES = 32
MQTT_TOPIC_BYTES = 20
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
# paho-mqtt leaves Nagle on: a publish would wait for the previous one's delayed ACK (up to ~40 ms)
NO_DELAY = {"socket_options": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]}


@dataclass(frozen=True)
class Case:
    """One link configuration to measure, with what its figures are compared against."""

    name: str
    profile: str
    downlink: LinkParameters
    uplink: LinkParameters
    reference: str


def grid_cases(quick: bool) -> list[Case]:
    """The rate × delay × loss grid plus named profiles (a small subset with ``quick``)."""
    def custom(rate: float, delay: float, loss: float) -> Case:
        link = LinkParameters(rate_bps=rate, delay_s=delay, loss=loss)
        rate_text = f"{rate / 1e6:g}Mbit" if rate >= 1e6 else f"{rate / 1e3:g}kbit"
        return Case(f"{rate_text} {delay * 1e3:g}ms {loss * 100:g}%", "custom", link, link,
                    "configured: rate·mss/(mss+overhead), delay, loss")

    def named(name: str) -> Case:
        profile = LINK_PROFILES.get(name)
        return Case(name, name, profile.downlink, profile.uplink, profile.source)

    if quick:
        return [custom(1e6, 0.0, 0.0), custom(1e5, 0.05, 0.0), custom(1e7, 0.0, 0.0),
                custom(1e6, 0.05, 0.01), named("lte-m")]
    return [custom(rate, delay, loss) for rate in GRID_RATES_BPS for delay in GRID_DELAYS_S for loss in GRID_LOSSES
            ] + [named(name) for name in NAMED_PROFILES]


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (``(0, 1)`` without trials)."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def open_bench_link(backend: str, port: int, downlink: LinkParameters, uplink: LinkParameters, seed: int,
                    name: str) -> LinkProxy | TunLink:
    """A link of ``backend`` to 127.0.0.1:``port``; both have ``address``, ``downlink_model`` and counters."""
    if backend == "proxy":
        return LinkProxy("127.0.0.1", port, downlink, uplink, seed, name=name)
    if backend == "proxy-rto":
        return LinkProxy("127.0.0.1", port, dataclasses.replace(downlink, recovery="rto"),
                         dataclasses.replace(uplink, recovery="rto"), seed, name=name)
    if backend == "tun":
        return TunLink("127.0.0.1", port, downlink, uplink, seed, name=name, mtu=TUN_MTU_BYTES)
    raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def configured_goodput_bps(backend: str, link: LinkParameters) -> float | None:
    """Payload rate of a saturated link: the model's ``rate·mss/(mss+overhead)`` (proxy), or the whole-IP-packet
    rate net of real headers, ``rate·(MTU-52)/MTU`` (tun: ``overhead_bytes`` does not apply to real packets)."""
    if backend == "tun":
        return None if link.rate_bps is None else link.rate_bps * (TUN_MTU_BYTES - TCP_IP_HEADER_BYTES) / TUN_MTU_BYTES
    return link.goodput_bps


class SegmentRecorder:
    """Records what a link's LinkModel scheduled: (handed-over time, delivery time, payload bytes) per segment.

    It wraps the model object's ``send`` and ``decide`` (proxy: their decisions, oldest segment first, paired
    with the segments handed over) or ``packet_fates`` (tun; every delivered copy,
    its payload taken as the IP packet less 52 B of headers, none up to 52 + ``TCP_EXTRA_OPTION_BYTES``) —
    instrumentation only, the schedule is unchanged — so a run can be compared with exactly the schedule
    the model intended.
    """

    def __init__(self, model: LinkModel | None, backend: str = "proxy") -> None:
        self.records: list[tuple[float, float, int]] = []
        if model is None:
            return
        if backend == "tun":
            original_fates: Callable[[float, int], list[float]] = model.packet_fates

            def packet_fates(now_s: float, size_bytes: int) -> list[float]:
                fates = original_fates(now_s, size_bytes)
                payload = size_bytes - TCP_IP_HEADER_BYTES
                if payload <= TCP_EXTRA_OPTION_BYTES:
                    payload = 0
                self.records.extend((now_s, delivery, payload) for delivery in fates)
                return fates

            model.packet_fates = packet_fates  # type: ignore[method-assign]
            return
        original_send: Callable[[float, int], list[float]] = model.send
        original_decide: Callable[[float], list[float]] = model.decide
        handed: collections.deque[tuple[float, int]] = collections.deque()

        def record(deliveries: list[float]) -> list[float]:
            for delivery in deliveries:
                now_s, size_bytes = handed.popleft()
                self.records.append((now_s, delivery, size_bytes))
            return deliveries

        def send(now_s: float, size_bytes: int) -> list[float]:
            handed.append((now_s, size_bytes))
            return record(original_send(now_s, size_bytes))

        def decide(now_s: float) -> list[float]:
            return record(original_decide(now_s))

        model.send = send  # type: ignore[method-assign]
        model.decide = decide  # type: ignore[method-assign]


def goodput_first_to_last(events: list[tuple[float, int]]) -> float | None:
    """bit/s from the first to the last (time, bytes) event, the first event's bytes excluded."""
    if len(events) < 2 or events[-1][0] <= events[0][0]:
        return None
    first_time = events[0][0]
    first_bytes = sum(size for time_s, size in events if time_s == first_time)
    total = sum(size for _, size in events)
    return (total - first_bytes) * 8.0 / (events[-1][0] - first_time)


#: tun: the kernel's TCP starts in slow start (the proxy's model does not). Where its initial window
#: (Linux: 10 segments) is below the bandwidth-delay product, slow start takes several round trips, and
#: goodput is timed after this share of the bulk's bytes, once the window covers the product.
TUN_WARMUP_FRACTION = 0.2
KERNEL_INITIAL_WINDOW_SEGMENTS = 10


def tun_needs_warmup(link: LinkParameters) -> bool:
    """Whether the kernel's slow start outlasts its first round trip: bandwidth·(2·delay + 4·jitter) > 10 packets.

    Elsewhere tun goodput is timed from the first byte: a window starting mid-transfer can start inside a
    loss recovery (a full queue drops part of a burst), and then credits bytes that arrived before it but
    waited behind the hole (in-order delivery), overstating goodput; the first and last bytes never wait.
    """
    if link.rate_bps is None:
        return False
    bandwidth_delay_bytes = link.rate_bps / 8.0 * (2.0 * link.delay_s + 4.0 * link.jitter_s)
    return bandwidth_delay_bytes > KERNEL_INITIAL_WINDOW_SEGMENTS * TUN_MTU_BYTES


def _after_warmup(events: list[tuple[float, int]], warmup: bool, payload_rate_bps: float | None,
                  segment_bytes: int) -> list[tuple[float, int]]:
    """``events``, or (``warmup``) those from the first ``TUN_WARMUP_FRACTION`` of their bytes on.

    If a loss recovery is still under way there, the window starts instead at the last release of held-back
    bytes before half the bytes (a read larger than ``payload_rate_bps`` could deliver since the previous one,
    plus two segments: a filled hole): its bytes, which arrived earlier, are excluded with the first event's.
    """
    if not warmup or not events:
        return events
    total = sum(size for _, size in events)
    start, seen = len(events) - 1, 0
    for index, (_, size) in enumerate(events):
        seen += size
        if seen >= TUN_WARMUP_FRACTION * total:
            start = index
            break
    if payload_rate_bps is not None:
        for index in range(start + 1, len(events)):
            if seen >= total / 2:
                break
            (previous_s, _), (time_s, size) = events[index - 1], events[index]
            seen += size
            if size > payload_rate_bps / 8.0 * (time_s - previous_s) + 2 * segment_bytes:
                start = index
    return events[start:]


def _from_byte(events: list[tuple[float, int]], offset: int) -> list[tuple[float, int]]:
    """``events`` from the one that carries byte ``offset`` (counted from 0) on: the model's window for the
    same bytes as the receiver's."""
    seen = 0
    for index, (_, size) in enumerate(events):
        seen += size
        if seen > offset:
            return events[index:]
    return events[-1:]


def _percentiles_ms(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.percentile(values, 50)) * 1e3, float(np.percentile(values, 99)) * 1e3


#: airtime of a bulk transfer (full run): iperf3's default duration. Long enough that kernel TCP's one-off
#: spurious RTO at start-up (its 10-packet initial window queued at 100 kbit/s outlasts the 200 ms minimum
#: RTO, one segment is sent twice) costs about 1% rather than the 3% it costs a 4 s transfer.
BULK_SECONDS = 10.0
#: A lossy case's bulk is repeated, seeds ``seed + REPEAT_SEED_STRIDE·r``, until its transfers expect this many lost
#: segments in all (at most ``MAX_BULK_REPEATS`` transfers): at 10 kbit/s a 10 s transfer holds 8 segments, so at 1%
#: loss most single transfers lose none and one transfer says whether a loss happened, not what loss costs.
LOSSY_EXPECTED_LOSSES = 1.0
MAX_BULK_REPEATS = 15
REPEAT_SEED_STRIDE = 1000


def _bulk_segments(link: LinkParameters, target_s: float) -> int:
    """Full segments that keep a saturated link busy for about ``target_s`` (retransmission stalls included)."""
    assert link.rate_bps is not None
    packet_s = link.packet_bytes * 8.0 / link.rate_bps
    per_segment_s = packet_s + link.loss * max(link.rto_s, packet_s)
    return max(3, min(20_000, int(target_s / per_segment_s)))


def bulk_repeats(link: LinkParameters, target_s: float) -> int:
    """Transfers of about ``target_s`` each that expect ``LOSSY_EXPECTED_LOSSES`` lost segments in all (1 loss-free)."""
    if link.loss <= 0:
        return 1
    expected_per_transfer = _bulk_segments(link, target_s) * link.loss
    return max(1, min(MAX_BULK_REPEATS, math.ceil(LOSSY_EXPECTED_LOSSES / expected_per_transfer - 1e-9)))


def pooled_bulks(runs: list[dict[str, Any]], configured_bps: float | None) -> dict[str, Any]:
    """One case's bulk figures from its repeated transfers: the mean of their goodputs (as iperf3 runs repeated are
    averaged) with a 95% t-interval of goodput/configured, bytes, seconds and counts summed, the worst lateness p99.

    A transfer whose bytes all came in one read (its first segment lost and the rest held behind it) has no span from
    its first byte to its last, so no goodput: the mean is over the others, and ``untimed`` counts it.
    """
    if len(runs) == 1:
        return {**runs[0], "bulk_repeats": 1}
    timed = [run for run in runs if run["goodput_bps"] is not None]
    goodputs = [run["goodput_bps"] for run in timed]
    model_ratios = [run["goodput_bps"] / run["model_goodput_bps"] for run in timed if run["model_goodput_bps"]]
    pooled: dict[str, Any] = {
        "bulk_bytes": sum(run["bulk_bytes"] for run in runs), "bulk_seconds": sum(run["bulk_seconds"] for run in runs),
        "goodput_bps": math.fsum(goodputs) / len(goodputs) if goodputs else None,
        # the mean of meas/model, as the model goodput it implies for the mean goodput
        "model_goodput_bps": (math.fsum(goodputs) / len(goodputs) * len(model_ratios) / math.fsum(model_ratios)
                              if model_ratios else None),
        "release_lateness_p50_ms": _median([run["release_lateness_p50_ms"] for run in runs]),
        "release_lateness_p99_ms": max((run["release_lateness_p99_ms"] for run in runs
                                        if run["release_lateness_p99_ms"] is not None), default=None),
        "segment_attempts": sum(run["segment_attempts"] for run in runs),
        "lost_segments": sum(run["lost_segments"] for run in runs),
        "bulk_repeats": len(runs), "bulk_lost_per_repeat": [run["lost_segments"] for run in runs],
        "untimed": len(runs) - len(timed),
    }
    if configured_bps and len(goodputs) >= 2:
        ratios = [goodput / configured_bps for goodput in goodputs]
        _, low, high = t_interval(ratios)
        pooled.update(goodput_ratios=ratios, goodput_ratio_ci=[low, high])
    return pooled


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return float(np.median(known)) if known else None


async def measure_bulk(case: Case, seed: int, target_s: float, backend: str = "proxy") -> dict[str, Any]:
    """Bulk TCP upstream → client through a fresh link of ``backend``; goodput timed at the receiver."""
    loop = asyncio.get_running_loop()
    link = case.downlink
    # whole segments, so every packet is full as the configured figure assumes: the model's mss (proxy) or the
    # kernel's, MTU less 52 B of IPv4+TCP headers with timestamps (tun)
    segment_bytes = TUN_MTU_BYTES - TCP_IP_HEADER_BYTES if backend == "tun" else link.mss_bytes
    payload = bytes(_bulk_segments(link, target_s) * segment_bytes)
    # with random loss a hole is pending most of the time, so only the first byte starts a fair window
    warmup = backend == "tun" and tun_needs_warmup(link) and link.loss == 0 and link.loss_model is None
    configured = configured_goodput_bps(backend, link)

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(source, "127.0.0.1", 0)
    read_timeout_s = link.rto_s * 2 ** (link.max_backoffs + 1) + 2 * (link.delay_s + link.jitter_s) + 10.0
    events: list[tuple[float, int]] = []
    try:
        proxy = open_bench_link(backend, server.sockets[0].getsockname()[1], link, case.uplink, seed, case.name)
        recorder = SegmentRecorder(getattr(proxy, "downlink_model", None), backend)
        async with proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            try:
                while data := await asyncio.wait_for(reader.read(1 << 20), read_timeout_s):
                    events.append((loop.time(), len(data)))
            finally:
                writer.close()
            counters = proxy.downlink_counters
    finally:
        server.close()
    received = sum(size for _, size in events)
    if received != len(payload):
        raise RuntimeError(f"{case.name}: bulk received {received} of {len(payload)} bytes")
    model_events = []  # delivered segments up to the bulk's last byte (tun: a tail-loss probe may resend it)
    scheduled = 0
    for delivery, size in sorted((delivery, size) for _, delivery, size in recorder.records if size > 0):
        if scheduled >= len(payload):
            break
        model_events.append((delivery, size))
        scheduled += size
    lateness = []
    if model_events:  # how late the proxy released each read's last byte vs the model's schedule
        cumulative = list(np.cumsum([size for _, size in model_events]))
        position = 0
        for time_s, size in events:
            position += size
            index = min(bisect.bisect_left(cumulative, position), len(model_events) - 1)
            lateness.append(time_s - model_events[index][0])
    late_p50, late_p99 = _percentiles_ms(lateness)
    window = _after_warmup(events, warmup, configured, segment_bytes)
    window_bytes = sum(size for _, size in window)
    return {"bulk_bytes": len(payload), "bulk_seconds": events[-1][0] - events[0][0],
            "goodput_bps": goodput_first_to_last(window),
            "model_goodput_bps": goodput_first_to_last(_from_byte(model_events, len(payload) - window_bytes)),
            "release_lateness_p50_ms": late_p50, "release_lateness_p99_ms": late_p99,
            "segment_attempts": counters.segments + counters.retransmissions, "lost_segments": counters.lost_segments}


@contextlib.asynccontextmanager
async def mosquitto() -> AsyncIterator[int]:
    """A Mosquitto broker on a free 127.0.0.1 port with a temporary config; yields its port."""
    if not os.access(MOSQUITTO, os.X_OK):
        raise RuntimeError(f"mosquitto not found at {MOSQUITTO}: install it (Debian: apt-get install mosquitto)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-channel-") as folder:
        config = Path(folder) / "mosquitto.conf"
        run_as = "user root\n" if os.geteuid() == 0 else ""  # else it drops to `mosquitto` and cannot read folder
        # set_tcp_nodelay: else Nagle holds a message behind the previous segment's delayed ACK (~40 ms)
        config.write_text(f"{run_as}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                          "set_tcp_nodelay true\n")
        log_path = Path(folder) / "mosquitto.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen([MOSQUITTO, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 10.0
            while True:
                with contextlib.suppress(OSError):
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                    writer.close()
                    break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mosquitto did not start: {log_path.read_text()}")
                await asyncio.sleep(0.05)
            yield port
        finally:
            process.terminate()
            process.wait(timeout=10)


async def _receive(client: aiomqtt.Client, count: int, arrivals: dict[int, float]) -> None:
    loop = asyncio.get_running_loop()
    async for message in client.messages:
        arrivals[int.from_bytes(bytes(message.payload)[:4], "big")] = loop.time()  # type: ignore[arg-type]
        if len(arrivals) >= count:
            return


async def measure_latency(case: Case, broker_port: int, seed: int, budget_s: float,
                          limits: tuple[int, int], backend: str = "proxy") -> dict[str, Any]:
    """Paced QoS 0 publishes (publisher direct, subscriber behind a fresh link); one-way latency each."""
    loop = asyncio.get_running_loop()
    link = case.downlink
    message_wire_bytes = MQTT_PAYLOAD_BYTES + MQTT_TOPIC_BYTES + 4 + link.overhead_bytes
    # paced so the token bucket refills between messages: a lone message then sees the bare delay
    interval_s = max(0.02, 2 * message_wire_bytes * 8 / link.rate_bps) if link.rate_bps else 0.02
    count = max(limits[0], min(limits[1], int(budget_s / interval_s)))
    topic = f"bench/channel/{seed}".ljust(MQTT_TOPIC_BYTES, "x")
    proxy = open_bench_link(backend, broker_port, link, case.uplink, seed, case.name)
    setup_s = 10.0 + 8 * (link.delay_s + link.jitter_s) + 4 * link.rto_s
    sent: dict[int, float] = {}
    arrivals: dict[int, float] = {}
    recorder = SegmentRecorder(getattr(proxy, "downlink_model", None), backend)
    start = math.inf
    async with proxy, \
            aiomqtt.Client("127.0.0.1", broker_port, identifier=f"pub-{seed}", timeout=setup_s,
                           **NO_DELAY) as publisher, \
            aiomqtt.Client(*proxy.address, identifier=f"sub-{seed}", timeout=setup_s,
                           **NO_DELAY) as subscriber:
        await subscriber.subscribe(topic, qos=0)
        receiver = asyncio.create_task(_receive(subscriber, count, arrivals))
        try:
            start = loop.time()
            for sequence in range(count):
                await asyncio.sleep(max(0.0, start + sequence * interval_s - loop.time()))
                payload = sequence.to_bytes(4, "big").ljust(MQTT_PAYLOAD_BYTES, b".")
                sent[sequence] = loop.time()
                await publisher.publish(topic, payload, qos=0)
            await asyncio.wait_for(asyncio.shield(receiver), setup_s + link.rto_s * 2 ** (link.max_backoffs + 1))
        finally:
            receiver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiver
        counters = proxy.downlink_counters
        attempts, lost = counters.segments + counters.retransmissions, counters.lost_segments
    delay_errors = [arrivals[sequence] - sent[sequence] - link.delay_s for sequence in sent]
    model_errors = [delivery - handed - link.delay_s for handed, delivery, _ in recorder.records if handed >= start]
    p50, p99 = _percentiles_ms(delay_errors)
    model_p50, model_p99 = _percentiles_ms(model_errors)
    return {"messages": count, "delay_p50_ms": p50, "delay_p99_ms": p99, "model_delay_p50_ms": model_p50,
            "model_delay_p99_ms": model_p99, "mqtt_segment_attempts": attempts, "mqtt_lost_segments": lost}


async def measure_case(case: Case, broker_port: int, seed: int, quick: bool, backend: str = "proxy") -> dict[str, Any]:
    """One row: bulk goodput, MQTT delay and segment loss of one link configuration through ``backend``."""
    link = case.downlink
    target_s = 1.5 if quick else BULK_SECONDS
    repeats = 1 if quick else bulk_repeats(link, target_s)
    bulk = pooled_bulks([await measure_bulk(case, seed + REPEAT_SEED_STRIDE * repeat, target_s, backend)
                         for repeat in range(repeats)], configured_goodput_bps(backend, link))
    latency = await measure_latency(case, broker_port, seed + 1, budget_s=1.0 if quick else 3.0,
                                    limits=(20, 100) if quick else (30, 300), backend=backend)
    attempts = bulk.pop("segment_attempts") + latency.pop("mqtt_segment_attempts")
    lost = bulk.pop("lost_segments") + latency.pop("mqtt_lost_segments")
    loss_low, loss_high = wilson_interval(lost, attempts)
    configured_goodput = configured_goodput_bps(backend, link)
    measured, model = bulk["goodput_bps"], bulk["model_goodput_bps"]
    return {
        "backend": backend, "profile": case.profile, "case": case.name,
        "configured_rate_bps": link.rate_bps, "configured_delay_ms": link.delay_s * 1e3,
        "configured_jitter_ms": link.jitter_s * 1e3, "configured_loss": link.loss,
        "configured_goodput_bps": configured_goodput, **bulk,
        "goodput_ratio": None if measured is None or not configured_goodput else measured / configured_goodput,
        "goodput_model_ratio": None if measured is None or not model else measured / model, **latency,
        "loss": lost / attempts if attempts else None, "loss_ci_low": loss_low, "loss_ci_high": loss_high,
        "segment_attempts": attempts, "lost_segments": lost, "reference": case.reference,
    }


ENDPOINTS = r"""
import json, socket, sys, threading, time
total = int(sys.argv[1])
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
def source():
    connection, _ = server.accept()
    block, left = bytes(1 << 20), total
    while left > 0:
        connection.sendall(block if left >= len(block) else block[:left])
        left -= len(block)
    connection.close()
threading.Thread(target=source, daemon=True).start()
sink = socket.create_connection(("127.0.0.1", int(sys.stdin.readline())))
buffer, received, first, first_bytes, last = bytearray(1 << 20), 0, None, 0, None
while size := sink.recv_into(buffer):
    last = time.perf_counter()
    if first is None:
        first, first_bytes = last, size
    received += size
print(json.dumps({"bytes": received, "first_bytes": first_bytes, "seconds": last - first}), flush=True)
"""


async def measure_throughput(total_bytes: int, through: str | None) -> float:
    """MB/s of one bulk transfer between two endpoints in a helper process, through an unlimited link of backend
    ``through`` or direct (None)."""
    process = await asyncio.create_subprocess_exec(sys.executable, "-c", ENDPOINTS, str(total_bytes),
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None
    try:
        source_port = int(await asyncio.wait_for(process.stdout.readline(), 30))
        async with contextlib.AsyncExitStack() as stack:
            port = source_port
            if through is not None:
                unlimited = LinkParameters(rate_bps=None)
                link = await stack.enter_async_context(open_bench_link(through, source_port, unlimited, unlimited,
                                                                       seed=0, name="unconstrained"))
                port = link.address[1]
            process.stdin.write(f"{port}\n".encode())
            await process.stdin.drain()
            result = json.loads(await asyncio.wait_for(process.stdout.readline(), 300))
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
        await process.wait()
    if result["bytes"] != total_bytes:
        raise RuntimeError(f"throughput run received {result['bytes']} of {total_bytes} bytes")
    return (result["bytes"] - result["first_bytes"]) / result["seconds"] / 1e6


async def measure_added_latency(broker_port: int, count: int, backend: str = "proxy") -> dict[str, float]:
    """Median per-message latency, subscriber direct vs behind an unlimited zero-delay link, alternating."""
    loop = asyncio.get_running_loop()
    unlimited = LinkParameters(rate_bps=None)
    latencies: dict[str, list[float]] = {"direct": [], "proxy": []}
    async with open_bench_link(backend, broker_port, unlimited, unlimited, seed=0, name="unconstrained") as proxy, \
            aiomqtt.Client("127.0.0.1", broker_port, identifier="overhead-pub", **NO_DELAY) as publisher, \
            aiomqtt.Client("127.0.0.1", broker_port, identifier="overhead-direct", **NO_DELAY) as direct, \
            aiomqtt.Client(*proxy.address, identifier="overhead-proxy", **NO_DELAY) as proxied:
        for path, client in (("direct", direct), ("proxy", proxied)):
            await client.subscribe(f"bench/overhead/{path}", qos=0)
        iterators = {"direct": aiter(direct.messages), "proxy": aiter(proxied.messages)}
        for sequence in range(count):
            for path in ("direct", "proxy"):
                started = loop.time()
                await publisher.publish(f"bench/overhead/{path}", sequence.to_bytes(4, "big"), qos=0)
                await asyncio.wait_for(anext(iterators[path]), 10)
                latencies[path].append(loop.time() - started)
    direct_ms, proxy_ms = (float(np.median(latencies[path])) * 1e3 for path in ("direct", "proxy"))
    return {"messages": count, "direct_latency_p50_ms": direct_ms, "link_latency_p50_ms": proxy_ms,
            "added_latency_p50_ms": proxy_ms - direct_ms}


def _fmt(value: float | None, pattern: str, missing: str = "-") -> str:
    return missing if value is None else format(value, pattern)


def _rate(rate_bps: float | None) -> str:
    if rate_bps is None:
        return "unlimited"
    return f"{rate_bps / 1e6:g} Mbit/s" if rate_bps >= 1e6 else f"{rate_bps / 1e3:g} kbit/s"


def _repeats(row: dict[str, Any]) -> str:
    """`` ×N [low, high]``: the mean of N transfers and its 95% t-interval, for a case measured more than once (and
    how many of them came in one read, without a goodput)."""
    if row.get("bulk_repeats", 1) == 1:
        return ""
    interval = row.get("goodput_ratio_ci")
    untimed = f", {row['untimed']} in one read" if row.get("untimed") else ""
    return f" ×{row['bulk_repeats']}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "") + untimed


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("| backend | case | rate | goodput meas/conf | meas/model | Δdelay p50 / p99 ms | model Δ p50 / p99 ms "
          "| late p99 ms | loss meas [95% CI] vs conf | msgs | reference |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['backend']} | {row['case']} | {_rate(row['configured_rate_bps'])} "
              f"| {_fmt(row['goodput_ratio'], '.3f')}{_repeats(row)} "
              f"| {_fmt(row['goodput_model_ratio'], '.3f')} "
              f"| {_fmt(row['delay_p50_ms'], '+.2f')} / {_fmt(row['delay_p99_ms'], '+.1f')} "
              f"| {_fmt(row['model_delay_p50_ms'], '+.2f')} / {_fmt(row['model_delay_p99_ms'], '+.1f')} "
              f"| {_fmt(row['release_lateness_p99_ms'], '.2f')} "
              f"| {_fmt(row['loss'] and row['loss'] * 100, '.2f')}% [{row['loss_ci_low'] * 100:.2f}, "
              f"{row['loss_ci_high'] * 100:.2f}] vs {row['configured_loss'] * 100:g}% ({row['segment_attempts']} seg) "
              f"| {row['messages']} | {row['reference']} |")


def targets(rows: list[dict[str, Any]], overhead: dict[str, Any], backend: str = "proxy") -> list[dict[str, Any]]:
    """Each target of the issue for ``backend`` with the measured figure it is judged on.

    Goodput and p50 delay apply to every backend; the overhead targets are the proxy's (for tun its
    unconstrained figures are printed for reference, not judged).
    """
    rows = [row for row in rows if row["backend"] == backend]
    lossless = [row for row in rows if row["profile"] == "custom" and row["configured_loss"] == 0
                and row["goodput_ratio"] is not None]
    worst_goodput = max(lossless, key=lambda row: abs(row["goodput_ratio"] - 1.0), default=None)
    grid = [row for row in rows if row["profile"] == "custom" and row["delay_p50_ms"] is not None]
    worst_delay = max(grid, key=lambda row: abs(row["delay_p50_ms"]), default=None)
    found = []
    if worst_goodput is not None:
        found.append({"backend": backend,
                      "target": f"goodput within {GOODPUT_TOLERANCE:.0%} of configured (loss-free grid)",
                      "measured": f"worst {worst_goodput['goodput_ratio']:.3f} ({worst_goodput['case']})",
                      "met": abs(worst_goodput["goodput_ratio"] - 1.0) <= GOODPUT_TOLERANCE})
    if worst_delay is not None:
        found.append({"backend": backend,
                      "target": f"p50 delay within {DELAY_P50_TOLERANCE_MS:g} ms of configured (grid)",
                      "measured": f"worst {worst_delay['delay_p50_ms']:+.2f} ms ({worst_delay['case']})",
                      "met": abs(worst_delay["delay_p50_ms"]) <= DELAY_P50_TOLERANCE_MS})
    if backend != "proxy":
        return found
    found.append({"backend": backend,
                  "target": f"unconstrained proxy adds < {ADDED_LATENCY_TARGET_MS:g} ms median per MQTT message",
                  "measured": f"{overhead['added_latency_p50_ms']:.3f} ms (direct {overhead['direct_latency_p50_ms']:.3f}"
                              f" ms, proxy {overhead['link_latency_p50_ms']:.3f} ms, {overhead['messages']} msgs)",
                  "met": overhead["added_latency_p50_ms"] < ADDED_LATENCY_TARGET_MS})
    found.append({"backend": backend, "target": f"unconstrained proxy carries >= {THROUGHPUT_TARGET_MB_S:g} MB/s",
                  "measured": f"{overhead['throughput_mb_s']:.1f} MB/s over {overhead['throughput_bytes'] / 1e6:g} MB "
                              f"(direct loopback {overhead['direct_throughput_mb_s']:.1f} MB/s)",
                  "met": overhead["throughput_mb_s"] >= THROUGHPUT_TARGET_MB_S})
    return found


def lossy_goodput_vs_tun(rows: list[dict[str, Any]], backend: str) -> dict[str, Any] | None:
    """The target 'goodput under 1% loss within 10% of tun's at every rate of the grid' for ``backend``, judged on
    its worst lossy grid case (goodput over tun's for the same case); None without both backends' lossy rows."""
    def lossy(row: dict[str, Any]) -> bool:
        return row["profile"] == "custom" and row["configured_loss"] == 0.01

    tun = {row["case"]: row for row in rows if row["backend"] == "tun" and lossy(row)}
    mine = [row for row in rows if row["backend"] == backend and lossy(row) and row["case"] in tun]
    if not mine:
        return None
    unmeasured = [row["case"] for row in mine if not row["goodput_bps"] or not tun[row["case"]]["goodput_bps"]]
    target = f"goodput under 1% loss within {LOSSY_GOODPUT_VS_TUN_TOLERANCE:.0%} of tun's (lossy grid)"
    if unmeasured:  # a case without a figure is not a case met
        return {"backend": backend, "target": target, "met": False,
                "measured": f"no goodput for {', '.join(unmeasured)}"}
    ratios = [(row["goodput_bps"] / tun[row["case"]]["goodput_bps"], row["case"], _transfers(row, tun[row["case"]]))
              for row in mine]
    worst, case, transfers = max(ratios, key=lambda ratio_case: abs(ratio_case[0] - 1.0))
    return {"backend": backend, "target": target,
            "measured": f"worst {worst:.3f} of tun ({case}{transfers}); "
                        + ", ".join(f"{name}: {ratio:.3f}" for ratio, name, _ in ratios),
            "met": abs(worst - 1.0) <= LOSSY_GOODPUT_VS_TUN_TOLERANCE}


def _transfers(row: dict[str, Any], tun_row: dict[str, Any]) -> str:
    """``, means of N transfers`` where the two rows' goodputs are means of repeated transfers."""
    counts = {row.get("bulk_repeats", 1), tun_row.get("bulk_repeats", 1)}
    if counts == {1}:
        return ""
    return f", means of {' and '.join(str(count) for count in sorted(counts))} transfers"


def available_backends(requested: str) -> tuple[list[str], list[str]]:
    """(backends to run, notes on those skipped): ``all`` (proxy and tun) skips tun where it cannot run; naming it
    fails instead. ``requested`` is ``all`` or a comma-separated list of backends."""
    wanted = ["proxy", "tun"] if requested == "all" else requested.split(",")
    unknown = [name for name in wanted if name not in BACKENDS]
    if unknown or not wanted:
        raise SystemExit(f"bench/link_fidelity.py: unknown backend {unknown[0] if unknown else requested!r}: "
                         f"expected all or a comma-separated list of {', '.join(BACKENDS)}")
    notes = []
    if "tun" in wanted:
        reason = None
        if not Path("/dev/net/tun").exists():
            reason = "/dev/net/tun is missing"
        else:
            try:
                require_netns_support()
            except ChannelError as error:
                reason = str(error)
        if reason is not None:
            if requested != "all":
                raise SystemExit(f"bench/link_fidelity.py: the tun backend cannot run here: {reason}")
            wanted.remove("tun")
            notes.append(f"tun skipped: {reason}")
    return wanted, notes


async def run(quick: bool, seed: int, log: Callable[[str], None],
              backends: tuple[str, ...] | list[str] = ("proxy",)) -> dict[str, Any]:
    rows = []
    overhead: dict[str, dict[str, Any]] = {}
    throughput_bytes = 50_000_000 if quick else 200_000_000
    direct_mb_s = await measure_throughput(throughput_bytes, through=None)
    async with mosquitto() as broker_port:
        for backend in backends:
            for index, case in enumerate(grid_cases(quick)):
                started = time.monotonic()
                rows.append(await measure_case(case, broker_port, seed + 2 * index, quick, backend))
                log(f"  {backend} {case.name}: {time.monotonic() - started:.1f} s")
            overhead[backend] = await measure_added_latency(broker_port, 500, backend)
    for backend in backends:
        overhead[backend].update(throughput_bytes=throughput_bytes, direct_throughput_mb_s=direct_mb_s,
                                 throughput_mb_s=await measure_throughput(throughput_bytes, through=backend))
    found = [target for backend in backends for target in targets(rows, overhead[backend], backend)]
    if not quick:  # a 1.5 s transfer at 1% loss meets one or two losses: too few to judge recovery on
        found += [target for backend in backends if backend != "tun"
                  if (target := lossy_goodput_vs_tun(rows, backend)) is not None]
    return {"backends": list(backends), "rows": rows, "overhead": overhead, "targets": found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/link_fidelity.py", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="five cases per backend and a 50 MB throughput run (< 60 s for both backends)")
    parser.add_argument("--backend", default="all",
                        help="which link backend(s) to measure: all (proxy and tun, the default) or a comma-separated "
                             f"list of {', '.join(BACKENDS)} (proxy-rto: the proxy with the former RTO-only loss "
                             "recovery); tun needs Linux and root, and is skipped with a note under 'all' where it "
                             "cannot run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    backends, notes = available_backends(args.backend)
    result = asyncio.run(run(args.quick, args.seed, lambda line: print(line, file=sys.stderr, flush=True), backends))
    rerun = ("python bench/link_fidelity.py" + (" --quick" if args.quick else "") + f" --backend {args.backend}"
             f" --seed {args.seed}")
    print(f"# bench/link_fidelity.py, backends {', '.join(backends)}, {len(result['rows'])} cases, "
          f"{time.monotonic() - started:.0f} s")
    for note in notes:
        print(f"# {note}")
    same_by_testbed = (f"   (or: testbed bench channel{' --quick' if args.quick else ''}"
                       f"{'' if args.backend == 'all' else ' --backend ' + args.backend})")
    print(f"# rerun: {rerun}{same_by_testbed if args.backend in ('all', 'proxy', 'tun') else ''}")
    print(f"# goodput: bulk TCP downlink (whole segments, ~{1.5 if args.quick else BULK_SECONDS:g} s of airtime like iperf3's"
          " default) timed at the receiver from first to last byte (tun, loss-free")
    print("#   and bandwidth·RTT > 10 packets: from 20% of the bytes, past the kernel TCP's slow start, or from the")
    print("#   last release of bytes held behind a hole before half of them), vs configured: proxy")
    print(f"#   rate·mss/(mss+overhead); tun rate·(MTU-{TCP_IP_HEADER_BYTES})/MTU (its rate counts whole IP packets"
          " with the kernel's")
    print("#   real headers) — and vs the model's own schedule for the same segments/packets (meas/model);")
    print("#   Δdelay: MQTT one-way latency minus configured delay (publisher direct, subscriber behind the link);")
    print("#   late: release time minus the model's delivery time; loss: lost/attempted segments (proxy) or IP")
    print("#   packets (tun, both directions' data and ACKs alike) from the link's counters.")
    if not args.quick:
        print(f"#   A lossy case repeats its transfer (×N, seeds +{REPEAT_SEED_STRIDE}·r, the same for every backend)"
              f" until one lost segment")
        print(f"#   is expected in all (at most {MAX_BULK_REPEATS}); its goodput is their mean [95% t-interval], a "
              "transfer delivered in one")
        print("#   read (no span from first to last byte) left out and counted.")
    print_rows(result["rows"])
    print()
    for backend in result["backends"]:
        lossy = [row for row in result["rows"] if row["backend"] == backend and row["profile"] == "custom"
                 and row["configured_loss"] > 0]
        if lossy:
            lost, attempts = sum(row["lost_segments"] for row in lossy), sum(row["segment_attempts"] for row in lossy)
            low, high = wilson_interval(lost, attempts)
            configured = sorted({row["configured_loss"] * 100 for row in lossy})
            print(f"{backend}: loss pooled over the lossy grid cases: {100 * lost / attempts:.2f}% [{100 * low:.2f}, "
                  f"{100 * high:.2f}] ({lost}/{attempts}) vs configured {', '.join(f'{v:g}%' for v in configured)}")
        overhead = result["overhead"][backend]
        print(f"{backend}: unconstrained, adds {overhead['added_latency_p50_ms']:.3f} ms median per MQTT message "
              f"({overhead['messages']} msgs) and carries {overhead['throughput_mb_s']:.1f} MB/s "
              f"(direct loopback {overhead['direct_throughput_mb_s']:.1f} MB/s)")
    print("targets:")
    for target in result["targets"]:
        print(f"  {'met   ' if target['met'] else 'MISSED'}  {target['backend']:<5}  {target['target']}: "
              f"{target['measured']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rerun": rerun, **result}, indent=2))
        print(f"# rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
