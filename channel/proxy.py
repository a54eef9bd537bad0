"""Asyncio TCP proxy that carries each direction of a connection through a seeded LinkModel."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Protocol, TypeVar

import numpy as np

from channel.backend import LinkRequest
from channel.errors import ChannelError
from testbed.core.plugins import register_link_backend
from channel.link import LinkCounters, LinkModel, LinkParameters
from channel.shared import SharedFlow
from channel.timing import LatenessSketch

logger = logging.getLogger("channel.proxy")

READ_CHUNK_BYTES = 65536
UNLIMITED_RATE_WINDOW_BYTES = 4 * 1024 * 1024
# The event loop's epoll waits in whole milliseconds, rounded up, so a timer fires 0-1 ms late;
# releasing what is due within half a millisecond centres the error on the modelled time.
TIMER_SLACK_S = 0.0005

T = TypeVar("T")


async def wait_within(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``await awaitable``, raising ``asyncio.TimeoutError`` after ``timeout_s``; a cancellation always propagates.

    Not ``asyncio.wait_for``: before Python 3.12 it returns the result when its caller is cancelled
    just as the awaited work completes, swallowing the cancellation. A pump loop cancelled that way
    at a drain ran on and then waited, with no timer pending, for data its cancelled reader would
    never queue: the proxy's ``aclose`` hung.
    """
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait([task], timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieve_outcome)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve_outcome)
        raise asyncio.TimeoutError(f"not done within {timeout_s} s")
    return task.result()


def _retrieve_outcome(task: asyncio.Future[object]) -> None:
    """Mark an abandoned task's outcome as seen; a stream it opened after all is closed."""
    if task.cancelled() or task.exception() is not None:
        return
    result = task.result()
    if isinstance(result, tuple) and result and isinstance(result[-1], asyncio.StreamWriter):
        result[-1].close()  # an open_connection that completed after its caller gave up


class LinkDirectionModel(Protocol):
    """What the proxy needs of one direction's model: ``LinkModel``, or a ``channel.shared.SharedFlow``."""

    @property
    def params(self) -> LinkParameters: ...

    @property
    def counters(self) -> LinkCounters: ...

    def transmit(self, now_s: float, size_bytes: int) -> float: ...

    def outage_at(self, t: float) -> tuple[float, float] | None: ...

    def new_stream(self, now_s: float) -> None: ...


class DeliverySchedule:
    """Pairs one direction model's delivery decisions with the segments awaiting them, over all connections.

    A ``LinkModel`` or a cell's ``SharedFlow`` decides a segment behind a loss later (``send``/``decide``: fast
    recovery), and its decisions come in send order; any other model decides each segment at once.
    """

    def __init__(self, model: LinkDirectionModel) -> None:
        self.model = model
        self._link = model if isinstance(model, (LinkModel, SharedFlow)) else None
        self.waiting: collections.deque[tuple[_Direction, bytes]] = collections.deque()

    @property
    def next_decision_s(self) -> float | None:
        """When time alone decides the oldest waiting segment (a tail loss's RTO), or None."""
        return None if self._link is None else self._link.next_decision_s

    def send(self, direction: _Direction, now_s: float, segment: bytes) -> None:
        """Hand ``segment`` of ``direction`` to the model at ``now_s``; queue what that decided."""
        if self._link is None:
            direction.queue.append((self.model.transmit(now_s, len(segment)), segment))
            return
        direction.undecided += 1
        self.waiting.append((direction, segment))
        self._hand_out(self._link.send(now_s, len(segment)))

    def decide(self, now_s: float) -> None:
        """Time has reached ``now_s``: queue the segments it decided (tail losses resent by RTO)."""
        if self._link is not None:
            self._hand_out(self._link.decide(now_s))

    def new_stream(self, now_s: float) -> None:
        """A new TCP connection: the model starts a new stream and the old one's waiting segments are dropped."""
        self.model.new_stream(now_s)
        for direction, _ in self.waiting:
            direction.undecided = 0
        self.waiting.clear()

    def _hand_out(self, deliveries: list[float]) -> None:
        woken = set()
        waiting = self.waiting
        for delivery in deliveries:
            direction, segment = waiting.popleft()
            direction.undecided -= 1
            direction.queue.append((delivery, segment))
            woken.add(direction)
        for direction in woken:
            direction.wake()


