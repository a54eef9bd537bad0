"""A local Mosquitto a run starts (`broker: mosquitto`): found on this host, on a free loopback port, stopped at the end."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

from testbed.broker import BrokerError, free_tcp_port
from testbed.broker_access import BrokerAccess
from testbed.broker_config import CONF_FILE, PASSWORD_FILE, write_broker_config

BINARY = "mosquitto"
FALLBACK_BINARIES = (Path("/usr/sbin/mosquitto"),)  # Debian's package installs it outside a user's PATH
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0  # after SIGTERM, before SIGKILL
PROBE_INTERVAL_S = 0.05
LOG_LINES_QUOTED = 3
MISSING = ("broker: mosquitto is not installed on this host (no mosquitto on PATH, nor "
           + ", ".join(map(str, FALLBACK_BINARIES)) + "): install it (apt-get install mosquitto) or use broker: embedded")
PR_SET_PDEATHSIG = 1  # linux/prctl.h
RUNNING = re.compile(r"mosquitto version (\S+) running")
"""What Mosquitto logs once its listeners are open (2.0.11: `1795990083: mosquitto version 2.0.11 running`)."""


def find_mosquitto() -> str | None:
    """The Mosquitto binary: `mosquitto` on PATH, else Debian's /usr/sbin/mosquitto; None when neither is there."""
    found = shutil.which(BINARY)
    if found is not None:
        return found
    return next((str(path) for path in FALLBACK_BINARIES if os.access(path, os.X_OK)), None)


def mosquitto_config(port: int, host: str, access: BrokerAccess | None, access_dir: Path, as_root: bool) -> str:
    """mosquitto.conf for a run's broker: one listener on host:port, nothing kept on disk, no connection limit, queues of
    a million messages a client, and the run's identities (`access`, whose files are in `access_dir`) checked like the
    embedded broker checks them."""
    lines = [
        # Started as root, Mosquitto drops to the `mosquitto` user, which cannot read a private temp dir.
        *(["user root"] if as_root else []),
        "per_listener_settings false",
        f"listener {port} {host}",
        "max_connections -1",
        # The run's own client must get every device's hello, status and report, also when ten thousand come at once:
        # past the default queue of 1,000 QoS 1 messages a client, Mosquitto dropped them and the round waited for
        # reports that never came (issue 13). A client that leaves takes its queue with it (clean sessions). A million,
        # not 0 ("no maximum"): with 0, 2.0.11 disconnected a client in tests/test_local_mosquitto.py's ACL test.
        "max_queued_messages 1000000",
        "persistence false",
    ]
    if access is None:
        lines.append("allow_anonymous true")
    elif access.restricts_topics:  # each identity held to its topics: the ACL `testbed broker-config` writes
        lines.append((access_dir / CONF_FILE).read_text(encoding="utf-8"))
    else:  # every client of the run uses the server's identity, which may then do anything (as on the embedded one)
        lines += ["allow_anonymous false", f"password_file {access_dir / PASSWORD_FILE}"]
    return "\n".join(lines) + "\n"


def running_version(log_text: str) -> str | None:
    """The version of a Mosquitto whose log says it is running with its listeners open, or None (not yet)."""
    found = RUNNING.search(log_text)
    return found.group(1) if found else None


def last_log_lines(log_text: str, count: int = LOG_LINES_QUOTED) -> str:
    """The last `count` lines of a log as one line (for an error message), or a note that it is empty."""
    lines = [line.strip() for line in log_text.splitlines() if line.strip()]
    return " | ".join(lines[-count:]) if lines else "(its log is empty)"


def _child_setup(libc: ctypes.CDLL | None) -> Callable[[], None]:
    """What the child does before it becomes Mosquitto: open files up to its hard limit (a descriptor per client, and
    a fleet may have thousands), and on Linux a SIGTERM when the process that started it dies, however that dies."""
    def setup() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if libc is not None:
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return setup


