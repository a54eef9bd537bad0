"""Benchmark: the TCP proxy's CPU time per MB carried at a fixed link rate, its write path against the one it replaced.

The baseline is the write path before issue 13 (item 4), kept here verbatim: every release of segments was
followed by ``await wait_within(destination.drain(), write_timeout_s)``, a task and a timer per release. The
proxy now writes, and waits for its destination only while the transport's buffer is above its high-water
mark, bounded by one stall timer per direction. Both run in this one process, alternating, on the same link
(rate-limited downlink, so segments leave one timer wake-up at a time, as in a run); the sender and the
receiver run in a child process, so this process's CPU time (``time.process_time``) is the proxy's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from channel.link import LinkParameters
from channel.proxy import LinkProxy, _Direction, wait_within

MEGABYTE = 1_000_000
BLOCK_BYTES = 65536


async def _deliver_with_a_task_and_timer_per_release(self: _Direction, data: bytes) -> None:
    """The proxy's ``_Direction._deliver`` before issue 13 (item 4): the baseline."""
    try:
        if self.dropped_as_gone(data):
            return
        self.destination.write(data)
        await wait_within(self.destination.drain(), self.proxy.write_timeout_s)
    except ConnectionError as error:
        self.proxy.dropped_bytes += len(data)
        self._mark_gone(f"{type(error).__name__}: {error}")
    except asyncio.TimeoutError as error:
        self.proxy.dropped_bytes += len(data)
        self.proxy._record_error(f"{self.label} destination did not take data for {self.proxy.write_timeout_s} s",
                                 error)
        self._mark_gone("write timed out")
    finally:
        self.in_flight_bytes -= len(data)
        self._room.set()


@contextlib.contextmanager
def write_path(variant: str) -> Iterator[None]:
    """Within the block, proxies write the ``variant`` way: ``current`` or ``baseline``."""
    current = _Direction._deliver
    if variant == "baseline":
        _Direction._deliver = _deliver_with_a_task_and_timer_per_release  # type: ignore[method-assign]
    try:
        yield
    finally:
        _Direction._deliver = current  # type: ignore[method-assign]


# --- the peer: a child process holding the sender (upstream) and the receiver (the proxy's client) ---