def undelivered_limit_bytes(params: LinkParameters, max_in_flight_bytes: int) -> int:
    """Bytes a direction may hold before it stops reading its source.

    ``max_in_flight_bytes`` waiting to be sent plus what the link itself holds in flight
    (rate × (delay + jitter)), so that a long delay does not cap throughput below the rate; with fast
    recovery also what arrives behind a lost segment while its duplicate ACKs go back and its
    retransmission comes (rate × 2 (delay + jitter) more), as a SACK sender's window and the
    receiver's buffer hold it. An unlimited-rate link may hold ``UNLIMITED_RATE_WINDOW_BYTES`` in flight.
    """
    if params.rate_bps is None:
        return max_in_flight_bytes + UNLIMITED_RATE_WINDOW_BYTES
    round_trips = 3 if params.recovery == "fast" else 1
    in_flight = params.rate_bps / 8.0 * round_trips * (params.delay_s + params.jitter_s)
    return max_in_flight_bytes + int(in_flight) + 1


class _StallTimer:
    """Bounds a direction's waits for its destination with one timer, re-armed at most once per ``timeout_s``.

    ``begin``/``end`` bracket each wait; ``on_timeout`` runs once a single wait has lasted ``timeout_s``.
    A wait that ends leaves the timer armed: when it fires it re-arms for the wait in progress, if any.
    """

    def __init__(self, timeout_s: float, on_timeout: Callable[[], None]) -> None:
        self.timeout_s = timeout_s
        self.on_timeout = on_timeout
        self._waiting_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def begin(self) -> None:
        loop = asyncio.get_running_loop()
        self._waiting_since = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._waiting_since + self.timeout_s, self._check)

    def end(self) -> None:
        self._waiting_since = None

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        if self._waiting_since is None:
            return
        deadline = self._waiting_since + self.timeout_s
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline - TIMER_SLACK_S:
            self._waiting_since = None
            self.on_timeout()
        else:
            self._timer = loop.call_at(deadline, self._check)


class _Direction:
    """Moves bytes from one stream to another, each segment released at its modelled delivery time."""

    def __init__(
        self,
        label: str,
        source: asyncio.StreamReader,
        destination: asyncio.StreamWriter,
        model: LinkDirectionModel,
        proxy: LinkProxy,
        closing: asyncio.Event,
    ) -> None:
        self.label = label
        self.source = source
        self.destination = destination
        self.model = model
        self.proxy = proxy
        self.closing = closing
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()  # decided (delivery time, segment)
        self.undecided = 0  # segments handed to the model whose delivery is not decided yet (behind a loss)
        self.schedule = proxy.schedule_of(model)
        self.in_flight_bytes = 0
        self.finished = False
        self.destination_gone = False
        self._queued = asyncio.Event()
        self._room = asyncio.Event()
        self._stall = _StallTimer(proxy.write_timeout_s, self._write_timed_out)

    def finish(self) -> None:
        """No more data will be read: the writer exits once every segment is decided and released."""
        self.finished = True
        self._queued.set()

    def wake(self) -> None:
        """Segments were queued: the writer looks again."""
        self._queued.set()

    async def read_loop(self) -> None:
        """Read from the source, schedule every MSS segment, queue it; return at EOF."""
        loop = asyncio.get_running_loop()
        mss = self.model.params.mss_bytes
        limit = undelivered_limit_bytes(self.model.params, self.proxy.max_in_flight_bytes)
        send = self.schedule.send
        while True:
            while self.in_flight_bytes >= limit:
                self._room.clear()
                await self._room.wait()
            data = await self.source.read(READ_CHUNK_BYTES)
            if not data:
                return
            now = loop.time()
            self.in_flight_bytes += len(data)
            for offset in range(0, len(data), mss):
                send(self, now, data[offset:offset + mss])
            self._queued.set()

    async def write_loop(self) -> None:
        """Release queued segments at their delivery times; after ``finish``, drain and return.

        While only undecided segments are left, wait for the reader's next segments or the model's next
        decision (a tail loss's RTO), whichever comes first. Each segment's lateness (release time − modelled
        delivery time) goes into the proxy's ``lateness``.
        """
        loop = asyncio.get_running_loop()
        queue = self.queue
        lateness = self.proxy.lateness
        try:
            while True:
                if not queue:
                    if self.finished and not self.undecided:
                        return
                    self._queued.clear()
                    decision_s = self.schedule.next_decision_s if self.undecided else None
                    timer = None if decision_s is None else loop.call_at(decision_s, self._queued.set)
                    try:
                        await self._queued.wait()
                    finally:
                        if timer is not None:
                            timer.cancel()
                    if self.undecided:
                        self.schedule.decide(loop.time() + TIMER_SLACK_S)
                    continue
                wait_s = queue[0][0] - TIMER_SLACK_S - loop.time()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                now = loop.time()
                batch: list[bytes] = []
                while queue and queue[0][0] <= now + TIMER_SLACK_S:
                    due, segment = queue.popleft()
                    lateness.add(now - due)
                    batch.append(segment)
                if batch:
                    await self._deliver(b"".join(batch) if len(batch) > 1 else batch[0])
        finally:
            self._stall.cancel()

    async def _deliver(self, data: bytes) -> None:
        """Hand ``data`` to the destination's transport; wait only while its buffer is above the high-water mark.

        No task or timer per segment: the one stall timer of this direction bounds such a wait.
        """
        try:
            if self.dropped_as_gone(data):
                return
            self.destination.write(data)
            transport = self.destination.transport
            if transport.get_write_buffer_size() > transport.get_write_buffer_limits()[1]:
                self.proxy.write_waits += 1
                self._stall.begin()
                try:
                    await self.destination.drain()
                finally:
                    self._stall.end()
        except ConnectionError as error:
            self.proxy.dropped_bytes += len(data)
            self._mark_gone(f"{type(error).__name__}: {error}")
        finally:
            self.in_flight_bytes -= len(data)
            self._room.set()

    def dropped_as_gone(self, data: bytes) -> bool:
        """Whether the destination is gone (or closing); its ``data`` are then counted as dropped."""
        if not self.destination_gone and not self.destination.is_closing():
            return False
        if not self.destination_gone:
            self._mark_gone("destination closed")
        self.proxy.dropped_bytes += len(data)
        return True

    def _write_timed_out(self) -> None:
        """The destination took nothing for ``write_timeout_s``: drop it (its bytes with it) and end the connection."""
        transport = self.destination.transport
        self.proxy.dropped_bytes += transport.get_write_buffer_size()
        self.proxy._record_error(f"{self.label} destination did not take data for {self.proxy.write_timeout_s} s",
                                 asyncio.TimeoutError("write timed out"))
        self._mark_gone("write timed out")
        transport.abort()  # wakes the waiting drain

    def _mark_gone(self, reason: str) -> None:
        self.destination_gone = True
        self.proxy.connection_resets += 1
        logger.info("%s %s: destination gone (%s); dropping its queued bytes",
                    self.proxy.name, self.label, reason)
        self.closing.set()


