"""`testbed channel` (one emulated link as a standalone TCP proxy) and `testbed bench channel`."""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib.util
import logging
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from channel.errors import ChannelError
from channel.link import LinkCounters, LinkParameters
from testbed.core.plugins import LINK_PROFILES
from channel.proxy import LinkProxy
from testbed.core.units import UnitError, parse_duration_s, parse_fraction, parse_rate_bps

EXIT_OK = 0
EXIT_BAD_ARGUMENTS = 2
COMMANDS = ("channel", "bench")
BENCH_SCRIPTS = {"channel": "link_fidelity.py"}
REPO = Path(__file__).resolve().parents[1]


UNLIMITED = "unlimited"  # what --rate/--uplink-rate parse "unlimited" to (None would read as "not given")


def _rate_or_unlimited(text: str) -> float | str:
    if text.strip().lower() in ("unlimited", "none", "inf"):
        return UNLIMITED
    try:
        return parse_rate_bps(text)
    except UnitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _duration(text: str) -> float:
    try:
        return parse_duration_s(text)
    except UnitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _loss(text: str) -> float:
    try:
        fraction = parse_fraction(text)
    except UnitError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if fraction >= 1.0:
        raise argparse.ArgumentTypeError(f"must be below 100% (a link that loses everything), got {text!r}")
    return fraction


def _address(text: str, allow_port_zero: bool) -> tuple[str, int]:
    host, separator, port_text = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]:1883
    if not separator or not host or not port_text.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. 127.0.0.1:18830), got {text!r}")
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port <= 65535:
        lowest = 0 if allow_port_zero else 1
        raise argparse.ArgumentTypeError(f"port must be in {lowest}..65535, got {text!r}")
    return host, port


def _listen_address(text: str) -> tuple[str, int]:
    return _address(text, allow_port_zero=True)


def _upstream_address(text: str) -> tuple[str, int]:
    return _address(text, allow_port_zero=False)


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if seed < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return seed


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register `channel` and `bench` on the `testbed` command's subparsers."""
    channel = commands.add_parser(
        "channel", help="run one emulated link as a TCP proxy (like Toxiproxy) until Ctrl-C",
        description="Run one emulated link as a TCP proxy until Ctrl-C or SIGTERM, then print its counters. "
                    "Downlink is upstream → client; the uplink takes the downlink's values unless given.",
    )
    channel.add_argument("--listen", type=_listen_address, required=True, metavar="HOST:PORT",
                         help="where clients connect (port 0: any free port, printed on start)")
    channel.add_argument("--upstream", type=_upstream_address, required=True, metavar="HOST:PORT",
                         help="the real server, e.g. a broker at 127.0.0.1:1883")
    channel.add_argument("--profile", choices=LINK_PROFILES.names(), default=None,
                         help="a named link profile (both directions)")
    channel.add_argument("--rate", type=_rate_or_unlimited, default=None,
                         help="downlink rate incl. 40 B/segment overhead, e.g. 50kbit, 2Mbit, unlimited")
    channel.add_argument("--delay", type=_duration, default=None, help="downlink one-way delay, e.g. 100ms")
    channel.add_argument("--jitter", type=_duration, default=None, help="downlink delay jitter (±), e.g. 10ms")
    channel.add_argument("--loss", type=_loss, default=None, help="downlink segment loss, e.g. 1%% or 0.01")
    channel.add_argument("--uplink-rate", type=_rate_or_unlimited, default=None,
                         help="uplink rate if it differs from --rate (or 'unlimited')")
    channel.add_argument("--uplink-delay", type=_duration, default=None, help="uplink delay if it differs from --delay")
    channel.add_argument("--uplink-jitter", type=_duration, default=None, help="uplink jitter if it differs from --jitter")
    channel.add_argument("--uplink-loss", type=_loss, default=None, help="uplink loss if it differs from --loss")
    channel.add_argument("--seed", type=_seed, default=0, help="seed of the link's randomness (default 0)")
    channel.add_argument("-v", "--verbose", action="store_true", help="log every connection, with tracebacks")
    bench = commands.add_parser("bench", help="run a benchmark from bench/ (e.g. `testbed bench channel --quick`)")
    bench_names = bench.add_subparsers(dest="bench_name", required=True, metavar="BENCHMARK")
    bench_channel = bench_names.add_parser(
        "channel", help="fidelity and overhead of the link emulator (runs bench/link_fidelity.py)",
        description="Fidelity of the proxy link emulator (goodput, delay, loss vs configured) and its overhead.")
    bench_channel.add_argument("--quick", action="store_true", help="a few cases, under a minute")
    bench_channel.add_argument("--seed", type=int, default=1, help="seed of the links' randomness (default 1)")
    bench_channel.add_argument("--backend", choices=("proxy", "tun", "all"), default="all",
                               help="link backend(s) to measure (default all; tun needs Linux and root)")
    bench_channel.add_argument("--json", default=None, metavar="FILE", help="also write the rows as JSON")


