"""`testbed channel` as a standalone proxy: real echo server, real subprocess, signals, counters, bad arguments."""

from __future__ import annotations

import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.channel_command import EXIT_BAD_ARGUMENTS
from testbed.cli import main

ROOT = Path(__file__).resolve().parents[2]
COUNTER_LINE = re.compile(
    r"(downlink|uplink): (\d+) bytes in (\d+) segments \((\d+) bytes on the wire\), (\d+) lost \([0-9.]+%\), "
    r"(\d+) retransmissions"
)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class ChannelProcess:
    """`testbed channel ...` in a subprocess; ``port`` is read from its start-up line."""

    def __init__(self, *arguments: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "testbed.cli", "channel", *arguments],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert self.process.stdout is not None
        self.banner: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise AssertionError(f"channel exited early: {self.process.communicate(timeout=10)}")
            self.banner.append(line)
            if line.startswith("Ctrl-C"):
                break
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.banner[0])
        assert match, self.banner
        self.port = int(match.group(1))

    def stop(self, signal_number: int) -> tuple[int, str, str]:
        self.process.send_signal(signal_number)
        out, err = self.process.communicate(timeout=30)
        return self.process.returncode, "".join(self.banner) + out, err

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate(timeout=10)


def _counters(output: str) -> dict[str, tuple[int, ...]]:
    return {match.group(1): tuple(int(group) for group in match.groups()[1:])
            for match in COUNTER_LINE.finditer(output)}


def test_echo_through_the_link_then_sigint_prints_counters(echo_port: int) -> None:
    channel = ChannelProcess("--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_port}",
                             "--rate", "2Mbit", "--delay", "5ms", "--loss", "2%", "--seed", "3")
    try:
        banner = "".join(channel.banner)
        assert f"upstream 127.0.0.1:{echo_port}" in banner
        assert "downlink (upstream → client): 2 Mbit/s, 5 ms, 2.00% loss" in banner
        assert "uplink   (client → upstream): 2 Mbit/s, 5 ms, 2.00% loss" in banner
        payload = os.urandom(50_000)
        with socket.create_connection(("127.0.0.1", channel.port), timeout=20) as client:
            client.sendall(payload)
            received = bytearray()
            while len(received) < len(payload):
                chunk = client.recv(65536)
                assert chunk, "the proxy closed the connection early"
                received += chunk
        assert bytes(received) == payload
        code, output, errors = channel.stop(signal.SIGINT)
    finally:
        channel.kill()
    assert code == 0, errors
    assert "stopped after" in output
    counters = _counters(output)
    for direction in ("downlink", "uplink"):
        payload_bytes, segments, wire_bytes, lost, retransmissions = counters[direction]
        assert payload_bytes == len(payload)
        assert segments >= len(payload) // 1460 + 1
        headers = payload_bytes + 40 * (segments + retransmissions)  # each attempt pays the overhead again
        assert headers <= wire_bytes <= headers + 1460 * retransmissions
        assert lost == retransmissions
    assert "connections: 1 accepted" in output
    assert "Traceback" not in errors


def test_profile_with_uplink_override_and_sigterm(echo_port: int) -> None:
    channel = ChannelProcess("--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{echo_port}",
                             "--profile", "lte-m", "--uplink-rate", "100kbit", "--uplink-loss", "0")
    try:
        banner = "".join(channel.banner)
        assert "profile lte-m" in banner
        assert "downlink (upstream → client): 375 kbit/s, 100 ms ± 20 ms, 0.50% loss" in banner
        assert "uplink   (client → upstream): 100 kbit/s, 100 ms ± 20 ms, 0.00% loss" in banner
        code, output, errors = channel.stop(signal.SIGTERM)
    finally:
        channel.kill()
    assert code == 0, errors
    assert _counters(output) == {"downlink": (0, 0, 0, 0, 0), "uplink": (0, 0, 0, 0, 0)}
    assert "connections: 0 accepted" in output


BASE = ["channel", "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:9"]


@pytest.mark.parametrize(("arguments", "expected"), [
    (["--rate", "fast"], ["--rate", "'fast'"]),
    (["--rate", "1Mbit", "--delay", "5 parsecs"], ["--delay", "'5 parsecs'"]),
    (["--rate", "1Mbit", "--loss", "150%"], ["--loss", "'150%'"]),
    (["--rate", "1Mbit", "--loss", "100%"], ["--loss", "below 100%"]),
    (["--rate", "1Mbit", "--uplink-rate", "10kB/s"], ["--uplink-rate", "'10kB/s'"]),
    (["--rate", "1Mbit", "--seed", "x"], ["--seed", "'x'"]),
    (["--profile", "carrier-pigeon"], ["--profile", "carrier-pigeon"]),
])
def test_bad_values_name_the_flag_and_exit_2(arguments: list[str], expected: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*BASE, *arguments])
    assert exit_info.value.code == EXIT_BAD_ARGUMENTS
    errors = capsys.readouterr().err
    assert errors.count("error:") == 1
    for text in expected:
        assert text in errors


@pytest.mark.parametrize(("arguments", "expected"), [
    ([], "give --profile NAME or --rate RATE"),
    (["--profile", "nb-iot", "--delay", "10ms"], "drop --delay"),
])
def test_missing_or_conflicting_link_exits_2(arguments: list[str], expected: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*BASE, *arguments]) == EXIT_BAD_ARGUMENTS
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [("--listen", "127.0.0.1"), ("--upstream", "127.0.0.1:0"),
                                             ("--upstream", "host:99999")])
def test_bad_addresses_exit_2(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    arguments = {"--listen": "127.0.0.1:0", "--upstream": "127.0.0.1:9", flag: value}
    with pytest.raises(SystemExit) as exit_info:
        main(["channel", "--rate", "1Mbit", *(item for pair in arguments.items() for item in pair)])
    assert exit_info.value.code == EXIT_BAD_ARGUMENTS
    errors = capsys.readouterr().err
    assert flag in errors and repr(value) in errors


def test_listen_port_in_use_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["channel", "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:9", "--rate", "1Mbit"])
    assert code == EXIT_BAD_ARGUMENTS
    errors = capsys.readouterr().err
    assert f"--listen 127.0.0.1:{port}" in errors and "already in use" in errors


def test_bench_channel_is_registered(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "channel", "--help"])
    assert exit_info.value.code == 0
    assert "--quick" in capsys.readouterr().out