def _direction_model(label: str, params: LinkParameters | None, model: LinkDirectionModel | None,
                     seed: int | None, stream: int) -> LinkDirectionModel:
    """The given model, or a LinkModel of ``params`` seeded from ``[seed, stream]``."""
    if model is not None:
        if params is not None:
            raise ChannelError(f"LinkProxy: give {label} or {label}_model, not both")
        return model
    if params is None:
        raise ChannelError(f"LinkProxy: give the {label} parameters (or a {label}_model)")
    if seed is None:
        raise ChannelError(f"LinkProxy: a seed is needed to build the {label} model")
    return LinkModel(params, np.random.default_rng([seed, stream]))


async def _close_writer(writer: asyncio.StreamWriter, proxy: LinkProxy) -> None:
    """Close a stream, waiting a bounded time; a failure to close cleanly is logged and counted.

    While the proxy exits, bytes its peer has not taken are dropped (the stream is reset), not waited for.
    """
    writer.close()
    if proxy._closing and writer.transport.get_write_buffer_size() > 0:
        writer.transport.abort()
    try:
        await wait_within(writer.wait_closed(), proxy.write_timeout_s)
    except (OSError, asyncio.TimeoutError) as error:
        proxy.close_errors += 1
        logger.info("%s: closing a stream failed: %r", proxy.name, error)


