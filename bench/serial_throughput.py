"""Benchmark: paced serial throughput over a real pty vs the line rate net of framing overhead."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import tty

from devices.reliable_serial import ReliableSerialLink
from devices.serial_framing import MessageType, framing_overhead_bytes
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


async def measure_reliable(baud: int, payload_bytes: int, count: int) -> float:
    """Payload bytes per second delivered in order through ReliableSerialLink at both ends (ACKs flow back)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    payload = bytes(1 + index % 255 for index in range(payload_bytes))
    try:
        async with ReliableSerialLink(SerialLink.from_fd(master, baud=baud)) as host, \
                ReliableSerialLink(await SerialLink.open(os.ttyname(slave), baud=baud)) as board:
            async def send_all() -> None:
                for _ in range(count):
                    await host.send(MessageType.UPDATE_CHUNK, payload)

            sender = asyncio.create_task(send_all())
            arrivals = []
            for _ in range(count):
                if (await board.receive(timeout_s=30)).payload != payload:
                    raise SystemExit("a frame arrived changed")
                arrivals.append(time.perf_counter())
            await sender
            return (count - 1) * payload_bytes / (arrivals[-1] - arrivals[0])
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
    reliable = asyncio.run(measure_reliable(args.baud, args.payload, count))
    print(f"reliable link (sequenced, acknowledged, both ends): {reliable:.0f} B/s delivered in order, "
          f"{reliable / expected:.3f} x the net line rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
