"""The embedded MQTT broker (amqtt) a run starts when the scenario names no external broker."""

from __future__ import annotations

import asyncio
import hmac
import importlib.metadata
import logging
import socket
import ssl
from dataclasses import dataclass, field
from functools import partial
from types import TracebackType
from typing import Any, Protocol

from amqtt.broker import Broker
from amqtt.contexts import ListenerType
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session
from testbed.broker_access import BrokerAccess, Identity
from testbed.errors import OrchestrationError


LISTEN_BACKLOG = 4096
"""Pending connections the listener queues (Linux caps it at net.core.somaxconn, 4096 by default). asyncio's
default of 100 overflowed when a thousand devices connected at once, and every dropped SYN cost a device a
1 s retransmission and then a reconnect: a retry storm (issue 13 measured 4,896 listen-queue overflows)."""

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0

AMQTT_RELEASE_CORRECTED = "0.12.1"
"""The amqtt release whose retained-message delivery `_RunBroker` corrects: the override was written against its
source (private methods and fields included), so the embedded broker starts on no other release."""


class BrokerError(OrchestrationError):
    """The broker the run starts (embedded, or a local Mosquitto) could not start."""


class LocalBroker(Protocol):
    """A broker the run starts on this host and owns (EmbeddedBroker, testbed.mosquitto.LocalMosquitto): where it
    listens, what it is (for the console), and the stop and start a `broker_restart` event needs."""

    host: str
    port: int

    @property
    def description(self) -> str: ...

    @property
    def running(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def restart(self, down_s: float) -> None: ...


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


@dataclass
class _AccessConfig:
    """What the access plugins are given (amqtt builds a plugin's Config from plain data)."""

    server: dict[str, str] = field(default_factory=dict)
    devices: dict[str, dict[str, str]] = field(default_factory=dict)


def _access_config(access: BrokerAccess) -> dict[str, Any]:
    def identity(entry: Identity) -> dict[str, str]:
        return {"username": entry.username, "password": entry.password}

    return {"server": identity(access.server),
            "devices": {device_id: identity(entry) for device_id, entry in access.devices.items()}}


def _access_from(config: _AccessConfig) -> BrokerAccess:
    return BrokerAccess(Identity(**config.server), {device_id: Identity(**entry)
                                                    for device_id, entry in config.devices.items()})


class RunAuthPlugin(BaseAuthPlugin):
    """Admits only the run's identities, each with its password; a will must be on a topic it may publish on."""

    Config = _AccessConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.access = _access_from(self.config)
        self.passwords = {entry.username: entry.password.encode("utf-8") for entry in self.access.identities()}

    async def authenticate(self, *, session: Session) -> bool:
        expected = self.passwords.get(session.username or "")
        given = (session.password or "").encode("utf-8")
        if expected is None or not hmac.compare_digest(expected, given):
            return False
        if session.will_flag and not self.access.allows(session.username, "write", session.will_topic or ""):
            return False  # amqtt publishes a will without asking the topic plugins
        return True


class RunTopicPlugin(BaseTopicPlugin):
    """Holds each identity to its topics (testbed.broker_access): publishes are writes, subscriptions reads."""

    Config = _AccessConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.access = _access_from(self.config)

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if session is None or not topic:
            return False
        return self.access.allows(session.username, "write" if action == Action.PUBLISH else "read", topic)


def check_amqtt_release(installed: str) -> None:
    """Refuse an amqtt release other than the one `_RunBroker` corrects (BrokerError says what to install)."""
    if installed != AMQTT_RELEASE_CORRECTED:
        raise BrokerError(f"the embedded broker needs amqtt {AMQTT_RELEASE_CORRECTED} (testbed.broker corrects how "
                          f"that release delivers retained messages), but amqtt {installed} is installed: "
                          f"pip install 'amqtt=={AMQTT_RELEASE_CORRECTED}', or use broker: mosquitto")


def retained_delivery_qos(granted_qos: int, retained_qos: int | None) -> int:
    """QoS of a retained message sent for a subscription: the lower of the two (MQTT 3.1.1 section 3.8.4); a message
    retained without a QoS (amqtt's API allows it) goes at the granted QoS."""
    return granted_qos if retained_qos is None else min(granted_qos, retained_qos)


class _RunBroker(Broker):
    """amqtt's broker with a TCP listener that queues LISTEN_BACKLOG connections instead of asyncio's 100, and that
    sends a client the retained messages of its own subscriptions only, each at the QoS the spec says."""

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        """Send `session` the retained messages matching `subscription`, if the session holds that subscription.

        amqtt 0.12.1 calls this on every CONNECT for every filter any session holds (meaning to resume a persistent
        session's own subscriptions), so a new client received the retained messages of other clients'
        subscriptions, e.g. a device's `.../config` client got every `device/+/status`. It also sent a message
        retained at QoS 0 at the subscription's QoS (`retained.qos or qos`), and at the requested QoS where the
        broker granted less. Here only the session's own subscriptions count, at min(granted, retained) QoS.
        """
        topic_filter, _requested_qos = subscription
        granted_qos = next((qos for holder, qos in self._subscriptions.get(topic_filter, ())
                            if holder.client_id == session.client_id), None)
        handler = self._get_handler(session)
        if granted_qos is None or handler is None:
            return
        matching = [retained for topic, retained in self._retained_messages.items()
                    if self._matches(topic, topic_filter)]
        sends = [asyncio.ensure_future(handler.mqtt_publish(retained.topic, retained.data,
                                                            retained_delivery_qos(granted_qos, retained.qos),
                                                            retain=True))
                 for retained in matching]
        if sends:
            await asyncio.wait(sends)

    async def _create_server_instance(self, listener_name: str, listener_type: ListenerType, address: str | None,
                                      port: int, ssl_context: ssl.SSLContext | None) -> Any:
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port, ssl_context)
        return await asyncio.start_server(partial(self.stream_connected, listener_name=listener_name), address, port,
                                          reuse_address=True, ssl=ssl_context, backlog=LISTEN_BACKLOG)


