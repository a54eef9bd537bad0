"""The embedded MQTT broker (amqtt) a run starts when the scenario names no external broker."""

from __future__ import annotations

import logging
import socket
from types import TracebackType

from amqtt.broker import Broker
from testbed.errors import OrchestrationError


class BrokerError(OrchestrationError):
    """The embedded broker could not start."""


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class _PubackTimeoutFilter(logging.Filter):
    """Drops amqtt's report of a QoS 1 PUBACK that took longer than its fixed 5 s.

    On an emulated slow link a device's PUBACKs wait behind the chunks in the link's queue, so they
    often take longer; amqtt then stops waiting (the message was already written and TCP delivers
    it), and logs an error with a traceback per message. That says nothing about the run.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, TimeoutError) and "PUBACK" in str(error))


class EmbeddedBroker:
    """An amqtt broker on 127.0.0.1 (anonymous, loopback only), owned by an `async with` block."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

    async def __aenter__(self) -> EmbeddedBroker:
        # amqtt logs routine protocol events (e.g. a duplicate PUBACK after a retransmission) as warnings.
        for logger_name in ("amqtt", "transitions"):
            logging.getLogger(logger_name).setLevel(logging.ERROR)
        broker_logger = logging.getLogger("amqtt.broker")
        if not any(isinstance(f, _PubackTimeoutFilter) for f in broker_logger.filters):
            broker_logger.addFilter(_PubackTimeoutFilter())
        if self.port == 0:
            self.port = free_tcp_port(self.host)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        try:
            await self._broker.start()
        except Exception as error:  # amqtt raises its own BrokerError or OSError subclasses
            raise BrokerError(f"embedded MQTT broker failed to start on {self.host}:{self.port}: {error}") from error
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            # Clients that left without DISCONNECT (cancelled devices) make amqtt log one error per
            # message still awaiting its PUBACK while it shuts down; they say nothing about the run.
            broker_logger = logging.getLogger("amqtt")
            broker_logger.setLevel(logging.CRITICAL)
            try:
                await self._broker.shutdown()
            finally:
                broker_logger.setLevel(logging.ERROR)
                self._broker = None