def _libc() -> ctypes.CDLL | None:
    """The C library (for prctl), loaded in the parent: the child between fork and exec should load nothing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


class LocalMosquitto:
    """A Mosquitto process on a free 127.0.0.1 port, owned by an `async with` block (the temp dir of its config
    and log goes with it).

    Anonymous by default; given the run's identities (`access`) it admits only them, and holds each to its own
    topics when there are device identities. `stop` then `start` restart it on the same port (a broker_restart).
    """

    def __init__(self, access: BrokerAccess | None = None, host: str = "127.0.0.1", port: int = 0,
                 binary: str | None = None) -> None:
        self.host = host
        self.port = port
        self.access = access
        self.binary = binary
        self.version: str | None = None
        self._folder: Path | None = None
        self._log_offset = 0  # where the log of the latest start begins (a restart appends to the same file)
        self._log: IO[bytes] | None = None
        self._process: asyncio.subprocess.Process | None = None

    @property
    def description(self) -> str:
        return f"mosquitto {self.version}" if self.version else "mosquitto"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    @property
    def pid(self) -> int | None:
        """The Mosquitto process's id while one is started."""
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Path | None:
        return None if self._folder is None else self._folder / "mosquitto.log"

    async def __aenter__(self) -> LocalMosquitto:
        self.binary = self.binary or find_mosquitto()
        if self.binary is None:
            raise BrokerError(MISSING)
        if self.port == 0:
            self.port = free_tcp_port(self.host)
        self._folder = Path(tempfile.mkdtemp(prefix="testbed-mosquitto-"))
        try:
            if self.access is not None:
                write_broker_config(self.access, self._folder, "this run")
            config = mosquitto_config(self.port, self.host, self.access, self._folder, as_root=os.geteuid() == 0)
            (self._folder / "mosquitto.conf").write_text(config, encoding="utf-8")
            self._log = open(self._folder / "mosquitto.log", "ab")
            await self.start()
        except BaseException:
            self._remove_folder()
            raise
        return self

    async def start(self) -> None:
        """Start Mosquitto on host:port and wait until it accepts connections (again after `stop`: same port, no
        sessions kept)."""
        if self.running:
            raise BrokerError("the local mosquitto is already running")
        assert self._folder is not None and self._log is not None and self.binary is not None, "start inside async with"
        self._log_offset = os.fstat(self._log.fileno()).st_size  # Mosquitto writes it, not this handle
        self._process = await asyncio.create_subprocess_exec(
            self.binary, "-c", str(self._folder / "mosquitto.conf"), stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the terminal is the run's to handle, not the broker's
            preexec_fn=_child_setup(_libc()))
        try:
            await asyncio.wait_for(self._accepting(self._process), START_TIMEOUT_S)
        except BaseException as error:
            await self.stop()
            if isinstance(error, asyncio.TimeoutError):
                raise BrokerError(f"mosquitto did not accept connections on {self.host}:{self.port} within "
                                  f"{START_TIMEOUT_S:g} s; its log ends: {last_log_lines(self._log_text())}") from None
            raise

    async def _accepting(self, process: asyncio.subprocess.Process) -> None:
        """Returns once Mosquitto says it runs and host:port accepts a connection; BrokerError if it exits first.

        Both, since something else may have taken the port since it was found free: the connect alone would
        then succeed while Mosquitto exits for want of the port.
        """
        while True:
            if process.returncode is not None:
                raise BrokerError(f"mosquitto exited with status {process.returncode} as it started on "
                                  f"{self.host}:{self.port}; its log ends: {last_log_lines(self._log_text())}")
            version = running_version(self._log_text())
            if version is not None and await self._port_accepts():
                self.version = version
                return
            await asyncio.sleep(PROBE_INTERVAL_S)

    async def _port_accepts(self) -> bool:
        try:
            _, writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    async def stop(self) -> None:
        """SIGTERM, and SIGKILL if Mosquitto is still there after STOP_TIMEOUT_S: every client's connection drops (a
        broker restart's first half; `start` is the second). Even when cancelled, the process does not outlive it."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        try:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
            except asyncio.TimeoutError:
                pass
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()  # reaped by asyncio's child watcher, also when nobody waits for it here
        if process.returncode is None:
            await process.wait()

    async def restart(self, down_s: float) -> None:
        """Stop Mosquitto, wait `down_s`, start it again on the same host and port."""
        await self.stop()
        await asyncio.sleep(down_s)
        await self.start()

    def _log_text(self) -> str:
        """What Mosquitto logged since it was last started."""
        path = self.log_path
        if path is None:
            return ""
        try:
            with open(path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _remove_folder(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self.stop()
        finally:
            self._remove_folder()
