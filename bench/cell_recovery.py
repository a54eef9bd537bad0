"""Benchmark: a shared cell's goodput under loss through the proxy, fast-retransmit recovery against RTO-only, one run."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from channel.link import LinkParameters
from channel.proxy import LinkProxy
from channel.shared import SharedLink

RATES_BPS = (1_000_000, 10_000_000)
DELAYS_S = (0.0, 0.05)
LOSS = 0.01
DEVICES = (1, 3)
AIRTIME_S = 8.0  # of the whole cell's bulk: each device's share of it is AIRTIME_S / DEVICES
QUICK_AIRTIME_S = 2.0
READ_TIMEOUT_S = 60.0
MODES = ("fast", "rto")


async def measure_cell(downlink: LinkParameters, devices: int, airtime_s: float, seed: int) -> dict[str, Any]:
    """``devices`` bulk TCP downloads at once through one cell (a SharedLink each way, a LinkProxy per device);
    the cell's payload goodput from the first byte any device received to the last."""
    goodput = downlink.goodput_bps
    assert goodput is not None
    per_device = int(goodput / 8 * airtime_s / devices) // downlink.mss_bytes * downlink.mss_bytes
    payload = bytes(per_device)
    loop = asyncio.get_running_loop()

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(source, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    shared_down = SharedLink(downlink, np.random.default_rng([seed, 0]))
    shared_up = SharedLink(LinkParameters(rate_bps=None, delay_s=downlink.delay_s), np.random.default_rng([seed, 1]))
    proxies = [LinkProxy("127.0.0.1", port, name=f"cell-{index}", downlink_model=shared_down.flow(index),
                         uplink_model=shared_up.flow(index)) for index in range(devices)]

    async def download(proxy: LinkProxy) -> list[tuple[float, int]]:
        reader, writer = await asyncio.open_connection(*proxy.address)
        received: list[tuple[float, int]] = []
        try:
            while data := await asyncio.wait_for(reader.read(1 << 20), READ_TIMEOUT_S):
                received.append((loop.time(), len(data)))
        finally:
            writer.close()
        return received

    try:
        for proxy in proxies:
            await proxy.__aenter__()
        received = await asyncio.gather(*(download(proxy) for proxy in proxies))
    finally:
        for proxy in proxies:
            await proxy.aclose()
        server.close()
    for index, events in enumerate(received):
        if sum(size for _, size in events) != len(payload):
            raise RuntimeError(f"device {index} received {sum(size for _, size in events)} of {len(payload)} bytes")
    first = min(events[0][0] for events in received)
    last = max(events[-1][0] for events in received)
    finished = sorted(events[-1][0] - first for events in received)
    counters = shared_down.counters
    recoveries = [shared_down.recovery(index) for index in range(devices)]
    return {"cell_goodput_bps": devices * len(payload) * 8 / (last - first), "configured_goodput_bps": goodput,
            "bulk_bytes_per_device": len(payload), "seconds": last - first, "first_device_done_s": finished[0],
            "lost_segments": counters.lost_segments, "segments": counters.segments,
            "retransmissions": counters.retransmissions,
            "fast_retransmits": sum(recovery.fast_retransmits for recovery in recoveries),
            "timeout_retransmits": sum(recovery.timeout_retransmits for recovery in recoveries)}


async def run(quick: bool, seed: int, cell_sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    cases = [(RATES_BPS[-1], DELAYS_S[0])] if quick else [(rate, delay) for rate in RATES_BPS for delay in DELAYS_S]
    for devices, (rate, delay), mode in ((devices, case, mode) for devices in cell_sizes for case in cases
                                         for mode in MODES):
        downlink = LinkParameters(rate_bps=rate, delay_s=delay, loss=LOSS, recovery=mode)
        started = time.monotonic()
        row = await measure_cell(downlink, devices, QUICK_AIRTIME_S if quick else AIRTIME_S, seed)
        rows.append({"rate_bps": rate, "delay_s": delay, "loss": LOSS, "recovery": mode, "devices": devices,
                     "wall_s": time.monotonic() - started, **row})
        print(f"  {devices} devices, {rate / 1e6:g} Mbit/s {delay * 1e3:g} ms {mode}: "
              f"{row['cell_goodput_bps'] / row['configured_goodput_bps']:.3f} of the rate", file=sys.stderr,
              flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"| cell ({rows[0]['loss']:.0%} loss) | goodput/configured fast · rto | fast / rto | "
          "lost segments fast · rto | fast's resends: fast + timeout |")
    print("|---|---|---|---|---|")
    for fast in (row for row in rows if row["recovery"] == "fast"):
        rto = next(row for row in rows if row["recovery"] == "rto" and (
            row["devices"], row["rate_bps"], row["delay_s"]) == (fast["devices"], fast["rate_bps"], fast["delay_s"]))
        share = [row["cell_goodput_bps"] / row["configured_goodput_bps"] for row in (fast, rto)]
        print(f"| {fast['devices']} device{'s' if fast['devices'] > 1 else ''}, {fast['rate_bps'] / 1e6:g} Mbit/s "
              f"{fast['delay_s'] * 1e3:g} ms | {share[0]:.3f} · {share[1]:.3f} | "
              f"{share[0] / share[1]:.2f} | {fast['lost_segments']} · {rto['lost_segments']} | "
              f"{fast['fast_retransmits']} + {fast['timeout_retransmits']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/cell_recovery.py", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="one case (10 Mbit/s, 0 ms), 2 s of airtime")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--devices", default=",".join(map(str, DEVICES)),
                        help="the cell sizes to measure, comma-separated (default: 1,3)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        cell_sizes = [int(size) for size in args.devices.split(",")]
    except ValueError:
        cell_sizes = []
    if not cell_sizes or min(cell_sizes) < 1:
        parser.error(f"--devices {args.devices!r}: expected comma-separated cell sizes of at least 1 device")
    started = time.monotonic()
    rows = asyncio.run(run(args.quick, args.seed, cell_sizes))
    rerun = f"python bench/cell_recovery.py{' --quick' if args.quick else ''} --seed {args.seed} --devices {args.devices}"
    print(f"# bench/cell_recovery.py, {len(rows)} runs, {time.monotonic() - started:.0f} s; rerun: {rerun}")
    print(f"# cells of {args.devices} devices in turn: every device of the cell downloads at once through it (a "
          "SharedLink downlink,")
    print(f"# a LinkProxy each), ~{QUICK_AIRTIME_S if args.quick else AIRTIME_S:g} s of the cell's airtime in all; "
          "goodput: every device's payload over the time from")
    print("# the first byte any device got to the last, vs configured rate·mss/(mss+overhead); fast = recovery: fast")
    print("# (the default), rto = recovery: rto (every loss waits for its flow's RTO)")
    print_table(rows)
    if args.json is not None:
        args.json.write_text(json.dumps({"rerun": rerun, "rows": rows}, indent=2))
        print(f"# rows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
