"""Benchmark: paced serial throughput over a real pty vs the line rate net of framing overhead."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import tty

from devices.serial_framing import MessageType, framing_overhead_bytes
from devices.serial_link import SerialLink, line_rate_bytes_per_s

TOLERANCE = 0.05


async def measure(baud: int, payload_bytes: int, count: int) -> tuple[float, float, float]:
    """(net line rate, sender rate, receiver rate) in payload bytes per second."""
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    payload = bytes(1 + index % 255 for index in range(payload_bytes))
    expected = line_rate_bytes_per_s(baud) * payload_bytes / (payload_bytes + framing_overhead_bytes(payload_bytes))
    arrivals: list[float] = []
    try:
        async with SerialLink.from_fd(master, baud=baud) as host, await SerialLink.open(path, baud=baud) as board:

            async def receive_all() -> None:
                async for frame in board.frames():
                    if frame.payload != payload:
                        raise RuntimeError("a frame arrived changed")
                    arrivals.append(time.perf_counter())
                    if len(arrivals) == count:
                        return

            receiver = asyncio.create_task(receive_all())
            started = time.perf_counter()
            for _ in range(count):
                await host.send_message(MessageType.UPDATE_CHUNK, payload)
            sender_seconds = time.perf_counter() - started
            await asyncio.wait_for(receiver, 60)
    finally:
        os.close(slave)
    sender_rate = count * payload_bytes / sender_seconds
    receiver_rate = (count - 1) * payload_bytes / (arrivals[-1] - arrivals[0])
    return expected, sender_rate, receiver_rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baud", type=int, default=115200)
    parser.add_argument("--payload", type=int, default=1024, help="update-chunk payload bytes per frame")
    parser.add_argument("--seconds", type=float, default=3.0, help="about how long to send")
    args = parser.parse_args(argv)
    frame_seconds = (args.payload + framing_overhead_bytes(args.payload)) / line_rate_bytes_per_s(args.baud)
    count = max(3, int(args.seconds / frame_seconds))
    expected, sender, receiver = asyncio.run(measure(args.baud, args.payload, count))
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
