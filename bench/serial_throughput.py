"""Benchmark: paced serial throughput over a real pty vs the line rate net of framing overhead."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tty

from devices.serial_framing import framing_overhead_bytes
from devices.serial_link import PacedThroughput, SerialLink, line_rate_bytes_per_s, measure_paced_throughput

TOLERANCE = 0.05


async def measure(baud: int, payload_bytes: int, count: int) -> PacedThroughput:
    """Both ends of a real pty, opened as the host and a board would."""
    master, slave = os.openpty()
    tty.setraw(slave)
    try:
        async with SerialLink.from_fd(master, baud=baud) as host, \
                await SerialLink.open(os.ttyname(slave), baud=baud) as board:
            return await measure_paced_throughput(host, board, payload_bytes, count)
    finally:
        os.close(slave)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--payload", type=int, default=1024, help="update-chunk payload bytes per frame")
    parser.add_argument("--seconds", type=float, default=3.0, help="about how long to send")
    args = parser.parse_args(argv)
    frame_seconds = (args.payload + framing_overhead_bytes(args.payload)) / line_rate_bytes_per_s(args.baud)
    count = max(3, int(args.seconds / frame_seconds))
    measured = asyncio.run(measure(args.baud, args.payload, count))
    expected, sender, receiver = measured.net_line_rate, measured.sender, measured.receiver
    print(f"# bench/serial_throughput.py: {count} frames of {args.payload} B over a pty at {args.baud} baud 8N1")
    print(f"# rerun: python bench/serial_throughput.py --baud {args.baud} --payload {args.payload}")
    print(f"reference: line rate {line_rate_bytes_per_s(args.baud):.0f} B/s, net of framing "
          f"({framing_overhead_bytes(args.payload)} B per {args.payload} B frame) {expected:.0f} B/s")
    worst = 0.0
    for side, rate in (("sender", sender), ("receiver", receiver)):
        ratio = rate / expected
        worst = max(worst, abs(ratio - 1))
        print(f"{side:8s}: {rate:.0f} B/s = {ratio:.3f} of the net line rate")
    print(f"target: within {TOLERANCE:.0%} -> {'met' if worst <= TOLERANCE else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
