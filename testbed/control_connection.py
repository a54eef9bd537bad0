"""The run's own MQTT session, kept up across broker restarts: reconnect with backoff, resubscribe, republish retained."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import aiomqtt

from testbed.core.backoff import client_backoff
from testbed.core.mqtt import MqttEndpoint, publish_until_disconnected
from testbed.run_summary import RunError

logger = logging.getLogger("testbed.runner")

GIVE_UP_AFTER_S = 120.0
"""How long the run waits for its broker to come back before it fails."""

MessageHandler = Callable[[str, bytes], Awaitable[None]]
ConnectionCallback = Callable[[int], None]


class ControlConnection:
    """What the run publishes and subscribes through; survives the broker going away and coming back.

    `run()` keeps a session up: it connects, subscribes to `subscriptions`, republishes every retained
    message published through it (a restarted broker may have lost them), then hands each message to
    `on_message`. When the connection drops it reconnects with jittered exponential backoff
    (`testbed.core.backoff.RECONNECT`); after `give_up_after_s` without a broker `run()` raises RunError. `publish` waits for
    a session and sends again if the connection drops before the broker acknowledged (QoS 1: at least once).
    """

    def __init__(self, endpoint: MqttEndpoint, identifier: str, subscriptions: list[str], on_message: MessageHandler,
                 give_up_after_s: float = GIVE_UP_AFTER_S, on_connected: ConnectionCallback | None = None) -> None:
        self.endpoint = endpoint
        self.identifier = identifier
        self.subscriptions = subscriptions
        self.on_message = on_message
        self.give_up_after_s = give_up_after_s
        self.on_connected = on_connected
        self.connections = 0
        self.retained: dict[str, bytes] = {}
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()

    @property
    def connected(self) -> bool:
        """Whether a session is up now."""
        return self._connected.is_set()

    async def wait_connected(self, timeout_s: float) -> None:
        """Until a session is up; RunError after `timeout_s`."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except asyncio.TimeoutError:
            raise RunError(f"no connection to the broker {self.endpoint.address} for {timeout_s:g} s") from None

    async def start(self) -> asyncio.Task[None]:
        """Run the session in a task and return it once connected; a first connect that fails raises RunError."""
        task = asyncio.create_task(self.run(), name=f"{self.identifier}-connection")
        connected = asyncio.create_task(self._connected.wait())
        await asyncio.wait({task, connected}, return_when=asyncio.FIRST_COMPLETED)
        connected.cancel()
        if task.done():
            task.result()  # raises what ended it
            raise RunError(f"the run's MQTT session to {self.endpoint.address} ended before it began")
        return task

    async def run(self) -> None:
        """Keep a session up until cancelled (or RunError once the broker stayed away too long)."""
        backoff = client_backoff(self.identifier)
        down_since: float | None = None
        while True:
            client = self.endpoint.client(self.identifier)
            try:
                async with client:
                    self._client = client
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    for topic, payload in list(self.retained.items()):
                        await client.publish(topic, payload, qos=1, retain=True, timeout=30.0)
                    self.connections += 1
                    down_since = None
                    backoff.reset()
                    self._connected.set()
                    if self.on_connected is not None:
                        self.on_connected(self.connections)
                    async for message in client.messages:
                        await self.on_message(str(message.topic), bytes(message.payload))
            except aiomqtt.MqttError as error:
                self._connected.clear()
                self._client = None
                if self.connections == 0:  # never connected: a wrong address or identity, not a restart
                    raise RunError(f"cannot connect to broker {self.endpoint.address}: {error}") from error
                down_since = down_since or time.monotonic()
                if time.monotonic() - down_since > self.give_up_after_s:
                    raise RunError(f"lost the connection to the broker {self.endpoint.address} and it did not "
                                   f"come back within {self.give_up_after_s:g} s: {error}") from error
                delay = backoff.next_delay()
                logger.warning("the run's MQTT connection to %s failed (%s); reconnecting in %.1f s",
                               self.endpoint.address, error, delay)
                await asyncio.sleep(delay)
            finally:
                self._connected.clear()
                self._client = None

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                      timeout: float = 60.0) -> None:
        """Publish once a session is up; sent again on a new session if the connection dropped first."""
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        deadline = time.monotonic() + max(timeout, self.give_up_after_s)
        while True:
            await self.wait_connected(max(0.1, deadline - time.monotonic()))
            client = self._client
            if client is None:
                continue
            try:
                await publish_until_disconnected(client, topic, payload, qos=qos, retain=retain, timeout=timeout)
                return
            except aiomqtt.MqttError as error:
                if time.monotonic() > deadline:
                    raise
                logger.info("publish on %.200s interrupted (%s); sending it again once reconnected", topic, error)
                # the session loop notices the drop and reconnects; wait for that rather than spin
                await asyncio.sleep(0.1)