def run(args: argparse.Namespace) -> int:
    """Run the `channel` or `bench` command parsed by ``add_commands``; returns the exit code."""
    if args.command == "bench":
        arguments = ["--seed", str(args.seed), "--backend", args.backend] + (["--quick"] if args.quick else [])
        return _run_bench(args.bench_name, arguments + ([] if args.json is None else ["--json", args.json]))
    try:
        downlink, uplink = _links(args)
    except ChannelError as error:
        print(f"testbed channel: error: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    if not args.verbose:
        logging.getLogger("channel.proxy").addFilter(_without_traceback)
    try:
        return asyncio.run(_serve(args, downlink, uplink))
    except _ListenError as error:
        print(f"testbed channel: error: --listen {args.listen[0]}:{args.listen[1]}: {error}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS


def _links(args: argparse.Namespace) -> tuple[LinkParameters, LinkParameters]:
    """Downlink and uplink from --profile or --rate/--delay/--jitter/--loss, then the --uplink-* overrides."""
    given = {flag: getattr(args, flag) for flag in ("rate", "delay", "jitter", "loss")
             if getattr(args, flag) is not None}
    if args.profile is not None:
        if given:
            flags = ", ".join(f"--{flag}" for flag in given)
            raise ChannelError(f"--profile {args.profile} sets the downlink; drop {flags} "
                               "(or leave out --profile and give --rate/--delay/--jitter/--loss)")
        profile = LINK_PROFILES.get(args.profile)
        downlink, uplink = profile.downlink, profile.uplink
    else:
        if args.rate is None:
            raise ChannelError("give --profile NAME or --rate RATE (e.g. --rate 50kbit, or --rate unlimited)")
        downlink = LinkParameters(rate_bps=_rate_bps(args.rate), delay_s=args.delay or 0.0,
                                  jitter_s=args.jitter or 0.0, loss=args.loss or 0.0)
        uplink = downlink
    overrides = {field: value for field, value in (
        ("rate_bps", _rate_bps(args.uplink_rate)), ("delay_s", args.uplink_delay),
        ("jitter_s", args.uplink_jitter), ("loss", args.uplink_loss)) if value is not None}
    if args.uplink_rate == UNLIMITED:
        overrides["rate_bps"] = None
    if overrides:
        uplink = replace(uplink, **overrides)
    return downlink, uplink


def _rate_bps(value: float | str | None) -> float | None:
    return None if value in (None, UNLIMITED) else float(value)


def _without_traceback(record: logging.LogRecord) -> bool:
    """Log filter: one line per proxy error instead of a traceback (``-v`` keeps them)."""
    record.exc_info = None
    record.exc_text = None
    return True


class _ListenError(Exception):
    """The proxy could not listen on the requested address."""


def _link_line(label: str, link: LinkParameters) -> str:
    return (f"  {label}: {link.description}; MSS {link.mss_bytes} B + {link.overhead_bytes} B overhead per segment, "
            f"min RTO {link.min_rto_s * 1e3:g} ms")


async def _serve(args: argparse.Namespace, downlink: LinkParameters, uplink: LinkParameters) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(number, stop.set)
        except (NotImplementedError, RuntimeError):  # not on this platform: Ctrl-C raises instead
            pass
    (listen_host, listen_port), (upstream_host, upstream_port) = args.listen, args.upstream
    proxy = LinkProxy(upstream_host, upstream_port, downlink, uplink, seed=args.seed,
                      name=args.profile or "channel", listen_host=listen_host, listen_port=listen_port)
    try:
        await proxy.__aenter__()
    except ChannelError as error:
        cause = error.__cause__
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            raise _ListenError("address already in use (another program listens there); "
                               "stop it or choose another port") from error
        raise _ListenError(str(cause or error)) from error
    started = time.monotonic()
    try:
        host, port = proxy.address
        shown_host = f"[{host}]" if ":" in host else host
        profile = f" (profile {args.profile}: {LINK_PROFILES.get(args.profile).source})" if args.profile else ""
        print(f"testbed channel: listening on {shown_host}:{port} → upstream {upstream_host}:{upstream_port}, "
              f"seed {args.seed}{profile}", flush=True)
        print(_link_line("downlink (upstream → client)", downlink), flush=True)
        print(_link_line("uplink   (client → upstream)", uplink), flush=True)
        print("Ctrl-C or SIGTERM stops it and prints its counters.", flush=True)
        await stop.wait()
    finally:
        active = proxy.active_connections
        await proxy.aclose()
        for number in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(number)
    print(counters_report(proxy, time.monotonic() - started, active), flush=True)
    return EXIT_OK


def _direction_line(label: str, counters: LinkCounters, seconds: float) -> str:
    attempts = counters.segments + counters.retransmissions
    lost_percent = 100.0 * counters.lost_segments / attempts if attempts else 0.0
    goodput = counters.payload_bytes * 8 / seconds if seconds > 0 else 0.0
    return (f"  {label}: {counters.payload_bytes} bytes in {counters.segments} segments "
            f"({counters.wire_bytes} bytes on the wire), {counters.lost_segments} lost ({lost_percent:.2f}%), "
            f"{counters.retransmissions} retransmissions; {goodput / 1e3:.1f} kbit/s mean over the run")


def counters_report(proxy: LinkProxy, seconds: float, active_at_stop: int) -> str:
    """What the link carried, per direction, and its connections (printed on exit)."""
    lines = [
        f"testbed channel: stopped after {seconds:.1f} s",
        _direction_line("downlink", proxy.downlink_counters, seconds),
        _direction_line("uplink", proxy.uplink_counters, seconds),
        f"  connections: {proxy.connections_accepted} accepted, {active_at_stop} open at stop, "
        f"{proxy.connection_resets} reset; {proxy.dropped_bytes} bytes dropped; {proxy.errors} errors",
    ]
    if proxy.last_error:
        lines.append(f"  last error: {proxy.last_error}")
    return "\n".join(lines)


def _run_bench(name: str, arguments: list[str]) -> int:
    """Run bench/<name>.py's ``main(arguments)`` from the source checkout this package was installed from."""
    script = REPO / "bench" / BENCH_SCRIPTS[name]
    if not script.is_file():
        print(f"testbed bench: error: {script} not found; the benchmarks ship with the source checkout "
              "(pip install -e .)", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    spec = importlib.util.spec_from_file_location(f"bench_{name}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return int(module.main(arguments))