class EmbeddedBroker:
    """An amqtt broker on 127.0.0.1 (loopback only), owned by an `async with` block.

    Anonymous by default; given the run's identities (`access`) it admits only them, and holds each to
    its own topics when there are device identities.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, access: BrokerAccess | None = None) -> None:
        self.host = host
        self.port = port
        self.access = access
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
        await self.start()
        return self

    async def start(self) -> None:
        """Start amqtt on host:port (again, after `stop`: a restarted broker keeps its address, not its sessions)."""
        if self._broker is not None:
            raise BrokerError("the embedded broker is already running")
        plugins: dict[str, Any] = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        if self.access is not None:
            plugins = {f"{__name__}.RunAuthPlugin": _access_config(self.access),
                       f"{__name__}.RunTopicPlugin": _access_config(self.access)}
        config = {"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}}, "plugins": plugins}
        check_amqtt_release(importlib.metadata.version("amqtt"))
        broker = _RunBroker(config)
        try:
            await asyncio.wait_for(broker.start(), START_TIMEOUT_S)
        except Exception as error:  # amqtt raises its own BrokerError or OSError subclasses
            raise BrokerError(f"embedded MQTT broker failed to start on {self.host}:{self.port}: {error}") from error
        self._broker = broker

    async def stop(self) -> None:
        """Stop amqtt: every client's connection drops (a broker restart's first half; `start` is the second)."""
        if self._broker is None:
            return
        # Clients that left without DISCONNECT (cancelled devices) make amqtt log one error per
        # message still awaiting its PUBACK while it shuts down; they say nothing about the run.
        broker_logger = logging.getLogger("amqtt")
        broker_logger.setLevel(logging.CRITICAL)
        try:
            await asyncio.wait_for(self._broker.shutdown(), STOP_TIMEOUT_S)
        finally:
            broker_logger.setLevel(logging.ERROR)
            self._broker = None

    @property
    def description(self) -> str:
        return "embedded amqtt"

    @property
    def running(self) -> bool:
        return self._broker is not None

    async def restart(self, down_s: float) -> None:
        """Stop the broker, wait `down_s`, start it again on the same host and port."""
        await self.stop()
        await asyncio.sleep(down_s)
        await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
