"""TCP relays that let an unmodified client in this process cross a namespace link to a broker on 127.0.0.1.

The packet-level backends (``tun``, ``netem``) put the emulated link between two network
namespaces, but paho/aiomqtt have no socket-factory hook. ``NamespaceRelays`` bridges that with
two splicing hops, both on unshaped paths (a user-space copy each, tens of microseconds)::

    client ──► 127.0.0.1:relay ═(outbound socket lives in the device namespace)═► link ═►
        forwarder on host_address (listening in the host-side namespace) ──► broker upstream_host:port

* ``TcpRelay`` accepts on ``(host, port 0)`` — optionally with its listening socket created inside a
  namespace — and splices each connection to the streams a ``Connector`` returns.
* ``NamespaceRelays`` owns one forwarder and one relay for a link; ``address`` is the relay,
  ``broker_address`` the forwarder as seen from the device namespace.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable

from channel.errors import ChannelError
from channel.netns import NetworkNamespace, open_connection_in, socket_in
from channel.proxy import wait_within

logger = logging.getLogger("channel.relay")

RELAY_CHUNK_BYTES = 65536
LISTEN_BACKLOG = 128

Connector = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class TcpRelay:
    """Accepts on ``(host, 0)`` (in ``namespace`` if given) and splices each connection to ``connect()``'s streams.

    Errors of a connection are counted in ``errors`` and kept in ``last_error`` (and logged), never raised
    from the background task.
    """

    def __init__(self, name: str, host: str, connect: Connector, write_timeout_s: float,
                 namespace: NetworkNamespace | None = None) -> None:
        self.name = name
        self.host = host
        self.namespace = namespace
        self._connect = connect
        self._write_timeout_s = write_timeout_s
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.connections = 0
        self.errors = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        try:
            if self.namespace is None:
                self._server = await asyncio.start_server(self._accept, self.host, 0)
            else:
                self._server = await asyncio.start_server(self._accept, sock=self._listening_socket())
        except OSError as error:
            where = f" in namespace {self.namespace.name!r}" if self.namespace is not None else ""
            raise ChannelError(f"{self.name}: cannot listen on {self.host}{where}: {error}") from error
        self.port = self._server.sockets[0].getsockname()[1]

    def _listening_socket(self) -> socket.socket:
        assert self.namespace is not None
        sock = socket_in(self.namespace, socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, 0))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        return sock

    async def close(self, timeout_s: float) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout_s)
            except asyncio.TimeoutError:
                logger.warning("%s: server did not close within %g s", self.name, timeout_s)

    def _record_error(self, what: str, error: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{what}: {type(error).__name__}: {error}"
        logger.warning("%s: %s", self.name, self.last_error)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                out_reader, out_writer = await self._connect()
            except (ChannelError, OSError, asyncio.TimeoutError) as error:
                self._record_error("cannot connect onward", error)
                return
            try:
                await asyncio.gather(self._copy(reader, out_writer), self._copy(out_reader, writer))
            finally:
                out_writer.close()
        except asyncio.CancelledError:
            pass
        except Exception as error:  # a background task must not fail silently
            self._record_error("relaying failed", error)
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _copy(self, source: asyncio.StreamReader, destination: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(RELAY_CHUNK_BYTES):
                destination.write(data)
                await wait_within(destination.drain(), self._write_timeout_s)  # never swallows a cancel
            if destination.can_write_eof():
                destination.write_eof()
        except (ConnectionError, asyncio.TimeoutError) as error:
            logger.info("%s: a side went away: %r", self.name, error)
            destination.close()


class NamespaceRelays:
    """The forwarder (``host_address`` → upstream broker) and the 127.0.0.1 relay (→ device namespace → forwarder).

    ``host_namespace`` is where the forwarder listens (None: this process's namespace, e.g. a host-side
    TUN); its outbound connections to ``upstream_host:upstream_port`` are made from this process's own
    namespace, where the broker runs. The relay's outbound sockets are created inside ``device_namespace``.
    """

    def __init__(self, name: str, upstream_host: str, upstream_port: int, host_address: str,
                 device_namespace: NetworkNamespace, host_namespace: NetworkNamespace | None = None,
                 connect_timeout_s: float = 5.0, write_timeout_s: float = 60.0) -> None:
        self.name = name
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host_address = host_address
        self.device_namespace = device_namespace
        self.host_namespace = host_namespace
        self.connect_timeout_s = connect_timeout_s
        self.write_timeout_s = write_timeout_s
        self.forwarder: TcpRelay | None = None
        self.relay: TcpRelay | None = None

    @property
    def broker_address(self) -> tuple[str, int]:
        """(host_address, port) reaching the broker from inside ``device_namespace``, through the link."""
        if self.forwarder is None:
            raise ChannelError(f"link {self.name!r} is not running: use it inside 'async with'")
        return self.host_address, self.forwarder.port

    @property
    def address(self) -> tuple[str, int]:
        """(127.0.0.1, port) of the relay: connect here from this process's namespace to cross the link."""
        if self.relay is None:
            raise ChannelError(f"link {self.name!r} is not running: use it inside 'async with'")
        return "127.0.0.1", self.relay.port

    async def open_device_connection(
        self, timeout_s: float | None = None,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection from inside ``device_namespace`` to the broker, through the link."""
        host, port = self.broker_address
        return await open_connection_in(self.device_namespace, host, port,
                                        self.connect_timeout_s if timeout_s is None else timeout_s)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await wait_within(asyncio.open_connection(self.upstream_host, self.upstream_port),
                                 self.connect_timeout_s)

    async def start(self) -> None:
        """Listen with both hops (close() undoes a half-done start)."""
        self.forwarder = TcpRelay(f"{self.name} forwarder", self.host_address, self._connect_upstream,
                                  self.write_timeout_s, self.host_namespace)
        await self.forwarder.start()
        self.relay = TcpRelay(f"{self.name} relay", "127.0.0.1", self.open_device_connection, self.write_timeout_s)
        await self.relay.start()

    async def close(self) -> None:
        """Stop accepting and cancel every relayed connection (relay first, then forwarder)."""
        try:
            for hop in (self.relay, self.forwarder):
                if hop is not None:
                    await hop.close(self.write_timeout_s)
        finally:
            self.relay = self.forwarder = None


__all__ = ["RELAY_CHUNK_BYTES", "Connector", "NamespaceRelays", "TcpRelay"]


class RelayedLink:
    """What a run uses of a link whose device side lives in a network namespace (tun, netem):
    the relay address devices connect to, and the forwarder address inside the namespace."""

    name: str
    _relays: NamespaceRelays | None

    def _not_running_hint(self) -> str:
        """Extra advice for the not-running error (a subclass may know why it has no relays)."""
        return ""

    @property
    def address(self) -> tuple[str, int]:
        """(127.0.0.1, port) of the relay: connect here from this process's namespace to cross the link."""
        return self._running_relays().address

    @property
    def broker_address(self) -> tuple[str, int]:
        """(host_address, port) of the forwarder: where a program in the device namespace reaches the broker."""
        return self._running_relays().broker_address

    async def open_device_connection(
        self, timeout_s: float | None = None,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection from inside the device namespace to the broker, through the link."""
        return await self._running_relays().open_device_connection(timeout_s)

    def _running_relays(self) -> NamespaceRelays:
        if self._relays is None or self._relays.relay is None:
            raise ChannelError(f"{type(self).__name__} {self.name!r} is not running: use it inside "
                               f"'async with'{self._not_running_hint()}")
        return self._relays

