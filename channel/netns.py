"""Linux network namespaces for the packet-level backends: create/delete, run commands and open sockets inside.

Needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2's ``ip``. The API is small and stable:

* ``NetworkNamespace(name=None)``: ``with`` (or ``async with``) creates ``ip netns add NAME`` (a unique
  ``tb-`` name by default), brings its loopback up, and deletes it on exit. ``ns.run([...])`` runs a
  command inside it (``ip netns exec``); ``ns.ip(...)`` runs ``ip ...`` inside it.
* ``entered(namespace)``: a context manager that moves the *calling thread* into the namespace and
  back. A socket, TUN fd or anything else created meanwhile stays in that namespace afterwards.
* ``socket_in(namespace, family, type)``: a socket living in the namespace, usable from this process.
* ``open_connection_in(namespace, host, port, timeout_s)``: an asyncio (reader, writer) whose socket
  lives in the namespace.
* ``run_command(args)`` / ``host_ip(*args)``: run a command (``ip ...``) in the host namespace.

Every failure raises ``ChannelError`` naming the command or call and what to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

from channel.errors import ChannelError

#: Prefix of every namespace (and interface) the testbed creates, so stale ones can be found.
NAME_PREFIX = "tb-"
#: Where ``ip netns add`` mounts named namespaces.
NETNS_RUN_DIR = Path("/var/run/netns")
#: ``CLONE_NEWNET`` from <sched.h>: the namespace type ``setns`` joins.
CLONE_NEWNET = 0x40000000
COMMAND_TIMEOUT_S = 10.0

_libc: ctypes.CDLL | None = None


def _setns(fd: int, what: str) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise ChannelError(f"setns into {what} failed: {os.strerror(code)} (errno {code}); "
                           "entering a network namespace needs root (CAP_SYS_ADMIN)")


def require_netns_support() -> None:
    """Raise ChannelError unless this process can create and enter network namespaces (Linux, root, ``ip``)."""
    if not sys.platform.startswith("linux"):
        raise ChannelError(f"network namespaces need Linux (this is {sys.platform}); use the 'proxy' backend")
    if os.geteuid() != 0:
        raise ChannelError("network namespaces need root (CAP_SYS_ADMIN, CAP_NET_ADMIN): run as root, "
                           "or use the unprivileged 'proxy' backend")
    if not Path("/proc/self/ns/net").exists():
        raise ChannelError("this kernel has no network namespace support (/proc/self/ns/net is missing)")
    if shutil.which("ip") is None:
        raise ChannelError("iproute2's 'ip' command is not installed (apt-get install iproute2)")


def run_command(args: Sequence[str], timeout_s: float = COMMAND_TIMEOUT_S,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``args`` (no shell) with a timeout; ChannelError with its stderr when it fails and ``check``."""
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError as error:
        raise ChannelError(f"command {args[0]!r} not found: {error}") from error
    except subprocess.TimeoutExpired as error:
        raise ChannelError(f"command {' '.join(args)!r} did not finish within {timeout_s:g} s") from error
    if check and result.returncode != 0:
        raise ChannelError(f"command {' '.join(args)!r} failed (exit {result.returncode}): "
                           f"{result.stderr.strip() or result.stdout.strip()}")
    return result


