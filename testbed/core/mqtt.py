"""Where and how to reach the MQTT broker: one endpoint type and the aiomqtt client built from it."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import NoReturn

import aiomqtt

from testbed.core.backoff import client_backoff
from testbed.core.scenario import BrokerSpec
from testbed.core.errors import TestbedError

logger = logging.getLogger("testbed.mqtt")

MQTT_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
CLEANUP_TIMEOUT_S = 1.0


# CONNACK codes refusing the credentials: MQTT 3.1.1's 4 and 5, MQTT 5's 134 and 135 (paho reports 3.1.1's as 5's).
CREDENTIALS_REFUSED_CODES = frozenset({4, 5, 134, 135})
SERVER_CREDENTIALS_FIELDS = "broker.username / broker.password"


class BrokerConnectionError(TestbedError):
    """The broker could not be reached, refused the credentials, or failed the TLS handshake."""

    def __init__(self, address: str, reason: str, credentials_refused: bool = False) -> None:
        super().__init__(f"cannot connect to broker {address}: {reason}")
        self.address = address
        self.reason = reason
        self.credentials_refused = credentials_refused


def credentials_refused(error: aiomqtt.MqttError) -> bool:
    """Whether a failed connect was the broker refusing the username or password (not the network or TLS)."""
    code = getattr(error, "rc", None)
    return isinstance(error, aiomqtt.MqttCodeError) and getattr(code, "value", code) in CREDENTIALS_REFUSED_CODES


def connect_failure_reason(error: aiomqtt.MqttError, timeout_s: float,
                           credentials_fields: str = SERVER_CREDENTIALS_FIELDS) -> str:
    """What a failed connect means, in words that say what to check (`credentials_fields`: where they come from)."""
    text = str(error)
    if isinstance(error, aiomqtt.MqttCodeError):
        # A negative CONNACK: "Not authorised", "Bad username or password", ...
        return f"{text.lower()} (check {credentials_fields})"
    if "mismatch" in text and ("CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text):
        return f"TLS {text} (connect by a host name the broker's certificate lists)"
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return f"TLS {text} (check broker.tls.ca_file)"
    if text == "Operation timed out":
        return (f"no CONNACK within {timeout_s:g} s (a TLS listener needs mqtts:// or a broker.tls section; "
                "a plain one needs mqtt://)")
    return text


@dataclass(frozen=True)
class MqttEndpoint:
    """A broker address (possibly a channel proxy in front of it) with credentials and TLS."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_enabled: bool = False
    tls_verify_certificate: bool = True
    tls_check_hostname: bool = True

    @classmethod
    def from_spec(cls, spec: BrokerSpec, host: str, port: int) -> MqttEndpoint:
        tls = spec.tls
        return cls(
            host=host,
            port=port,
            username=spec.username,
            password=spec.password,
            tls_ca_file=str(tls.ca_file) if tls and tls.ca_file else None,
            tls_cert_file=str(tls.cert_file) if tls and tls.cert_file else None,
            tls_key_file=str(tls.key_file) if tls and tls.key_file else None,
            tls_enabled=spec.uses_tls,
            tls_verify_certificate=not (tls and tls.insecure),
            tls_check_hostname=not (tls and tls.insecure),
        )

    def with_credentials(self, username: str, password: str) -> MqttEndpoint:
        """The same broker, connecting as another identity (a device's own)."""
        return replace(self, username=username, password=password)

    def via(self, host: str, port: int) -> MqttEndpoint:
        """The same broker reached through another address (a channel link's proxy).

        TLS still runs end to end through the proxy and the certificate is still verified against
        the CA, but its host name cannot match the proxy's address, so that one check is off.
        """
        return replace(self, host=host, port=port, tls_check_hostname=False)

    @property
    def address(self) -> str:
        return f"{'mqtts' if self.tls_enabled else 'mqtt'}://{self.host}:{self.port}"

    async def check_connection(self, identifier: str, timeout_s: float = CONNECT_TIMEOUT_S,
                               credentials_fields: str = SERVER_CREDENTIALS_FIELDS) -> None:
        """Connect once and disconnect; BrokerConnectionError says why when that fails."""
        client = self.client(identifier, timeout_s=timeout_s)
        try:
            async with client:
                pass
        except aiomqtt.MqttError as error:
            await _close_unfinished_connect(client)
            raise BrokerConnectionError(self.address, connect_failure_reason(error, timeout_s, credentials_fields),
                                        credentials_refused(error)) from error

    def client(self, identifier: str, keepalive: int = 60, will: aiomqtt.Will | None = None,
               timeout_s: float = MQTT_TIMEOUT_S) -> aiomqtt.Client:
        """An aiomqtt client for this endpoint (use as `async with`)."""
        tls_params = None
        if self.tls_enabled:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=self.tls_ca_file,
                certfile=self.tls_cert_file,
                keyfile=self.tls_key_file,
                cert_reqs=ssl.CERT_REQUIRED if self.tls_verify_certificate else ssl.CERT_NONE,
            )
        return aiomqtt.Client(
            self.host,
            self.port,
            username=self.username,
            password=self.password,
            identifier=identifier,
            keepalive=keepalive,
            will=will,
            timeout=timeout_s,
            clean_session=True,
            tls_params=tls_params,
            tls_insecure=(not self.tls_check_hostname) if self.tls_enabled else None,
            # paho leaves Nagle's algorithm on: a small publish (a report, the last chunk) would then
            # wait for the previous segment's ACK, tens of ms that would be blamed on the channel.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )


async def _close_unfinished_connect(client: aiomqtt.Client) -> None:
    """Close the socket and end the background task of a connect that failed before its CONNACK.

    aiomqtt 2.5 leaves both behind when `__aenter__` fails (it only cleans up on `__aexit__`), so a
    connect that times out would keep a socket and a task alive for the rest of the process.
    """
    paho_client = getattr(client, "_client", None)
    if paho_client is not None and paho_client.socket() is not None:
        paho_client.disconnect()  # sends DISCONNECT if it can, then paho closes the socket
    misc_task = getattr(client, "_misc_task", None)
    if misc_task is not None and not misc_task.done():
        await asyncio.wait({misc_task}, timeout=CLEANUP_TIMEOUT_S)
        if not misc_task.done():
            misc_task.cancel()
            await asyncio.wait({misc_task}, timeout=CLEANUP_TIMEOUT_S)


async def publish_until_disconnected(client: aiomqtt.Client, topic: str, payload: bytes, *, qos: int = 1,
                                     retain: bool = False, timeout: float = MQTT_TIMEOUT_S) -> None:
    """Publish, failing with MqttError as soon as the connection is lost.

    aiomqtt 2.5 leaves a QoS 1 publish waiting for its PUBACK until `timeout` even after the connection
    dropped (a minute on a slow link), so a device or a run would sit out a broker restart that long.
    """
    disconnected: asyncio.Future[None] | None = getattr(client, "_disconnected", None)
    publish = asyncio.ensure_future(client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout))
    if disconnected is None:
        await publish
        return
    done, _ = await asyncio.wait({publish, disconnected}, return_when=asyncio.FIRST_COMPLETED)
    if publish in done:
        publish.result()
        return
    publish.cancel()
    await asyncio.gather(publish, return_exceptions=True)
    reason = disconnected.exception() if not disconnected.cancelled() else None
    raise aiomqtt.MqttError(f"connection lost while publishing on {topic[:200]}: {reason or 'disconnected'}")