async def _peer() -> None:
    """Serve bytes on request, print the port; then per stdin line ``PORT N``: fetch N bytes via PORT, print seconds."""
    block = os.urandom(BLOCK_BYTES)

    senders: set[asyncio.Task[None]] = set()

    async def send_on_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        senders.add(asyncio.current_task())  # type: ignore[arg-type]
        wanted = int.from_bytes(await reader.readexactly(8), "big")
        while wanted > 0:
            writer.write(block[:wanted])
            wanted -= min(wanted, BLOCK_BYTES)
            await writer.drain()
        await reader.read()  # until the proxy closes its side
        writer.close()
        senders.discard(asyncio.current_task())  # type: ignore[arg-type]

    server = await asyncio.start_server(send_on_request, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    loop = asyncio.get_running_loop()
    for line in sys.stdin:
        port, size = (int(field) for field in line.split())
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = loop.time()
        writer.write(size.to_bytes(8, "big"))
        received = 0
        while received < size:
            chunk = await asyncio.wait_for(reader.read(1 << 20), 60)
            if not chunk:
                raise SystemExit("the proxy closed the connection early")
            received += len(chunk)
        print(f"{loop.time() - start:.6f}", flush=True)
        writer.close()
        await writer.wait_closed()
    if senders:  # the last one ends as the parent's proxy closes
        await asyncio.wait(list(senders), timeout=10)


@dataclass
class Sample:
    variant: str
    cpu_ms_per_mb: float
    seconds: float
    lateness_p99_ms: float


async def _transfer(peer: asyncio.subprocess.Process, upstream_port: int, rate_bps: float, size: int,
                    variant: str) -> Sample:
    assert peer.stdin is not None and peer.stdout is not None
    link = LinkParameters(rate_bps=rate_bps)
    with write_path(variant):
        async with LinkProxy("127.0.0.1", upstream_port, link, LinkParameters(rate_bps=None), seed=1) as proxy:
            cpu_before = time.process_time()
            peer.stdin.write(f"{proxy.address[1]} {size}\n".encode())
            await peer.stdin.drain()
            seconds = float(await asyncio.wait_for(peer.stdout.readline(), 600))
            cpu = time.process_time() - cpu_before
    p99 = proxy.lateness.quantile(0.99)
    return Sample(variant, cpu * 1e3 / (size / MEGABYTE), seconds, -1.0 if p99 is None else p99 * 1e3)


async def measure(rate_bps: float, size: int, repeats: int) -> list[Sample]:
    """``repeats`` transfers of ``size`` bytes per variant, alternating (baseline, current, baseline, ...)."""
    peer = await asyncio.create_subprocess_exec(sys.executable, os.path.abspath(__file__), "--peer",
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert peer.stdout is not None
        upstream_port = int(await asyncio.wait_for(peer.stdout.readline(), 60))
        samples = []
        for _ in range(repeats):
            for variant in ("baseline", "current"):
                samples.append(await _transfer(peer, upstream_port, rate_bps, size, variant))
        return samples
    finally:
        if peer.stdin is not None:
            peer.stdin.close()
        try:
            await asyncio.wait_for(peer.wait(), 10)
        except asyncio.TimeoutError:
            peer.kill()
            await peer.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", default="2,10,50", help="link rates in Mbit/s, comma-separated (default 2,10,50)")
    parser.add_argument("--seconds", type=float, default=2.0, help="airtime of each transfer (default 2 s)")
    parser.add_argument("--repeats", type=int, default=5, help="transfers per variant and rate (default 5)")
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.peer:
        asyncio.run(_peer())
        return 0
    try:
        rates = [float(rate) * 1e6 for rate in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates {args.rates!r} is invalid: expected Mbit/s numbers separated by commas, e.g. 2,10,50")
    if any(rate <= 0 for rate in rates) or args.seconds <= 0 or args.repeats < 1:
        parser.error("--rates and --seconds must be > 0, --repeats >= 1")
    print(f"# bench/proxy_cpu.py: proxy CPU per MB carried, {args.repeats} transfers of {args.seconds:g} s airtime "
          "per variant and rate, median (min-max)")
    print(f"# rerun: python bench/proxy_cpu.py --rates {args.rates} --seconds {args.seconds:g} "
          f"--repeats {args.repeats}")
    print("reference: baseline = a task and a timer per release (asyncio wait on drain), the write path before")
    print(f"{'rate':>9} | {'baseline ms/MB':>22} | {'current ms/MB':>22} | {'current/baseline':>16} | "
          "lateness p99 ms (baseline, current)")
    ratios = []
    for rate in rates:
        size = int(rate / 8 * args.seconds * 1460 / 1500)
        samples = asyncio.run(measure(rate, size, args.repeats))
        columns = []
        for variant in ("baseline", "current"):
            values = [sample.cpu_ms_per_mb for sample in samples if sample.variant == variant]
            columns.append((statistics.median(values), min(values), max(values)))
        lateness = [statistics.median(s.lateness_p99_ms for s in samples if s.variant == v)
                    for v in ("baseline", "current")]
        ratio = columns[1][0] / columns[0][0]
        ratios.append(ratio)
        cells = [f"{median:7.1f} ({low:.1f}-{high:.1f})" for median, low, high in columns]
        print(f"{rate / 1e6:>5g} Mbit | {cells[0]:>22} | {cells[1]:>22} | {ratio:>16.3f} | "
              f"{lateness[0]:.2f}, {lateness[1]:.2f}")
    print(f"current/baseline CPU per MB: {', '.join(f'{r:.3f}' for r in ratios)} (median over rates "
          f"{statistics.median(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