async def _stop(tasks: list[asyncio.Task[None]], proxy: LinkProxy, what: str) -> None:
    """Cancel tasks, await them, and log/count any failure other than cancellation."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            proxy._record_error(f"{what} failed", result)


class LinkProxy:
    """TCP proxy emulating a link: ``async with LinkProxy(host, port, downlink, uplink, seed) as p``.

    ``downlink`` shapes bytes upstream → client (broker → device), ``uplink`` client → upstream.
    One LinkModel per direction (seeded from ``seed``), shared by all connections and kept across
    reconnections. Instead of parameters, a direction may be given a ready model
    (``downlink_model=``/``uplink_model=``, e.g. a ``SharedFlow`` of a cell's ``SharedLink``); its
    ``params`` then describe that direction, and ``seed`` is needed only for a direction built here.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        downlink: LinkParameters | None = None,
        uplink: LinkParameters | None = None,
        seed: int | None = None,
        name: str = "link",
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        max_in_flight_bytes: int = 64 * 1024,
        connect_timeout_s: float = 5.0,
        write_timeout_s: float = 30.0,
        outage_reset_after_s: float | None = 10.0,
        downlink_model: LinkDirectionModel | None = None,
        uplink_model: LinkDirectionModel | None = None,
    ) -> None:
        self.downlink_model = _direction_model("downlink", downlink, downlink_model, seed, 0)
        self.uplink_model = _direction_model("uplink", uplink, uplink_model, seed, 1)
        if max_in_flight_bytes <= 0:
            raise ChannelError(f"max_in_flight_bytes={max_in_flight_bytes!r} is invalid: expected > 0")
        if connect_timeout_s <= 0 or write_timeout_s <= 0:
            raise ChannelError(
                f"timeouts must be > 0 (connect_timeout_s={connect_timeout_s!r}, "
                f"write_timeout_s={write_timeout_s!r})"
            )
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.seed = seed
        self.name = name
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.max_in_flight_bytes = max_in_flight_bytes
        self.connect_timeout_s = connect_timeout_s
        self.write_timeout_s = write_timeout_s
        if outage_reset_after_s is not None and outage_reset_after_s <= 0:
            raise ChannelError(f"outage_reset_after_s={outage_reset_after_s!r} is invalid: expected > 0 or None")
        self.outage_reset_after_s = outage_reset_after_s
        self.outage_resets = 0
        self.refused_during_outage = 0
        self._outage_watch: asyncio.Task[None] | None = None
        self._partitioned_until = float("-inf")  # loop time until which new connections are refused (partition)
        self.partitions = 0
        self.connections_accepted = 0
        self.errors = 0
        self.last_error: str | None = None
        self.dropped_bytes = 0
        self.connection_resets = 0
        self.close_errors = 0
        self.write_waits = 0  # writes that waited for a destination not keeping up (buffer above its high-water mark)
        self.lateness = LatenessSketch()
        """Every segment's release time minus its modelled delivery time, both directions (see ``timing_stats``)."""
        self._server: asyncio.Server | None = None  # set while running
        self._connection_tasks: set[asyncio.Task[None]] = set()
        self._callback_tasks: set[asyncio.Task[object]] = set()
        self._closing = False
        self.port: int | None = None
        self._schedules = {id(model): DeliverySchedule(model) for model in (self.downlink_model, self.uplink_model)}

    def schedule_of(self, model: LinkDirectionModel) -> DeliverySchedule:
        """The delivery schedule of one of this proxy's direction models."""
        return self._schedules[id(model)]

    @property
    def downlink(self) -> LinkParameters:
        """The upstream → client direction's parameters now (a cell's: its shared link's)."""
        return self.downlink_model.params

    @property
    def uplink(self) -> LinkParameters:
        """The client → upstream direction's parameters now."""
        return self.uplink_model.params

    @property
    def downlink_counters(self) -> LinkCounters:
        """Counters of the upstream → client model."""
        return self.downlink_model.counters

    @property
    def uplink_counters(self) -> LinkCounters:
        """Counters of the client → upstream model."""
        return self.uplink_model.counters

    def timing_stats(self) -> LatenessSketch:
        """How late this link has released its segments against the model's schedule, so far (a copy)."""
        return self.lateness.copy()

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) the proxy listens on; valid inside ``async with``."""
        if self.port is None:
            raise ChannelError(f"LinkProxy {self.name!r} is not running: use it inside 'async with'")
        return self.listen_host, self.port

    @property
    def active_connections(self) -> int:
        """Client connections currently being served."""
        return len(self._connection_tasks)

    async def __aenter__(self) -> LinkProxy:
        self._closing = False
        try:
            self._server = await asyncio.start_server(
                self._serve_client, self.listen_host, self.listen_port
            )
        except OSError as error:
            raise ChannelError(
                f"LinkProxy {self.name!r} cannot listen on {self.listen_host}:{self.listen_port}: {error}"
            ) from error
        self.port = self._server.sockets[0].getsockname()[1]
        if self.outage_reset_after_s is not None and any(
            params.outages or params.random_outages is not None for params in (self.downlink, self.uplink)
        ):
            self._outage_watch = asyncio.create_task(self._watch_outages(), name=f"{self.name}-outages")
        logger.info("%s: listening on %s:%d → %s:%d (down: %s; up: %s)", self.name,
                    self.listen_host, self.port, self.upstream_host, self.upstream_port,
                    self.downlink.description, self.uplink.description)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop listening and cancel every connection; returns when no task is left."""
        self._closing = True
        if self._outage_watch is not None:
            await _stop([self._outage_watch], self, "outage watch")
            self._outage_watch = None
        server, self._server = self._server, None
        if server is not None:
            server.close()
        await _stop(list(self._connection_tasks), self, "connection")
        if self._callback_tasks:  # they return as soon as their connection task is done
            _, pending = await asyncio.wait(list(self._callback_tasks), timeout=self.write_timeout_s)
            if pending:
                self._record_error("connection callbacks did not finish",
                                   ChannelError(f"{len(pending)} still running"))
        if server is not None:
            try:
                await wait_within(server.wait_closed(), self.write_timeout_s)
            except asyncio.TimeoutError as error:
                self._record_error("server did not close in time", error)
        self.port = None

    def long_outage_at(self, now_s: float) -> tuple[float, float] | None:
        """The outage (either direction) that has lasted `outage_reset_after_s` at `now_s`, if any."""
        if self.outage_reset_after_s is None:
            return None
        for model in (self.downlink_model, self.uplink_model):
            window = model.outage_at(now_s)
            if window is not None and now_s - window[0] >= self.outage_reset_after_s:
                return window
        return None

    def add_outage(self, duration_s: float, downlink: bool = True, uplink: bool = True) -> None:
        """Take the link down from now for ``duration_s`` (one direction or both), as a scheduled outage would;
        one longer than ``outage_reset_after_s`` resets the connections. On a cell's shared flow only this device's
        flow goes down. ChannelError if a direction's model cannot take an outage."""
        now = asyncio.get_running_loop().time()
        models = [model for model, chosen in ((self.downlink_model, downlink), (self.uplink_model, uplink)) if chosen]
        for model in models:
            if not isinstance(model, (LinkModel, SharedFlow)):
                raise ChannelError(f"{self.name}: a {type(model).__name__} link cannot take an outage at run time")
        for model in models:
            model.add_outage(now, now + duration_s)
        self.watch_outages()

    def watch_outages(self) -> None:
        """From now on, reset the connections once an outage of either direction has lasted ``outage_reset_after_s``
        (an outage added at run time, here or on a cell's shared link); nothing if that is off or already watched."""
        if self.outage_reset_after_s is not None and self._outage_watch is None and not self._closing:
            self._outage_watch = asyncio.create_task(self._watch_outages(), name=f"{self.name}-outages")

    def reconfigure(self, downlink: LinkParameters | None = None, uplink: LinkParameters | None = None) -> None:
        """From now on, carry a direction given with its new parameters (LinkModel.reconfigure); ChannelError if
        its model (e.g. a cell's shared flow) cannot be changed."""
        now = asyncio.get_running_loop().time()
        changes = [(model, params) for model, params in ((self.downlink_model, downlink), (self.uplink_model, uplink))
                   if params is not None]
        for model, _ in changes:
            if not isinstance(model, LinkModel):
                raise ChannelError(f"{self.name}: a {type(model).__name__} link cannot be changed at run time")
        for model, params in changes:
            assert isinstance(model, LinkModel)
            model.reconfigure(params, now)
        if any(params.outages or params.random_outages is not None for params in (self.downlink, self.uplink)):
            self.watch_outages()

    async def partition(self, duration_s: float) -> None:
        """Cut the device off for ``duration_s``: every connection is reset now and new ones are refused until then."""
        if not duration_s > 0:
            raise ChannelError(f"{self.name}: partition duration {duration_s!r} is invalid: expected > 0 seconds")
        self._partitioned_until = asyncio.get_running_loop().time() + duration_s
        self.partitions += 1
        logger.info("%s: partitioned for %.1f s; resetting %d connection(s)", self.name, duration_s,
                    len(self._connection_tasks))
        await _stop(list(self._connection_tasks), self, "connection")

    async def _watch_outages(self) -> None:
        """Reset every connection once an outage has lasted the threshold, as a real link's peers would
        time out; until it ends, new connections are closed at once (see `_serve_client`)."""
        loop = asyncio.get_running_loop()
        assert self.outage_reset_after_s is not None
        period = min(1.0, self.outage_reset_after_s / 4)
        while True:
            window = self.long_outage_at(loop.time())
            if window is not None and self._connection_tasks:
                self.outage_resets += 1
                logger.info("%s: outage of %.1f s; resetting %d connection(s)", self.name,
                            window[1] - window[0], len(self._connection_tasks))
                await _stop(list(self._connection_tasks), self, "connection")
            await asyncio.sleep(period)

    def _record_error(self, what: str, error: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{what}: {type(error).__name__}: {error}"
        if isinstance(error, (OSError, asyncio.TimeoutError)):  # the network's or the broker's doing: one line
            logger.warning("%s: %s", self.name, self.last_error)
        else:
            logger.error("%s: %s", self.name, self.last_error, exc_info=error)

    async def _serve_client(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        # asyncio owns this callback's task and mishandles its cancellation on some Python
        # versions, so the connection runs in a task of our own that ``aclose`` cancels.
        self.connections_accepted += 1
        if self._closing:  # accepted just as the proxy was shutting down
            await _close_writer(client_writer, self)
            return
        now = asyncio.get_running_loop().time()
        if self.long_outage_at(now) is not None or now < self._partitioned_until:
            # Reset (RST), as a connection attempt into a dead link ends for the client: a plain close
            # (FIN) leaves some MQTT clients waiting for their CONNACK until they time out.
            self.refused_during_outage += 1
            client_writer.transport.abort()
            return
        callback_task = asyncio.current_task()
        assert callback_task is not None
        self._callback_tasks.add(callback_task)
        task = asyncio.create_task(self._serve_connection(client_reader, client_writer))
        self._connection_tasks.add(task)
        task.add_done_callback(self._connection_tasks.discard)
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._callback_tasks.discard(callback_task)

    async def _serve_connection(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        if len(self._connection_tasks) <= 1:  # the only connection: a new TCP stream on the link
            now = asyncio.get_running_loop().time()
            for schedule in self._schedules.values():
                schedule.new_stream(now)
        try:
            try:
                upstream_reader, upstream_writer = await wait_within(
                    asyncio.open_connection(self.upstream_host, self.upstream_port),
                    self.connect_timeout_s,
                )
            except (OSError, asyncio.TimeoutError) as error:
                self._record_error(
                    f"cannot connect to upstream {self.upstream_host}:{self.upstream_port}", error
                )
                return
            try:
                await self._pump(client_reader, client_writer, upstream_reader, upstream_writer)
            finally:
                await _close_writer(upstream_writer, self)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a background task must not fail silently
            self._record_error("connection failed", error)
        finally:
            await _close_writer(client_writer, self)

    async def _pump(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream_reader: asyncio.StreamReader,
        upstream_writer: asyncio.StreamWriter,
    ) -> None:
        closing = asyncio.Event()
        down = _Direction("downlink", upstream_reader, client_writer, self.downlink_model, self, closing)
        up = _Direction("uplink", client_reader, upstream_writer, self.uplink_model, self, closing)
        readers = [asyncio.create_task(down.read_loop()), asyncio.create_task(up.read_loop())]
        writers = [asyncio.create_task(down.write_loop()), asyncio.create_task(up.write_loop())]
        closing_waiter = asyncio.create_task(closing.wait())
        try:
            await asyncio.wait([*readers, closing_waiter], return_when=asyncio.FIRST_COMPLETED)
            # One side closed (or a destination vanished): stop reading, flush what is queued.
            for task in readers:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    self._record_read_failure(task.exception())
            await _stop([task for task in readers if not task.done()], self, "reader")
            down.finish()
            up.finish()
            for result in await asyncio.gather(*writers, return_exceptions=True):
                if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                    self._record_error("writing failed", result)
        finally:
            await _stop([task for task in (*readers, *writers, closing_waiter) if not task.done()],
                        self, "pump")

    def _record_read_failure(self, error: BaseException) -> None:
        if isinstance(error, ConnectionError):
            self.connection_resets += 1
            logger.info("%s: a side reset the connection: %r", self.name, error)
        else:
            self._record_error("reading failed", error)


@register_link_backend("proxy", packet_level=False, shared_cells=True)
def open_proxy_link(request: LinkRequest) -> LinkProxy:
    """The user-space TCP proxy (any OS, unprivileged): the default backend."""
    return LinkProxy(request.upstream_host, request.upstream_port, downlink=request.downlink, uplink=request.uplink,
                     seed=request.seed, name=request.name, outage_reset_after_s=request.reset_after_s)