async def keep_session(session: Callable[[], Awaitable[None]], client_id: str, came_up: Callable[[], bool],
                       on_lost: Callable[[aiomqtt.MqttError], None], who: str) -> NoReturn:
    """Run `session` over and over until cancelled (one that returns is started again): when it fails with an MQTT error, `on_lost(error)`, then wait a
    jittered backoff delay (testbed.core.backoff, seeded by `client_id`) before the next try; a session that had
    come up (`came_up()` true when it failed) starts the delays over. Devices, serial bridges and network boards
    all stay connected this way."""
    backoff = client_backoff(client_id)
    while True:
        try:
            await session()
        except aiomqtt.MqttError as error:
            if came_up():
                backoff.reset()
            on_lost(error)
            delay = backoff.next_delay()
            logger.warning("%s: MQTT connection lost (%s); reconnecting in %.2f s", who, error, delay)
            await asyncio.sleep(delay)


async def handle_contained(handling: Awaitable[None], on_failure: Callable[[], None], who: str, topic: str,
                           payload_bytes: int, log: logging.Logger = logger) -> None:
    """Await one message's `handling`; whatever it raises costs only that message: `on_failure` counts it and
    `log` says so, naming `who` dropped it. The connection's own errors and cancellation pass through."""
    try:
        await handling
    except (aiomqtt.MqttError, asyncio.CancelledError):
        raise
    except Exception:  # noqa: BLE001 — a message that cannot be handled must not end its client
        on_failure()
        log.exception("%s: dropped a message on %.200s (%d bytes) that failed to be handled", who, topic,
                      payload_bytes)