def host_ip(*args: str, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """Run ``ip ARGS...`` in the host (current) namespace; returns its stdout."""
    return run_command(["ip", *args], timeout_s).stdout


def unique_name(prefix: str = NAME_PREFIX) -> str:
    """A fresh name like ``tb-1a2b3c4d`` (short enough to prefix an interface name)."""
    return f"{prefix}{secrets.token_hex(4)}"


def list_namespaces(prefix: str = NAME_PREFIX) -> list[str]:
    """Names of the named namespaces starting with ``prefix``."""
    if not NETNS_RUN_DIR.is_dir():
        return []
    return sorted(entry.name for entry in NETNS_RUN_DIR.iterdir() if entry.name.startswith(prefix))


def _namespace_name(namespace: NetworkNamespace | str) -> str:
    return namespace.name if isinstance(namespace, NetworkNamespace) else namespace


@contextlib.contextmanager
def entered(namespace: NetworkNamespace | str) -> Iterator[None]:
    """Move the calling thread into ``namespace`` for the ``with`` block, then back to where it was.

    Only the calling thread moves; do nothing that awaits or hands work to another thread inside.
    """
    name = _namespace_name(namespace)
    path = NETNS_RUN_DIR / name
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise ChannelError(f"network namespace {name!r} cannot be opened at {path}: {error} "
                           "(create it with NetworkNamespace / 'ip netns add')") from error
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        os.close(target)
        raise ChannelError(f"cannot open this thread's network namespace: {error}") from error
    try:
        _setns(target, f"namespace {name!r}")
        try:
            yield
        finally:
            _setns(original, "the original network namespace")
    finally:
        os.close(target)
        os.close(original)


def socket_in(namespace: NetworkNamespace | str, family: int = socket.AF_INET,
              type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    """A socket created inside ``namespace``; it stays there (its traffic uses that namespace's routes)."""
    with entered(namespace):
        return socket.socket(family, type, proto)


async def open_connection_in(
    namespace: NetworkNamespace | str, host: str, port: int, timeout_s: float = 10.0,
    limit: int = 2**16,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``host:port`` (an IP literal) from inside ``namespace``; asyncio streams over that socket."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket_in(namespace, family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout_s)
        except asyncio.TimeoutError as error:
            raise ChannelError(f"connecting to {host}:{port} from namespace {_namespace_name(namespace)!r} "
                               f"timed out after {timeout_s:g} s") from error
        except OSError as error:
            raise ChannelError(f"connecting to {host}:{port} from namespace {_namespace_name(namespace)!r} "
                               f"failed: {error}") from error
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise


class NetworkNamespace:
    """A named network namespace that exists inside ``with`` / ``async with`` and is deleted on exit."""

    def __init__(self, name: str | None = None, timeout_s: float = COMMAND_TIMEOUT_S) -> None:
        self.name = name if name is not None else unique_name()
        self.timeout_s = timeout_s
        self.created = False

    @property
    def path(self) -> Path:
        """The namespace's mount point (``/var/run/netns/NAME``), what ``setns`` opens."""
        return NETNS_RUN_DIR / self.name

    def create(self) -> None:
        """``ip netns add NAME`` and ``ip link set lo up`` inside it."""
        require_netns_support()
        run_command(["ip", "netns", "add", self.name], self.timeout_s)
        self.created = True
        try:
            self.ip("link", "set", "lo", "up")
        except ChannelError:
            self.delete()
            raise

    def delete(self) -> None:
        """``ip netns del NAME`` (idempotent). The kernel frees it once no socket or fd refers to it."""
        if not self.created:
            return
        result = run_command(["ip", "netns", "del", self.name], self.timeout_s, check=False)
        if result.returncode != 0 and self.path.exists():
            raise ChannelError(f"'ip netns del {self.name}' failed: {result.stderr.strip()}")
        self.created = False

    def run(self, args: Sequence[str], timeout_s: float | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside the namespace (``ip netns exec NAME ARGS...``)."""
        return run_command(["ip", "netns", "exec", self.name, *args],
                           self.timeout_s if timeout_s is None else timeout_s, check)

    def ip(self, *args: str) -> str:
        """Run ``ip ARGS...`` inside the namespace (``ip -n NAME``); returns its stdout."""
        return run_command(["ip", "-n", self.name, *args], self.timeout_s).stdout

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """``socket_in(self, ...)``."""
        return socket_in(self, family, type, proto)

    def __enter__(self) -> NetworkNamespace:
        self.create()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.delete()

    async def __aenter__(self) -> NetworkNamespace:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        self.__exit__(exc_type, exc, traceback)

    def __repr__(self) -> str:
        return f"NetworkNamespace({self.name!r})"


__all__ = [
    "CLONE_NEWNET", "NAME_PREFIX", "NETNS_RUN_DIR", "NetworkNamespace", "entered", "host_ip",
    "list_namespaces", "open_connection_in", "require_netns_support", "run_command", "socket_in",
    "unique_name",
]
