"""Shared fixtures: a real Mosquitto broker on 127.0.0.1, started per test session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import settings

# In CI the property tests replay the same examples on every run: a red CI blocks a landing, so an example
# found there by chance would block work that did not cause it. Elsewhere they explore new examples (and
# keep the failures they find in .hypothesis/ for the next run).
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


def missing_requirement(message: str) -> NoReturn:
    """Skip a test whose tool or privilege is missing on this machine; in CI (CI=true) fail instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def debian_tool(binary: str, package: str | None = None) -> str:
    """Path of a program the tests need from a Debian package (`make test-services` installs them)."""
    found = shutil.which(binary) or next(
        (path for path in (f"/usr/bin/{binary}", f"/usr/sbin/{binary}") if Path(path).exists()), None)
    if found is None:
        missing_requirement(f"{binary} is not installed: run `make test-services` "
                            f"(installs the Debian package {package or binary})")
    return found


@pytest.fixture(scope="session", autouse=True)
def runs_register_in_a_folder_of_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Runs under test register their exporter for Prometheus (testbed.prometheus_targets) in a folder of the test
    session, not in the user's; subprocesses inherit it."""
    from testbed.prometheus_targets import TARGETS_DIRECTORY_VARIABLE

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(TARGETS_DIRECTORY_VARIABLE, str(tmp_path_factory.mktemp("prometheus-targets")))
        yield


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """(host, port) of a Mosquitto broker; fails (never skips) when Mosquitto is not installed."""
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        pytest.fail("mosquitto is not installed: run the README's test command (make test), which installs it")
    port = free_port()
    folder = tmp_path_factory.mktemp("mosquitto")
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    log = open(folder / "mosquitto.log", "w")
    process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def _mosquitto_binary() -> str:
    binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if binary is None:
        pytest.fail("mosquitto is not installed: run the README's test command (make test), which installs it")
    return binary


@pytest.fixture
def start_mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], int]]:
    """Start a Mosquitto broker on 127.0.0.1 with extra config lines; returns its port. Stopped after the test.

    The config gets `listener PORT 127.0.0.1` and `persistence false` first; the caller adds the rest
    (`allow_anonymous`, `password_file`, `cafile`/`certfile`/`keyfile` for the listener).
    """
    binary = _mosquitto_binary()
    started: list[tuple[subprocess.Popen[bytes], Any]] = []

    def start(extra_config: str) -> int:
        port = free_port()
        folder = tmp_path_factory.mktemp("mosquitto-custom")
        config = folder / "mosquitto.conf"
        # Started as root, Mosquitto drops to the `mosquitto` user and then cannot read pytest's 0700 tmp dirs.
        run_as = "user root\n" if os.geteuid() == 0 else ""
        config.write_text(f"{run_as}listener {port} 127.0.0.1\npersistence false\n{extra_config.strip()}\n")
        log = open(folder / "mosquitto.log", "w")
        process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT)
        started.append((process, log))
        deadline = time.monotonic() + 10.0
        while process.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return port
            time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start: {(folder / 'mosquitto.log').read_text()}")

    try:
        yield start
    finally:
        for process, log in started:
            process.terminate()
            process.wait(timeout=10)
            log.close()


@dataclass(frozen=True)
class TlsFiles:
    """A CA and a server certificate it signed (CN/SAN 127.0.0.1 and localhost), plus an unrelated CA."""

    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    other_ca_file: Path
    other_name_cert_file: Path  # signed by ca_file, but only for DNS:broker.invalid
    other_name_key_file: Path


def _openssl(*arguments: str) -> None:
    completed = subprocess.run(["openssl", *arguments], capture_output=True, text=True, timeout=60)
    if completed.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(arguments)} failed: {completed.stderr}")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """Self-signed test CAs and a server certificate, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed (needed to make test certificates)")
    folder = tmp_path_factory.mktemp("tls")
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt"),
                 "-subj", f"/CN=edge-testbed {name}")
    for name, common_name, alternative_names in (("server", "127.0.0.1", "IP:127.0.0.1, DNS:localhost"),
                                                 ("other-name", "broker.invalid", "DNS:broker.invalid")):
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / f"{name}.key"),
                 "-out", str(folder / f"{name}.csr"), "-subj", f"/CN={common_name}")
        (folder / f"{name}.ext").write_text(
            f"subjectAltName = {alternative_names}\n"
            "basicConstraints = CA:FALSE\n"
            "keyUsage = digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\n"
        )
        _openssl("x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(folder / "ca.crt"),
                 "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-extfile", str(folder / f"{name}.ext"), "-out", str(folder / f"{name}.crt"))
    return TlsFiles(folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "other-ca.crt",
                    folder / "other-name.crt", folder / "other-name.key")
